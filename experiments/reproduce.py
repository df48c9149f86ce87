"""Reproduce the reference tables (METHOD.md rows L1-L4, C1-C10) beside our numbers.

    python -m experiments.reproduce --table=lenet                  # 2 CPU cores: minutes
    python -m experiments.reproduce --table=lenet --seeds=0,1,2    # mean +- std
    python -m experiments.reproduce --table=cifar --compute_dtype=bfloat16   # GPU
    python -m experiments.reproduce --table=cifar --width=0.25 --train_epochs=3  # CPU, scaled

Per seed: one base model (trained once, reused from its checkpoint), one importance
sweep on the forget-class training data shared by every row that uses it, then a
small sweep of the open hyper-parameters (K and dt) on the *training* split with the
table's no-fine-tune row's lambda and T (L1 / C1), chosen by a fixed rule: the highest
retain-train accuracy with forget-train accuracy <= --sweep_forget_max (LeNet 1%, CIFAR 5%;
else the lowest forget-train accuracy). Rows without fine-tuning use that point; a row that
fine-tunes checks the sweep's points through its own fine-tuning and keeps the least
damaging one that stays under the ceiling (--calibrate_finetune, tdu_jax.calibrate). A row
whose preset ranks or calibrates otherwise (presets.OURS: LeNet's L1, the ratio score under a
0.5% ceiling; CIFAR's C1, the ratio score) makes its own sweep with its own importance.
Writes <workdir>/<table>/summary.{json,md}, sweep.json (the table's sweeps; a row's own
sweep is in its result.json), plots (tradeoff-*.png: the trade-off before and after
fine-tuning), and one result.json per row and seed; rerunning
skips rows already done with the same config.
"""

import dataclasses
import pathlib
import time

import jax
from absl import app, flags, logging

from experiments import cifar_ship, common, mnist_lenet, presets
from experiments.config import ExperimentConfig
from tdu_jax import calibrate, data, decay, plots, reference, result_files, summary
from tdu_jax import forgetting_report as fr

flags.DEFINE_enum("table", "lenet", ["lenet", "cifar", "all"], "Which reference table.")
flags.DEFINE_string("rows", None, "Comma list of row ids (default: the whole table).")
flags.DEFINE_string("seeds", "0", "Comma list of seeds; results show mean +- std.")
flags.DEFINE_bool("sweep", True, "Choose K and dt by the documented train-split sweep.")
flags.DEFINE_bool("summarize_only", False,
                  "Compute nothing: rebuild summaries and plots from the finished result.json "
                  "files of the requested rows, seeds and classes (e.g. after runs split "
                  "across processes); missing ones mark the summary PARTIAL.")  # fmt: skip
flags.DEFINE_string("forget_classes", None,
                    "Forget each of these classes alone (comma list, or 'all'); default: "
                    "the table's --forget_class request.")  # fmt: skip
FLAGS = flags.FLAGS

# This entry point's own choice, on every table (its flags are defined with LeNet's DEFAULTS).
ENTRY_DEFAULTS = {"compare_retrain": True}
TABLES = {
    "lenet": dict(dataset="mnist", defaults=mnist_lenet.DEFAULTS, sweep_row="L1"),
    "cifar": dict(dataset="cifar10", defaults=cifar_ship.DEFAULTS, sweep_row="C1"),
}
# Goals of issue 7 per dataset, counted in forgetting.md (share of requests that meet each).
GOALS = {
    "mnist": [fr.Goal("forget_acc", "max", 1.0), fr.Goal("retain_acc", "above_retrained", 0.5),
              fr.Goal("mia_svc", "near_retrained", 2.0),
              fr.Goal("probe_recovery", "below_retrained", 5.0)],
    "cifar10": [fr.Goal("forget_acc", "max", 5.0), fr.Goal("retain_acc", "above_retrained", 2.0),
                fr.Goal("mia_svc", "near_retrained", 3.0),
                fr.Goal("mia_entropy", "near_retrained", 3.0),
                fr.Goal("probe_recovery", "below_retrained", 10.0), fr.Goal("", "cost", 0.10)],
}  # fmt: skip


def shares_importance(row_cfg: ExperimentConfig, cfg: ExperimentConfig) -> bool:
    keys = ("importance_data", "importance_fraction", "granularity", "include", "exclude",
            "include_bn", "importance_score", "selective_beta", "retain_sample_size",
            "topk_budget")  # fmt: skip
    return (
        row_cfg.selection == "topk"
        and not row_cfg.reestimate
        and all(getattr(row_cfg, k) == getattr(cfg, k) for k in keys)
    )


