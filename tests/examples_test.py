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
