"""Smoke tests of the experiment entry points (absl apps, run as subprocesses).

Flags are defined only under ``if __name__ == "__main__":``, so every entry point runs as
``python -m experiments.<name>`` from the repository root, on tiny configs (seconds each).
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import pytest

from experiments import cifar_ship, presets

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ACC_KEYS = ("forget_acc", "retain_acc", "test_acc", "forget_train_acc", "retain_train_acc")
TIMING_KEYS = ("importance", "decay", "finetune", "eval", "total")
LENET_UNITS = 61706  # LeNet-5 weights + biases (weight granularity)

MNIST_TINY = [
    "--max_train_examples=512", "--max_test_examples=200", "--train_epochs=1", "--top_k=20",
    "--decay_steps=2", "--sample_batch=256",
]  # fmt: skip
CIFAR_TINY = [
    "--model=resnet_tiny", "--max_train_examples=256", "--max_test_examples=100",
    "--train_epochs=1", "--top_k=4", "--decay_steps=2", "--train_batch_size=64",
    "--batch_size=32",
]  # fmt: skip


def _run(module: str, args, tfds_dir: str | None = None, timeout: float = 600):
    """Runs ``python -m experiments.<module> <args>``; returns (process, output, seconds)."""
    env = dict(os.environ)
    if tfds_dir is not None:
        env["TFDS_DATA_DIR"] = tfds_dir
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc, proc.stdout + proc.stderr, time.perf_counter() - start


def _tail(output: str, lines: int = 40) -> str:
    return "\n".join(output.splitlines()[-lines:])


def _check_ok(proc, output: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{_tail(output)}"


def _read(path: pathlib.Path) -> dict:
    assert path.is_file(), f"missing {path}"
    return json.loads(path.read_text())


def _check_accuracies(acc: dict) -> None:
    assert set(ACC_KEYS) <= set(acc), acc
    for key in ACC_KEYS:
        assert 0.0 <= acc[key] <= 100.0, (key, acc[key])


def _check_result(result: dict, decay_steps: int, finetune_batches: int, num_classes=10) -> None:
    """The result.json schema shared by every entry point."""
    for key in ("config", "base", "final", "per_class_acc", "history", "finetune_batches",
                "importance", "timings", "versions"):  # fmt: skip
        assert key in result, key
    _check_accuracies(result["base"])
    _check_accuracies(result["final"])
    for which in ("base", "final"):
        per_class = result["per_class_acc"][which]
        assert len(per_class) == num_classes
        assert all(0.0 <= a <= 100.0 for a in per_class), per_class
    history = result["history"]
    assert [h["step"] for h in history] == list(range(decay_steps + 1))
    for entry in history:
        for key in ("forget_acc", "retain_acc", "test_acc"):
            assert 0.0 <= entry[key] <= 100.0, entry
    assert history[0]["finetune_batches"] == 0
    assert history[-1]["finetune_batches"] == result["finetune_batches"]
    assert result["finetune_batches"] == finetune_batches
    assert result["importance"]["sample_size"] > 0
    assert result["importance"]["num_units"] > 0
    timings = result["timings"]
    for key in TIMING_KEYS:
        assert timings[key] >= 0.0, (key, timings)
    assert timings["total"] >= timings["importance"]
    assert result["versions"]["jax"] == jax.__version__
    assert isinstance(result["versions"]["device"], str) and result["versions"]["device"]


# ------------------------------------------------------------------------------ mnist_lenet
MNIST_ARGS = [*MNIST_TINY, "--finetune=after_each", "--finetune_batches=3", "--lambda=0.3",
              "--run_name=smoke"]  # fmt: skip


@pytest.fixture(scope="module")
def mnist_run(tfds_dir, tmp_path_factory):
    """One tiny mnist_lenet run; later tests rerun in the same workdir."""
    workdir = tmp_path_factory.mktemp("mnist")
    args = [*MNIST_ARGS, f"--workdir={workdir}"]
    proc, output, _ = _run("mnist_lenet", args, tfds_dir)
    _check_ok(proc, output)
    path = workdir / "smoke" / "result.json"
    return {"workdir": workdir, "args": args, "output": output, "path": path,
            "result": _read(path)}  # fmt: skip


def test_mnist_lenet_smoke(mnist_run):
    result = mnist_run["result"]
    _check_result(result, decay_steps=2, finetune_batches=6)  # 3 batches after each of 2 steps
    assert [h["finetune_batches"] for h in result["history"]] == [0, 3, 6]
    config = result["config"]
    assert config["lam"] == 0.3
    assert (config["decay_steps"], config["finetune"], config["finetune_batches"]) == (
        2, "after_each", 3,
    )  # fmt: skip
    assert (config["top_k"], config["forget_class"], config["model"]) == (20, [0], "lenet")
    assert config["dataset"] == "mnist" and config["row"] is None
    assert "overwrite" not in config
    imp = result["importance"]
    assert imp["granularity"] == "weight"
    assert imp["num_units"] == LENET_UNITS
    assert 0 < imp["sample_size"] < 512  # digit-0 images among the first 512
    assert imp["selected"] == 20
    assert "Training base" in mnist_run["output"]
    assert "result:" in mnist_run["output"]


def test_mnist_lenet_rerun_reuses_and_refuses_to_clobber(mnist_run, tfds_dir):
    workdir, args, path = mnist_run["workdir"], mnist_run["args"], mnist_run["path"]
    (base_dir,) = (workdir / "base").iterdir()
    base_mtime, result_mtime = base_dir.stat().st_mtime_ns, path.stat().st_mtime_ns

    # Same flags: the finished result is reported, nothing is trained or rewritten.
    proc, output, _ = _run("mnist_lenet", args, tfds_dir)
    _check_ok(proc, output)
    assert "Result exists for this config" in output
    assert "Training base" not in output
    assert path.stat().st_mtime_ns == result_mtime
    assert base_dir.stat().st_mtime_ns == base_mtime

    # Same run name, another config: refused, pointing at --overwrite.
    other = [*args, "--finetune=after_all", "--finetune_batches=5"]
    proc, output, seconds = _run("mnist_lenet", other, tfds_dir)
    assert proc.returncode != 0
    assert "--overwrite" in output
    assert "Training base" not in output
    assert path.stat().st_mtime_ns == result_mtime
    assert seconds < 60

    # --overwrite: runs the new config on the reused base model.
    proc, output, _ = _run("mnist_lenet", [*other, "--overwrite"], tfds_dir)
    _check_ok(proc, output)
    assert "Reusing base model" in output
    assert "Training base" not in output
    assert base_dir.stat().st_mtime_ns == base_mtime
    assert [p.name for p in (workdir / "base").iterdir()] == [base_dir.name]
    result = _read(path)
    _check_result(result, decay_steps=2, finetune_batches=5)  # after_all: exactly 5 batches
    assert [h["finetune_batches"] for h in result["history"]] == [0, 0, 5]
    assert result["config"]["finetune"] == "after_all"
    assert result["base"] == mnist_run["result"]["base"]  # same base model


# ------------------------------------------------------------------------------- cifar_ship
def test_cifar_ship_preset_with_explicit_overrides(tfds_dir, tmp_path):
    args = [*CIFAR_TINY, "--granularity=filter", "--preset=C7", "--finetune_batches=2",
            f"--workdir={tmp_path}"]  # fmt: skip
    proc, output, _ = _run("cifar_ship", args, tfds_dir)
    _check_ok(proc, output)
    result = _read(tmp_path / "C7-seed0" / "result.json")  # default run name: <preset>-seed<seed>
    # Explicit --decay_steps=2 and --finetune_batches=2 beat C7's 16 steps x 17 batches.
    _check_result(result, decay_steps=2, finetune_batches=4)
    assert len(result["history"]) == 3
    config = result["config"]
    assert config["row"] == result["row"] == "C7"
    assert config["lam"] == 0.1  # from the preset
    assert config["finetune"] == "after_each"  # from the preset (the flag default is none)
    assert (config["decay_steps"], config["finetune_batches"]) == (2, 2)
    assert config["forget_class"] == [8]  # ship
    assert config["model"] == "resnet_tiny"
    assert result["importance"]["granularity"] == "filter"


# -------------------------------------------------------------------------------- reproduce
def test_reproduce_lenet_rows(tfds_dir, tmp_path):
    args = ["--table=lenet", "--rows=L1,L4", f"--workdir={tmp_path}", *MNIST_TINY]
    proc, output, _ = _run("reproduce", args, tfds_dir)
    _check_ok(proc, output)
    table_dir = tmp_path / "lenet"
    summary = _read(table_dir / "summary.json")
    assert summary["table"] == "lenet"
    rows = {r["row"]: r for r in summary["results"]}
    assert list(rows) == ["L1", "L4"]
    _check_result(rows["L1"], decay_steps=2, finetune_batches=0)
    _check_result(rows["L4"], decay_steps=2, finetune_batches=42)  # 21 per step, 2 steps
    for row in ("L1", "L4"):
        assert rows[row]["importance"]["reused"]  # one importance pass shared by both rows
        assert (table_dir / f"{row}-seed0" / "result.json").is_file()
    assert not (table_dir / "sweep.json").exists()  # explicit --top_k skips the sweep
    markdown = (table_dir / "summary.md").read_text()
    for text in ("L1", "L4", "2.96", "2.35"):
        assert text in markdown, text
    for name in ("history.png", "bars.png"):
        assert (table_dir / name).read_bytes()[:8] == PNG_MAGIC, name


# ---------------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "row, expected",
    [
        ("C1", dict(lam=0.05, decay_steps=5, finetune="none")),
        ("C4", dict(lam=0.05, decay_steps=5, finetune="after_all", finetune_epochs=6.0)),
        ("C6", dict(lam=0.1, decay_steps=21, finetune="after_each", finetune_batches=11)),
        ("C8", dict(lam=0.1, decay_steps=16, finetune="after_each", finetune_batches=17,
                    selection="random")),
        ("C9", dict(lam=0.1, decay_steps=16, finetune="after_each", finetune_batches=17,
                    importance_data="forget", importance_fraction=0.1)),
        ("C10", dict(lam=0.1, decay_steps=16, finetune="after_each", finetune_batches=17,
                     importance_data="all", importance_fraction=0.1)),
        ("L1", dict(selection="topk", decay_steps=7, finetune="none")),
        ("L3", dict(selection="topk", decay_steps=7, finetune="after_all", finetune_epochs=1.0)),
        ("L4", dict(selection="topk", decay_steps=7, finetune="after_each",
                    finetune_batches=21)),
    ],
)  # fmt: skip
def test_presets_match_method_rows(row, expected):
    assert presets.PRESETS[row] == expected
    assert presets.preset(row) == expected
    assert presets.preset(row) is not presets.PRESETS[row]  # a copy


def test_presets_tables_and_unknown():
    assert presets.TABLES["lenet"] == ("L1", "L2", "L3", "L4")
    assert set(presets.TABLES["cifar"]) >= {f"C{i}" for i in range(1, 11)}
    assert presets.PRESETS["C8"]["selection"] == "random"
    with pytest.raises(ValueError, match="--preset"):
        presets.preset("X9")


_CONFIG_SNIPPET = """
import json, sys
from absl import flags
from experiments import cifar_ship, common
common.define_flags(**cifar_ship.DEFAULTS)
out = []
for argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *argv])
    out.append(common.config_from_flags("cifar10"))