def shares_calibration(row_cfg: ExperimentConfig, cfg: ExperimentConfig) -> bool:
    """Does the row take the table's sweep (same score and ceiling), or make its own?"""
    keys = ("importance_score", "selective_beta", "retain_sample_size", "sweep_forget_max")
    return all(getattr(row_cfg, k) == getattr(cfg, k) for k in keys)


def table_configs(
    name: str,
) -> tuple[ExperimentConfig, dict[str, ExperimentConfig], list[int], list[list[int]]]:
    """The table's config, every row's config, the seeds and the forget requests, validated."""
    spec_t = TABLES[name]
    cfg = common.config_from_flags(spec_t["dataset"], {**spec_t["defaults"], **ENTRY_DEFAULTS})
    if cfg.row is not None:
        raise ValueError("--preset does not apply to reproduce; use --rows")
    # Results per table; base models, retrained models and importance shared by every entry
    # point that is given the same --workdir.
    cfg = dataclasses.replace(cfg, workdir=str(pathlib.Path(FLAGS.workdir) / name),
                              cache_dir=cfg.cache_dir or FLAGS.workdir,
                              calibrate=cfg.calibrate and FLAGS.sweep)  # fmt: skip
    rows = FLAGS.rows.split(",") if FLAGS.rows else list(presets.TABLES[name])
    for row in rows:
        if row not in presets.TABLES[name]:
            raise ValueError(f"--rows: {row!r} is not in table {name} ({presets.TABLES[name]})")
    seeds = common.parse_seeds(FLAGS.seeds)
    requests = common.forget_class_list(spec_t["dataset"], FLAGS.forget_classes, cfg.forget_class)
    return cfg, {row: row_config(cfg, row, seeds[0], requests) for row in rows}, seeds, requests


def row_config(
    cfg: ExperimentConfig, row: str, seed: int, requests: list[list[int]] | None = None
) -> ExperimentConfig:
    """A row's config; with several forget requests the run name carries the class too."""
    name = f"{row}-seed{seed}"
    del requests  # the run name carries the class whenever --forget_classes is given
    if FLAGS.forget_classes:
        classes = "+".join(data.class_names(cfg.dataset)[c] for c in cfg.forget_class)
        name = f"{row}-{classes}-seed{seed}"
    return common.validate_config(
        dataclasses.replace(common.apply_preset(cfg, row), seed=seed, row=row, run_name=name)
    )


def calibrate_request(cfg, sweep_row, model, params, bs, train_split, imp, spec) -> dict:
    """The table's sweep (its no-fine-tune row's lambda and T) for one request."""
    settings = common.apply_preset(cfg, sweep_row)
    sweep = common.calibrate_decay(
        dataclasses.replace(cfg, lam=settings.lam, decay_steps=settings.decay_steps),
        model, params, bs, train_split, imp, spec,
    )  # fmt: skip
    return {"row": sweep_row, **sweep}


