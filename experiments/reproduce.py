"""Reproduce the reference tables (METHOD.md rows L1-L4, C1-C10) beside our numbers.

    python -m experiments.reproduce --table=lenet                  # 2 CPU cores: minutes
    python -m experiments.reproduce --table=lenet --seeds=0,1,2    # mean +- std
    python -m experiments.reproduce --table=cifar --compute_dtype=bfloat16   # GPU
    python -m experiments.reproduce --table=cifar --width=0.25 --train_epochs=3  # CPU, scaled

Per seed: one base model (trained once, reused from its checkpoint), one importance
sweep on the forget-class training data shared by every row that uses it, then a
small sweep of the open hyper-parameters (K and dt) on the *training* split with the
table's no-fine-tune row (L1 / C1), chosen by a fixed rule: the highest retain-train
accuracy with forget-train accuracy <= 5% (else the lowest forget-train accuracy).
Every row then uses those values and differs only in what the reference varies.
Writes <workdir>/<table>/summary.{json,md}, sweep.json, plots, and one result.json
per row and seed; rerunning skips rows already done with the same config.
"""

import pathlib
import time

import jax
from absl import app, flags, logging

from experiments import cifar_ship, common, mnist_lenet, presets
from tdu_jax import data, decay, importance, metrics, report, units

flags.DEFINE_enum("table", "lenet", ["lenet", "cifar", "all"], "Which reference table.")
flags.DEFINE_string("rows", None, "Comma list of row ids (default: the whole table).")
flags.DEFINE_string("seeds", "0", "Comma list of seeds; results show mean +- std.")
flags.DEFINE_bool("sweep", True, "Choose K and dt by the documented train-split sweep.")
FLAGS = flags.FLAGS

TABLES = {
    "lenet": dict(dataset="mnist", defaults=mnist_lenet.DEFAULTS, sweep_row="L1",
                  grid={"top_k": [300, 1000, 3000], "dt": [0.25, 0.5, 1.0]}),
    "cifar": dict(dataset="cifar10", defaults=cifar_ship.DEFAULTS, sweep_row="C1",
                  grid={"top_k": [0.01, 0.02, 0.05, 0.1], "dt": [1.0, 2.0, 5.0, 10.0]}),
}  # fmt: skip
SWEEP_FORGET_MAX = 5.0  # percent, forget-train accuracy allowed by the selection rule
SWEEP_RETAIN_SAMPLE = 10000  # retain-train images scored per sweep point


def sweep_hparams(cfg, model, params, batch_stats, train_split, imp, spec, grid, row) -> dict:
    """Scores each (K, dt) of ``grid`` with row ``row``'s decay (no fine-tuning) on train data."""
    settings = common.apply_preset(cfg, row)
    forget, retain = data.forget_retain(train_split, cfg["forget_class"])
    retain = data.random_fraction(retain, min(1.0, SWEEP_RETAIN_SAMPLE / retain.size), 0)
    points = []
    for k in grid["top_k"]:
        selected = decay.select_top_k(imp, k)
        mask = units.unit_mask(params, spec, selected)
        for dt in grid["dt"]:
            decayed = decay.decay(params, mask, settings["lam"], dt, settings["decay_steps"])
            accs = {}
            for name, split in (("forget_train_acc", forget), ("retain_train_acc", retain)):
                pred = metrics.predict(model, decayed, batch_stats, split.images,
                                       dataset=cfg["dataset"])  # fmt: skip
                accs[name] = metrics.accuracy(pred, split.labels)
            points.append({"top_k": k, "dt": dt, "units": int(selected.size), **accs})
            logging.info("sweep %s", points[-1])
    ok = [p for p in points if p["forget_train_acc"] <= SWEEP_FORGET_MAX]
    best = (
        max(ok, key=lambda p: (p["retain_train_acc"], -p["forget_train_acc"]))
        if ok
        else min(points, key=lambda p: (p["forget_train_acc"], -p["retain_train_acc"]))
    )
    return {"row": row, "lambda": settings["lam"], "decay_steps": settings["decay_steps"],
            "rule": f"max retain_train_acc s.t. forget_train_acc <= {SWEEP_FORGET_MAX}",
            "points": points, "chosen": {"top_k": best["top_k"], "dt": best["dt"]}}  # fmt: skip


def shares_importance(row_cfg: dict, cfg: dict) -> bool:
    keys = ("importance_data", "importance_fraction", "granularity", "include", "exclude",
            "include_bn")  # fmt: skip
    return (
        row_cfg["selection"] == "topk"
        and not row_cfg["reestimate"]
        and all(row_cfg[k] == cfg[k] for k in keys)
    )


