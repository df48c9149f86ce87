"""The examples run end to end on a small MNIST slice and forget their digit."""

import numpy as np
import pytest

from examples import function_mlp, linen_cnn, nnx_cnn


@pytest.mark.slow  # 45-100 s each on the shared 2-core CPU (train, importance, fine-tune)
@pytest.mark.parametrize(
    "example", [linen_cnn, nnx_cnn, function_mlp], ids=["linen_cnn", "nnx_cnn", "function_mlp"]
)
def test_example_forgets_its_digit(example, tfds_dir, capsys):
    # 1,000 training and 500 evaluation images, both from the (fast to load) test split.
    result = example.run(
        num_train=1000,
        num_eval=500,
        epochs=1,
        sample_size=64,
        train_split="test",
        data_dir=tfds_dir,
    )
    before, after = result["before"], result["after"]
    assert before["forget_acc"] > 60  # trained: the comparison below is not vacuous
    assert before["retain_acc"] > 60
    assert after["forget_acc"] < before["forget_acc"] - 40
    assert after["retain_acc"] > 50
    assert np.unique(result["selected"]).size == 12
    printed = capsys.readouterr().out
    assert f"forget {after['forget_acc']:.2f}%" in printed


def test_quickstart_runs_the_top_level_api(capsys):
    """The random-data tour: the pipeline picks the units the step-by-step calls pick."""
    from examples import quickstart

    top, result = quickstart.main()
    assert top.size == 2
    np.testing.assert_array_equal(result.selected, top)
    assert [h["step"] for h in result.history] == list(range(8))
    assert result.finetune_batches == 5
    assert result.spec.layers[0].bn_path == ("BatchNorm_0",)  # found from the computation
    assert "forget_acc" in capsys.readouterr().out
