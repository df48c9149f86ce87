"""compare --tune: an interrupted sweep resumes from the points it saved."""

import json

import jax
import numpy as np

from experiments import compare
from experiments.config import ExperimentConfig
from tdu_jax import data, methods, models


def _setup(tmp_path):
    cfg = ExperimentConfig(
        dataset="mnist", forget_class=(3,), model="lenet", granularity="weight",
        finetune_lr=0.01, train_epochs=1, train_optimizer="adam", train_lr=2e-3,
        train_weight_decay=0.0, train_schedule="cosine", augment=False,
        workdir=str(tmp_path), seed=0, top_k=300, dt=0.25, lam=0.1,
    )  # fmt: skip
    model = models.get_model("lenet")
    params, bs = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 255, (200, 28, 28, 1), np.uint8), np.arange(200) % 10)
    configs = compare.method_configs(cfg, retain_size=180)
    return cfg, model, params, bs, split, configs


def test_tune_saves_each_point_and_resumes_without_rerunning(tmp_path, monkeypatch):
    cfg, model, params, bs, split, configs = _setup(tmp_path)
    calls = []

    def fake_run(name, model, params, bs, data_in, key, mcfg, dataset):
        calls.append((name, mcfg))
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped during the third run
        return methods.MethodResult(params, bs, {})  # the base model, unchanged

    monkeypatch.setattr(methods, "run_method", fake_run)
    grid = (0.1, 1.0)
    try:
        compare.tune(cfg, ["ft", "ssd"], configs, model, params, bs, split, 0.2, grid, tmp_path)
    except KeyboardInterrupt:
        pass
    (runs_file,) = tmp_path.glob("tuning-runs-*.json")
    saved = json.loads(runs_file.read_text())["points"]
    assert sorted(saved["ft"]["points"]) == ["0.1", "1"] and "ssd" not in saved
    calls.clear()
    chosen = compare.tune(cfg, ["ft", "ssd"], configs, model, params, bs, split, 0.2, grid,
                          tmp_path)  # fmt: skip
    assert [name for name, _ in calls] == ["ssd", "ssd"]  # ft's two points were reused
    assert [p["factor"] for p in chosen["ft"]["points"]] == [0.1, 1.0]
    # A method whose config changed is tuned again.
    calls.clear()
    changed = {**configs, "ft": configs["ft"]._replace(epochs=configs["ft"].epochs + 1)}
    compare.tune(cfg, ["ft", "ssd"], changed, model, params, bs, split, 0.2, grid, tmp_path)
    assert [name for name, _ in calls] == ["ft", "ft"]