print(json.dumps(out))
"""


def test_config_precedence_preset_vs_explicit_flags(tmp_path):
    """Preset values fill flags left at their defaults; explicit flags win."""
    workdir = f"--workdir={tmp_path}"
    argvs = [
        ["--preset=C1", workdir],
        ["--preset=C1", "--lambda=0.2", workdir],
        ["--preset=C7", "--decay_steps=2", workdir],
        ["--lambda=0.3", workdir],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _CONFIG_SNIPPET, json.dumps(argvs)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    c1, c1_lam, c7, plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (c1["row"], c1["lam"], c1["decay_steps"], c1["finetune"]) == ("C1", 0.05, 5, "none")
    assert (c1_lam["lam"], c1_lam["decay_steps"]) == (0.2, 5)
    assert (c7["lam"], c7["decay_steps"], c7["finetune_batches"]) == (0.1, 2, 17)
    assert (plain["row"], plain["lam"], plain["decay_steps"], plain["finetune"]) == (
        None, 0.3, 16, "none",
    )  # fmt: skip
    assert plain["top_k"] == float(cifar_ship.DEFAULTS["top_k"]) and plain["forget_class"] == [8]


# ------------------------------------------------------------------------- flag validation
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset=X9"], "--preset"),
        (["--forget_class=boat"], "--forget_class"),
        (["--finetune=none", "--finetune_batches=5"], "--finetune_batches"),
        (["--importance_fraction=0"], "--importance_fraction"),
        (["--top_k=abc"], "--top_k"),
        (["--lambda=-1"], "lambda"),
        (["--dt=0"], "dt must be"),
        (["--model=vgg"], "--model"),
        ("unwritable_workdir", "--workdir"),
    ],
    ids=["preset", "forget_class", "finetune_conflict", "importance_fraction", "top_k",
         "lambda", "dt", "model", "workdir"],
)  # fmt: skip
def test_invalid_flags_fail_fast(args, needle, tmp_path):
    workdir = tmp_path / "runs"
    if args == "unwritable_workdir":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a directory")
        workdir = blocker / "runs"
        args = []
    # No TFDS dir: validation must fail before any data is loaded.
    proc, output, seconds = _run("mnist_lenet", [*args, f"--workdir={workdir}"], timeout=300)
    assert proc.returncode != 0, _tail(output)
    error = proc.stderr.strip().splitlines()[-1]  # the exception (or absl usage error) line
    assert needle in error, _tail(output)
    assert "Training base" not in output
    assert not (workdir / "base").exists()
    assert seconds < 60


def test_train_base_prints_per_class_accuracy_and_reuses_checkpoint(tfds_dir, tmp_path):
    args = ["--dataset=mnist", f"--workdir={tmp_path}", *MNIST_TINY[:3]]
    proc, output, _ = _run("train_base", args, tfds_dir)
    _check_ok(proc, output)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[1].startswith("test accuracy:"), lines
    per_class = [line.split(":") for line in lines[2:]]
    assert [name.strip() for name, _ in per_class] == [str(d) for d in range(10)]
    assert all(0.0 <= float(acc.strip(" %")) <= 100.0 for _, acc in per_class)
    checkpoints = list((tmp_path / "base").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "config.json").is_file()
    proc, output, _ = _run("train_base", args, tfds_dir)
    _check_ok(proc, output)
    assert "Reusing base model" in output
    assert proc.stdout.splitlines()[1] == lines[1]  # same model, same accuracy