def run_table(name: str, cfg: ExperimentConfig, rows: list[str], seeds: list[int],
              requests: list[list[int]]) -> dict:  # fmt: skip
    spec_t = TABLES[name]
    table_dir = pathlib.Path(cfg.workdir)
    sweep_allowed = FLAGS.sweep and not (FLAGS["top_k"].present or FLAGS["dt"].present)
    per_row: dict[str, list[dict]] = {r: [] for r in rows}
    sweep_path = table_dir / "sweep.json"
    sweeps = result_files.read_json(sweep_path) if sweep_path.exists() else {}
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        train_split, test_split, model, params, bs, base = common.prepare_base(seed_cfg)
        for classes in requests:
            req = dataclasses.replace(seed_cfg, forget_class=classes)
            req_name = "+".join(data.class_names(cfg.dataset)[c] for c in classes)
            # The base model's accuracies split by this request's forget classes.
            base = {**base}
            base["acc"], base["per_class"] = common.accuracies(model, params, bs, req,
                                                               train_split, test_split)  # fmt: skip
            imp, sweep = None, None
            row_cfgs = {r: row_config(req, r, seed, requests) for r in rows}
            finished = {r: common.existing_result(c) for r, c in row_cfgs.items()}
            sweep = recorded_sweep(
                sweeps.get(f"{req_name}-seed{seed}"),
                finished.values(),
                [shares_calibration(c, req) for c in row_cfgs.values()],
            )
            if sweep is not None:  # every row finished with this sweep: nothing to redo
                logging.info("Every row of forget %s, seed %d is finished", req_name, seed)
            elif any(shares_importance(c, req) for c in row_cfgs.values()):
                spec = common.unit_spec(req, params)
                imp = common.compute_importance(req, model, params, bs, train_split, spec)
                if sweep_allowed:
                    sweep = calibrate_request(req, spec_t["sweep_row"], model, params, bs,
                                              train_split, imp, spec)  # fmt: skip
                    req = dataclasses.replace(req, **sweep["chosen"])
                    sweeps[f"{req_name}-seed{seed}"] = sweep
                    result_files.write_json_atomic(sweep_path, sweeps)
                k = decay.resolve_k(req.top_k, spec.num_units)
                title = f"{name}: accuracy drop per unit ({req_name}, seed {seed})"
                plot_path = table_dir / f"importance-{req_name}-seed{seed}.png"
                plots.plot_importance(imp.accuracy_drop, k, plot_path, title=title)
            for row in rows:
                row_cfg = row_config(req, row, seed, requests)
                result = finished[row]
                if result is not None:
                    logging.info("Skipping row %s, forget %s, seed %d: finished in %s", row,
                                 req_name, seed, common.run_dir(row_cfg))  # fmt: skip
                else:
                    logging.info("Row %s, forget %s, seed %d", row, req_name, seed)
                    shared = imp if shares_importance(row_cfg, req) else None
                    own = not shares_calibration(row_cfg, req)  # None: run_one sweeps
                    result = common.run_one(row_cfg, model, params, bs, base, train_split,
                                            test_split, precomputed=shared,
                                            calibration=None if own else sweep)  # fmt: skip
                per_row[row].append(result)
                write_summary(name, table_dir, per_row, partial=True)
            path = table_dir / f"tradeoff-{req_name}-seed{seed}.png"
            title = f"{name}: forget {req_name}, seed {seed} (training split)"
            plot_tradeoff(sweep, [per_row[r][-1] for r in rows], path, title)
    write_summary(name, table_dir, per_row, partial=False)
    return {"rows": per_row, "sweeps": sweeps}


def recorded_sweep(sweep: dict | None, results, shared) -> dict | None:
    """A request's saved sweep, if every row's result is finished and every calibrated row
    that shares the table's sweep (``shared``, per result) used it (same points), else None
    (the sweep is then made again)."""
    results = list(results)
    if sweep is None or any(r is None for r in results):
        return None
    used = [r["calibration"]["points"] for r, s in zip(results, shared, strict=True)
            if s and r.get("calibration")]  # fmt: skip
    return sweep if used and all(u == sweep["points"] for u in used) else None


def plot_tradeoff(sweep: dict | None, results: list[dict], path: pathlib.Path,
                  title: str) -> None:  # fmt: skip
    """Forget-retain trade-off on the training split: the table's sweep (if any) and each
    row's own sweep, before fine-tuning, and for each row that checked points through its
    fine-tuning, those points after it (stars: the points the rules chose; dashed line: the
    table's ceiling, else the first row's)."""
    point = lambda p, after="": (p["forget_train_acc" + after], p["retain_train_acc" + after])
    # Points that do not silence the class carry no retain accuracy (see calibrate).
    scored = lambda s: [point(p) for p in s["points"] if p["retain_train_acc"] is not None]
    chosen_point = lambda s: point(calibrate.choose(s["points"], s["forget_max"]))
    curves, chosen = {}, {}
    if sweep is not None:
        curves["decay only (sweep)"] = scored(sweep)
        chosen["decay only (sweep)"] = chosen_point(sweep)
    for result in results:
        calib = result.get("calibration") or {}
        if calib and (sweep is None or calib["points"] != sweep["points"]):
            label = f"{result['row']}: decay only (its own sweep)"
            curves[label], chosen[label] = scored(calib), chosen_point(calib)
        if calib.get("tried"):
            label = f"{result['row']}: after its fine-tuning"
            curves[label] = [point(p, "_after") for p in calib["tried"]]
            chosen[label] = point(calib["chosen_point"], "_after")
    ceilings = [s["forget_max"] for s in (sweep, *(r.get("calibration") for r in results)) if s]
    if curves:
        plots.plot_tradeoff(curves, path, title=title, chosen=chosen,
                            forget_max=ceilings[0])  # fmt: skip