def table_configs(name: str) -> tuple[dict, dict[str, dict], list[int]]:
    """The table's config, every row's config and the seeds, all validated up front."""
    spec_t = TABLES[name]
    cfg = common.config_from_flags(spec_t["dataset"], spec_t["defaults"])
    if cfg["row"] is not None:
        raise ValueError("--preset does not apply to reproduce; use --rows")
    cfg["workdir"] = str(pathlib.Path(FLAGS.workdir) / name)
    rows = FLAGS.rows.split(",") if FLAGS.rows else list(presets.TABLES[name])
    for row in rows:
        if row not in presets.TABLES[name]:
            raise ValueError(f"--rows: {row!r} is not in table {name} ({presets.TABLES[name]})")
    try:
        seeds = [int(s) for s in FLAGS.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers; got {FLAGS.seeds!r}") from None
    return cfg, {row: row_config(cfg, row, seeds[0]) for row in rows}, seeds


def row_config(cfg: dict, row: str, seed: int) -> dict:
    return common.validate_config(
        {**common.apply_preset(cfg, row), "seed": seed, "row": row, "run_name": f"{row}-seed{seed}"}
    )


def run_table(name: str, cfg: dict, rows: list[str], seeds: list[int]) -> dict:
    spec_t = TABLES[name]
    table_dir = pathlib.Path(cfg["workdir"])
    sweep_allowed = FLAGS.sweep and not (FLAGS["top_k"].present or FLAGS["dt"].present)
    per_row: dict[str, list[dict]] = {r: [] for r in rows}
    sweeps = {}
    for seed in seeds:
        cfg = {**cfg, "seed": seed}
        train_split, test_split, model, params, bs, base = common.prepare_base(cfg)
        imp = None
        if any(shares_importance(row_config(cfg, r, seed), cfg) for r in rows):
            spec = units.enumerate_units(params, cfg["granularity"], cfg["include"],
                                         cfg["exclude"], cfg["include_bn"])  # fmt: skip
            sample = common.importance_sample(cfg, train_split)
            logging.info("Importance of %d units on %d images", spec.num_units, sample.size)
            imp = importance.ablation_importance(
                model, params, bs, data.to_float(sample.images, cfg["dataset"]),
                sample.labels, spec, unit_chunk=cfg["unit_chunk"],
                sample_batch=cfg["sample_batch"], progress=common.Progress("importance"),
            )  # fmt: skip
            if sweep_allowed:
                sweep = sweep_hparams(cfg, model, params, bs, train_split, imp, spec,
                                      spec_t["grid"], spec_t["sweep_row"])  # fmt: skip
                cfg.update(sweep["chosen"])
                sweeps[seed] = sweep
                report.write_json_atomic(table_dir / "sweep.json", sweeps)
                logging.info("Sweep chose %s", sweep["chosen"])
            k = decay.resolve_k(cfg["top_k"], spec.num_units)
            title = f"{name}: accuracy drop per unit (seed {seed})"
            plot_path = table_dir / f"importance-seed{seed}.png"
            report.plot_importance(imp.accuracy_drop, k, plot_path, title=title)
        for row in rows:
            row_cfg = row_config(cfg, row, seed)
            result = common.existing_result(row_cfg)
            if result is None:
                logging.info("Row %s seed %d", row, seed)
                shared = imp if shares_importance(row_cfg, cfg) else None
                result = common.run_one(row_cfg, model, params, bs, base, train_split,
                                        test_split, precomputed=shared)  # fmt: skip
            per_row[row].append(result)
            write_summary(name, table_dir, per_row)
    return {"rows": per_row, "sweeps": sweeps}


def aggregate(results: list[dict]) -> dict:
    """One row's result; with several seeds, the first plus ``seeds`` (per-seed finals)."""
    out = dict(results[0])
    if len(results) > 1:
        out["seeds"] = [{**r["final"], "finetune_batches": r["finetune_batches"]} for r in results]
    return out


def write_summary(name: str, table_dir: pathlib.Path, per_row: dict) -> None:
    results = [aggregate(rs) for rs in per_row.values() if rs]
    base = report.REFERENCE_BASE.get(name)
    title = f"{name} table ({len(next(iter(per_row.values())))} seed(s))"
    report.write_json_atomic(table_dir / "summary.json", {"table": name, "results": results})
    report.write_text_atomic(
        table_dir / "summary.md", report.summary_markdown(results, title, base)
    )
    report.plot_history(results, table_dir / "history.png")
    report.plot_bars(results, table_dir / "bars.png")


def main(argv):
    del argv
    start = time.perf_counter()
    names = ["lenet", "cifar"] if FLAGS.table == "all" else [FLAGS.table]
    with common.bad_input():  # every table's settings are checked before any training
        tables = {name: table_configs(name) for name in names}
    for name, (cfg, row_cfgs, seeds) in tables.items():
        run_table(name, cfg, list(row_cfgs), seeds)
        print((pathlib.Path(cfg["workdir"]) / "summary.md").read_text())
    logging.info("reproduce done in %.1f s on %s", time.perf_counter() - start, jax.devices()[0])


if __name__ == "__main__":
    common.define_flags(**mnist_lenet.DEFAULTS)
    app.run(main)
