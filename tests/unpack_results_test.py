"""scripts/unpack_results.py: saved tables back into run folders, never over another run."""

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "unpack_results.py"


def _load():
    spec = importlib.util.spec_from_file_location("unpack_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(run_name: str, seed: int, lam: float = 0.1) -> dict:
    config = {"dataset": "mnist", "run_name": run_name, "seed": seed, "lam": lam,
              "workdir": f"/elsewhere/{seed}", "calibrate": True, "top_k": 10,
              "dt": 0.5}  # fmt: skip
    return {"row": "L1", "config": config, "final": {"forget_acc": float(seed)}}


def test_unpack_writes_each_result_once_and_refuses_another_run(tmp_path):
    unpack = _load().unpack
    table = tmp_path / "saved"
    table.mkdir()
    results = [_result("L1-0-seed0", 0), _result("L1-0-seed1", 1)]
    (table / "forgetting.json").write_text(json.dumps({"partial": False, "results": results}))
    work = tmp_path / "work"
    assert unpack(table, work) == (2, 0)
    for r in results:
        saved = json.loads((work / "lenet" / r["config"]["run_name"] / "result.json").read_text())
        assert saved == r
    assert unpack(table, work) == (0, 2)  # the same runs: left as they are
    other = tmp_path / "other"
    other.mkdir()
    clash = {"partial": False, "results": [_result("L1-0-seed0", 0, lam=0.5)]}
    (other / "forgetting.json").write_text(json.dumps(clash))
    with pytest.raises(FileExistsError, match="different run"):
        unpack(other, work)
    assert json.loads((work / "lenet" / "L1-0-seed0" / "result.json").read_text()) == results[0]