def summarize_table(name: str, cfg: ExperimentConfig, rows: list[str], seeds: list[int],
                    requests: list[list[int]]) -> None:  # fmt: skip
    """``--summarize_only``: summaries and plots from the finished rows found on disk."""
    table_dir = pathlib.Path(cfg.workdir)
    per_row: dict[str, list[dict]] = {r: [] for r in rows}
    missing = 0
    for seed in seeds:
        for classes in requests:
            req = dataclasses.replace(cfg, seed=seed, forget_class=classes)
            row_cfgs = {r: row_config(req, r, seed, requests) for r in rows}
            found = {r: common.existing_result(c) for r, c in row_cfgs.items()}
            missing += sum(r is None for r in found.values())
            for row, result in found.items():
                if result is not None:
                    per_row[row].append(result)
            done = {r: v for r, v in found.items() if v is not None and v.get("calibration")}
            if done:
                req_name = "+".join(data.class_names(cfg.dataset)[c] for c in classes)
                path = table_dir / f"tradeoff-{req_name}-seed{seed}.png"
                title = f"{name}: forget {req_name}, seed {seed} (training split)"
                table = [v["calibration"] for r, v in done.items()
                         if shares_calibration(row_cfgs[r], req)]  # fmt: skip
                plot_tradeoff(table[0] if table else None, list(done.values()), path, title)
    logging.info("Summarizing %d finished rows (%d missing)",
                 sum(map(len, per_row.values())), missing)  # fmt: skip
    write_summary(name, table_dir, {r: v for r, v in per_row.items() if v}, partial=missing > 0)


def aggregate(results: list[dict]) -> dict:
    """One row's result; with several seeds, the first plus ``seeds`` (per-seed finals)."""
    out = dict(results[0])
    if len(results) > 1:
        out["seeds"] = [{**r["final"], "finetune_batches": r["finetune_batches"]} for r in results]
    return out


def write_summary(name: str, table_dir: pathlib.Path, per_row: dict, partial: bool) -> None:
    results = [aggregate(rs) for rs in per_row.values() if rs]
    base = reference.REFERENCE_BASE.get(name)
    done = [r for rs in per_row.values() for r in rs]
    requests = {(tuple(r["config"]["forget_class"]), r["config"]["seed"]) for r in done}
    title = f"{name} table ({len(requests)} request(s): forget classes x seeds)"
    if partial:
        title += " (PARTIAL: run not finished)"
    result_files.write_json_atomic(table_dir / "summary.json",
                             {"table": name, "partial": partial, "results": results})  # fmt: skip
    result_files.write_text_atomic(
        table_dir / "summary.md", summary.summary_markdown(results, title, base)
    )
    plots.plot_history(results, table_dir / "history.png", partial=partial)
    plots.plot_bars(results, table_dir / "bars.png", partial=partial)
    if any(r.get("retrained") for r in done):
        dataset = TABLES[name]["dataset"]
        text = fr.forgetting_markdown(done, f"{name}: forgetting quality", GOALS[dataset],
                                      partial=partial)  # fmt: skip
        result_files.write_text_atomic(table_dir / "forgetting.md", text)
        result_files.write_json_atomic(table_dir / "forgetting.json", {"partial": partial,
                                 "results": done})  # fmt: skip
        names = data.class_names(dataset)
        for metric in ("forget_acc", "retain_acc", "mia_svc", "probe_recovery"):
            fr.plot_per_class(done, names, table_dir / f"per_class-{metric}.png", metric)


def main(argv):
    del argv
    start = time.perf_counter()
    names = ["lenet", "cifar"] if FLAGS.table == "all" else [FLAGS.table]
    with common.bad_input():  # every table's settings are checked before any training
        tables = {name: table_configs(name) for name in names}
    for table in tables.values():
        if not FLAGS.summarize_only:
            common.check_data(table[0])  # every table's data, before any training
    for name, (cfg, row_cfgs, seeds, requests) in tables.items():
        common.RESUME_NOTE["text"] = (
            f"finished rows are kept in {cfg.workdir} (summary and plots marked PARTIAL); "
            "rerun the same command to resume: finished rows are skipped and the base model "
            "and importance are reused."
        )
        if FLAGS.summarize_only:
            summarize_table(name, cfg, list(row_cfgs), seeds, requests)
        else:
            run_table(name, cfg, list(row_cfgs), seeds, requests)
        print((pathlib.Path(cfg.workdir) / "summary.md").read_text())
        forgetting_md = pathlib.Path(cfg.workdir) / "forgetting.md"
        if forgetting_md.exists():
            print(forgetting_md.read_text())
    logging.info("reproduce done in %.1f s on %s", time.perf_counter() - start, jax.devices()[0])


if __name__ == "__main__":
    common.define_flags(**{**mnist_lenet.DEFAULTS, **ENTRY_DEFAULTS})
    app.run(main)
