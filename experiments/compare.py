"""Compare unlearning methods on one harness: same base model, data, metrics and gold standard.

    python -m experiments.compare --dataset=mnist --forget_classes=0,7 --seeds=0,1,2
    python -m experiments.compare --dataset=cifar10 --forget_classes=ship \\
        --methods=decay,ft,ga,neggrad_plus,rl,l1_sparse,ssd,salun,scrub,retrain \\
        --seeds=0,1,2 --compute_dtype=bfloat16          # GPU
    python -m experiments.compare --dataset=mnist --forget_classes=3 --seeds=0 \\
        --max_train_examples=2000 --max_test_examples=500 --train_epochs=1   # CPU smoke

Per seed one base model (trained once, reused from <workdir>/base, which the other entry
points given the same --workdir share, like the retrained models and importance); per
(method, forget class, seed) one cell ``<workdir>/compare/<method>-<class>-seed<seed>/
result.json`` with the method's wall seconds and gradient steps and every forgetting
metric of experiments/gold.py beside the retrained model's (the ``retrain`` cell *is* the
gold standard). Rerunning skips finished cells. Writes compare.json, compare.md and plots:
forget vs retain accuracy with the retrained point, MIA bars, cost bars.

Hyper-parameters: each method's documented defaults (tdu_jax/methods), scaled to the
dataset (``method_configs``); ``decay`` sizes K and dt per request on the training split
(``--calibrate``, on by default) with lambda, T and fine-tuning of ``--preset`` (default: the
after-each-step row, L4 on MNIST and C7 on CIFAR-10). With ``--tune`` each peer's main knob
(SSD's alpha, otherwise the learning rate) is scaled by the factor that does best on a
validation split of the first request: the ``--tune_grid`` factors, then
``--tune_search_steps`` geometric bisections where the outcome turns; runs that diverge (NaN
parameters) are never chosen. Saved in tuning.json with its grid, then frozen; each tuning run
is saved as it finishes, so an interrupted --tune resumes.
"""

import dataclasses
import math
import pathlib
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import cifar_ship, common, gold, mnist_lenet
from experiments.config import ExperimentConfig
from tdu_jax import calibrate, checkpoint, data, methods, metrics, plots, result_files, train
from tdu_jax import forgetting_report as fr
from tdu_jax.methods import finetune, ours, salun, scrub, ssd

flags.DEFINE_enum("dataset", "mnist", list(data.DATASETS), "Dataset (and its model defaults).")
flags.DEFINE_string("methods", ",".join(methods.METHODS), "Comma list of methods.")
flags.DEFINE_string("forget_classes", None, "Comma list of classes, each forgotten alone "
                    "(default: the dataset's --forget_class); 'all' for every class.")  # fmt: skip
flags.DEFINE_string("seeds", "0", "Comma list of seeds.")
flags.DEFINE_bool(
    "tune",
    False,
    "Choose each peer method's main knob by one sweep on a "
    "validation split carved from train (first class and seed), then freeze it.",
)
flags.DEFINE_float("val_fraction", 0.1, "Share of the training split held out for --tune.")
flags.DEFINE_string("tune_grid", "0.01,0.1,1,10,100",
                    "--tune: comma list of factors applied to each peer's main knob "
                    "(SSD's alpha, otherwise the learning rate).")  # fmt: skip
flags.DEFINE_integer("tune_search_steps", 3,
                     "--tune: geometric bisections between the grid factors where the "
                     "rule's outcome turns (0: the grid only).")  # fmt: skip
FLAGS = flags.FLAGS


def method_configs(cfg: ExperimentConfig, retain_size: int) -> dict:
    """Each method's config for this dataset: the documented defaults, with the dataset's
    batch size, augmentation and (for decay and retrain) the entry point's settings."""
    aug, batch = cfg.augment, 256
    ucfg = common.unlearn_config(cfg, retain_size)._replace(evaluate_each_step=False)
    return {
        "retrain": ours.RetrainConfig(optimizer=common.base_optimizer(cfg),
                                      epochs=cfg.train_epochs,
                                      batch_size=cfg.train_batch_size, augment=aug),
        "decay": ours.DecayConfig(
            unlearn=ucfg, importance_fraction=cfg.importance_fraction,
            retain_sample_size=cfg.retain_sample_size, calibrate=cfg.calibrate,
            sweep_top_k=cfg.sweep_top_k, sweep_dt=cfg.sweep_dt,
            sweep_forget_max=cfg.sweep_forget_max, sweep_search_steps=cfg.sweep_search_steps,
            sweep_retain_size=cfg.sweep_retain_sample, sweep_forget_size=cfg.sweep_forget_sample,
            calibrate_finetune=cfg.calibrate_finetune, dt_margin=cfg.sweep_dt_margin,
            dt_guard=cfg.sweep_dt_guard),
        "ft": finetune.FTConfig(batch_size=batch, augment=aug),
        "ga": finetune.GAConfig(batch_size=batch, augment=aug),
        "neggrad_plus": finetune.NegGradPlusConfig(batch_size=batch, augment=aug),
        "rl": finetune.RLConfig(batch_size=batch, augment=aug),
        "l1_sparse": finetune.L1SparseConfig(batch_size=batch, augment=aug),
        "ssd": ssd.SSDConfig(),
        "salun": salun.SalUnConfig(batch_size=batch, augment=aug),
        "scrub": scrub.ScrubConfig(augment=aug),
    }  # fmt: skip


# This entry point's own choice, on every dataset (its flags are defined with LeNet's DEFAULTS).
ENTRY_DEFAULTS = {"compare_retrain": True}

# --tune: each peer's main knob times the --tune_grid factors (decay sizes itself by
# calibration). The default spans four decades: the peers' CIFAR defaults are off by more than
# 3x on LeNet in both directions (BUILD_NOTES, "Methods on one harness"). A decade grid can
# step over a method's useful range (gradient ascent goes from doing nothing to diverging
# within one decade), so --tune_search_steps bisects where the outcome turns, as the decay's
# own calibration bisects dt.
TUNE_FORGET_MAX = 5.0  # percent: the calibration rule's ceiling, on validation data


def diverged(params) -> bool:
    """True when any parameter is NaN or infinite (a run that blew up)."""
    return not all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(params))


def _outcome(point: dict) -> str:
    if point.get("diverged"):
        return "diverged"
    return "ok" if point["forget_train_acc"] <= TUNE_FORGET_MAX else "fail"


def choose_tuned(points: list[dict]) -> dict:
    """The calibration rule over the points that did not diverge (all of them if every one
    did): the highest validation retain accuracy with forget <= TUNE_FORGET_MAX, else the
    lowest forget accuracy."""
    finite = [p for p in points if not p.get("diverged")]
    if not finite:
        return min(points, key=lambda p: abs(math.log(p["factor"])))  # nearest the default
    return calibrate.choose(finite, TUNE_FORGET_MAX)


def next_factor(points: list[dict]) -> float | None:
    """The geometric midpoint of the neighbouring factors where the rule's outcome turns.

    With a point under the ceiling ("ok"): between the chosen point and a neighbour over it
    ("fail"), where a gentler setting may keep more retain accuracy; where "ok" neighbours tie
    with the chosen point's retain accuracy (SSD at small alpha dampens everything alike),
    from the last of that plateau instead (the lower side first). With none:
    between a failing point and a diverged neighbour, where a stronger setting may still be
    stable. None when there is no such pair (e.g. every point fails and none diverged).
    """
    ordered = sorted(points, key=lambda p: p["factor"])
    outcomes = [_outcome(p) for p in ordered]
    if "ok" in outcomes:
        low = high = ordered.index(choose_tuned(points))
        best_retain = ordered[low]["retain_train_acc"]

        def plateau(i: int) -> bool:
            return outcomes[i] == "ok" and ordered[i]["retain_train_acc"] == best_retain

        while low > 0 and plateau(low - 1):
            low -= 1
        while high < len(ordered) - 1 and plateau(high + 1):
            high += 1
        pairs = []
        if low > 0 and outcomes[low - 1] == "fail":
            pairs.append((low - 1, low))
        if high < len(ordered) - 1 and outcomes[high + 1] == "fail":
            pairs.append((high, high + 1))
    else:
        pairs = [(i, i + 1) for i in range(len(ordered) - 1)
                 if {outcomes[i], outcomes[i + 1]} == {"fail", "diverged"}]  # fmt: skip
    if not pairs:
        return None
    below, above = pairs[0]
    return calibrate.geometric_midpoint(ordered[below]["factor"], ordered[above]["factor"])


def scaled(mcfg, factor: float):
    """The config with its main knob times ``factor``: SSD's alpha, otherwise the lr."""
    if isinstance(mcfg, ssd.SSDConfig):
        return mcfg._replace(alpha=mcfg.alpha * factor)
    opt = mcfg.optimizer
    return mcfg._replace(optimizer=opt._replace(learning_rate=opt.learning_rate * factor))


def parse_tune_grid(text: str) -> tuple[float, ...]:
    """--tune_grid's factors, each > 0."""
    grid = common.parse_number_list("tune_grid", text)
    if not all(f > 0 for f in grid):
        raise ValueError(f"--tune_grid must be a comma list of factors > 0; got {text!r}")
    return grid


def check_tuning_grid(path: pathlib.Path, grid: tuple[float, ...], search_steps: int) -> None:
    """A saved tuning made with another grid or search is not reused silently (a tuning saved
    before the search existed counts as --tune_search_steps=0)."""
    if search_steps < 0:
        raise ValueError(f"--tune_search_steps must be >= 0; got {search_steps}")
    if not path.exists():
        return
    saved = result_files.read_json(path)
    if saved.get("grid") is not None and tuple(saved["grid"]) != grid:
        raise ValueError(f"--tune_grid={','.join(f'{f:g}' for f in grid)} differs from the "
                         f"grid {saved['grid']} of the saved tuning {path}; pass that grid, or "
                         "move the file away to tune anew")  # fmt: skip
    if saved.get("search_steps", 0) != search_steps:
        raise ValueError(f"--tune_search_steps={search_steps} differs from the saved tuning "
                         f"{path} ({saved.get('search_steps', 0)}); pass that, or move the "
                         "file away to tune anew")  # fmt: skip


def tune(cfg, names, configs, model, params, bs, train_split, val_fraction: float,
         grid: tuple[float, ...], runs_dir: pathlib.Path,
         search_steps: int = 0) -> dict:  # fmt: skip
    """One sweep per peer method on a validation split carved from the training data.

    The method runs on the rest of the training split; each grid point is scored by forget
    and retain accuracy on the held-out part, ``search_steps`` more factors are tried where
    the outcome turns (``next_factor``), and one is chosen by the calibration rule (highest
    retain accuracy with forget accuracy <= TUNE_FORGET_MAX, else lowest forget accuracy)
    among the runs that did not diverge. Test data is never used. Each scored point is saved
    at once in ``runs_dir/tuning-runs-<hash of request, seed, grid, split>.json``, so an interrupted
    sweep resumes where it stopped (a method whose config changed is run again).
    Returns {method: {"factor", "points"}}.
    """
    header = {"request": list(cfg.forget_class), "seed": cfg.seed, "grid": list(grid),
              "val_fraction": val_fraction,
              "base": checkpoint.config_key(common.base_config(cfg))}  # fmt: skip
    runs_path = runs_dir / f"tuning-runs-{checkpoint.config_key(header)}.json"
    done = result_files.read_json(runs_path)["points"] if runs_path.exists() else {}
    n_val = max(1, int(round(val_fraction * train_split.size)))
    order = np.random.default_rng(cfg.seed).permutation(train_split.size)
    fit = data.Split(train_split.images[order[n_val:]], train_split.labels[order[n_val:]])
    val = data.Split(train_split.images[order[:n_val]], train_split.labels[order[:n_val]])
    forget, retain = data.forget_retain(fit, cfg.forget_class)
    data_in = methods.MethodData(forget, retain, cfg.forget_class,
                                 data.num_classes(cfg.dataset))  # fmt: skip

    def score_point(name: str, factor: float) -> dict:
        saved = done[name]["points"].get(f"{factor:g}")
        if saved is not None and "diverged" in saved:  # older records lack the flag
            logging.info("tune %s x%g: saved in %s", name, factor, runs_path.name)
            return saved
        key = jax.random.key(cfg.seed)
        result = methods.run_method(name, model, params, bs, data_in, key,
                                    scaled(configs[name], factor), dataset=cfg.dataset)  # fmt: skip
        # Validation accuracies under the names calibrate.choose reads.
        point = {"factor": factor, "forget_train_acc": None, "retain_train_acc": None,
                 "diverged": diverged(result.params)}  # fmt: skip
        if not point["diverged"]:
            pred = metrics.predict(model, result.params, result.batch_stats, val.images,
                                   dataset=cfg.dataset)  # fmt: skip
            acc = metrics.forget_retain_accuracy(pred, val.labels, cfg.forget_class)
            point.update(forget_train_acc=acc["forget_acc"], retain_train_acc=acc["retain_acc"])
        logging.info("tune %s x%g: %s", name, factor, point)
        done[name]["points"][f"{factor:g}"] = point
        result_files.write_json_atomic(runs_path, {**header, "points": done})
        return point

    chosen = {}
    for name in names:
        if name in ("decay", "retrain"):
            continue
        method_record = result_files.to_jsonable(configs[name]._asdict())
        if done.get(name, {}).get("config") != method_record:
            done[name] = {"config": method_record, "points": {}}
        points = [score_point(name, factor) for factor in grid]
        for _ in range(search_steps):
            factor = next_factor(points)
            if factor is None or any(p["factor"] == factor for p in points):
                break
            points.append(score_point(name, factor))
        chosen[name] = {"factor": choose_tuned(points)["factor"], "points": points}
    return chosen


def cell_dir(cfg: ExperimentConfig, method: str, classes: list[int], seed: int) -> pathlib.Path:
    name = "+".join(data.class_names(cfg.dataset)[c] for c in classes)
    return pathlib.Path(cfg.workdir) / f"{method}-{name}-seed{seed}"


def run_cell(cfg, method, mcfg, model, params, bs, train_split, test_split) -> dict:
    """One method on one request: run it, then the forgetting report against retrained.

    A run whose parameters turn NaN or infinite is recorded with ``info.diverged`` and no
    final metrics (the attacks cannot be fitted on NaN outputs); tables count it apart.
    """
    forget, retain = data.forget_retain(train_split, cfg.forget_class)
    refs = gold.reference_metrics(cfg, model, params, bs, train_split, test_split)
    if method == "retrain":
        final = dict(refs["retrained"])
        seconds = final["train_seconds"]
        steps = int(np.ceil(retain.size / mcfg.batch_size)) * mcfg.epochs
        info = {"seconds": seconds, "gradient_steps": steps, "retain_batches": steps}
        out = {"final": final, **gold.against_references(refs, final, seconds)}
    else:
        data_in = methods.MethodData(forget, retain, cfg.forget_class,
                                     data.num_classes(cfg.dataset))  # fmt: skip
        key = jax.random.fold_in(jax.random.key(cfg.seed), 11)
        start = time.perf_counter()
        result = methods.run_method(method, model, params, bs, data_in, key, mcfg,
                                    dataset=cfg.dataset)  # fmt: skip
        info = {k: v for k, v in result.info.items() if k != "calibration"}
        info["seconds"] = time.perf_counter() - start
        info["diverged"] = diverged(result.params)
        final = {}
        if info["diverged"]:
            logging.warning("%s diverged (NaN or infinite parameters): no metrics", method)
        else:
            final = gold.model_metrics(cfg, model, result.params, result.batch_stats,
                                       train_split, test_split,
                                       refs["retrained"]["forget_predictions"])  # fmt: skip
        out = {"final": final, **gold.against_references(refs, final, info["seconds"])}
        out["calibration"] = result.info.get("calibration")
    return {"row": method, "method": method, "config": common._public(cfg),
            "method_config": result_files.to_jsonable(mcfg._asdict()), "info": info,
            **out}  # fmt: skip


def check_cell_settings(saved: dict, cfg: ExperimentConfig, mcfg, folder: pathlib.Path) -> None:
    """Refuses to reuse a finished cell run with other settings than today's flags give.

    The run's config is compared as ``reproduce`` compares results (``common.resume_key``:
    locations left out, a setting at its generic default counts as absent); the method's
    config (its tuned knob included) must be the same, field by field, a field added since
    the cell ran counting as its default.
    """
    want = result_files.to_jsonable(mcfg._asdict())
    # A field the saved cell lacks was added later: the cell ran at that field's default.
    defaults = result_files.to_jsonable(mcfg._field_defaults)
    got = {**defaults, **(saved.get("method_config") or {})}
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if common.resume_key(saved.get("config") or {}) != common.resume_key(common._public(cfg)):
        was, now = saved.get("config") or {}, common._public(cfg)
        changed += sorted(k for k in (set(was) | set(now)) - set(common.LOCATION_SETTINGS)
                          if result_files.to_jsonable(now.get(k)) != was.get(k))  # fmt: skip
    if changed:
        raise ValueError(
            f"{folder} was run with other settings ({', '.join(changed)}) than these flags "
            "give; use another --workdir, or remove that folder to rerun the cell."
        )


def write_outputs(workdir: pathlib.Path, cells: list[dict], dataset: str, partial: bool) -> None:
    result_files.write_json_atomic(workdir / "compare.json", {"partial": partial, "cells": cells})
    text = fr.forgetting_markdown(cells, f"Methods compared on {dataset}", partial=partial)
    tables = [table_markdown(cells, partial), requests_markdown(cells, dataset), text]
    result_files.write_text_atomic(workdir / "compare.md", "\n".join(tables))
    plot_compare(cells, workdir)


def _objectives(cell: dict) -> tuple[float, float, float] | None:
    """(forget %, -retain %, seconds), all to minimise; None for a diverged run."""
    final = cell.get("final") or {}
    if "forget_acc" not in final or "retain_acc" not in final:
        return None
    return (final["forget_acc"], -final["retain_acc"], cell["info"]["seconds"])


def dominates(a: tuple, b: tuple) -> bool:
    """True when ``a`` is no worse than ``b`` in every objective and better in one."""
    pairs = list(zip(a, b, strict=True))
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_counts(cells: list[dict]) -> dict[str, tuple[int, int]]:
    """Per row (method): (requests where it is on that request's Pareto front, its requests).

    The front is over the methods run on the same (forget classes, seed): lower test forget
    accuracy, higher test retain accuracy, fewer unlearning seconds (retrain: its training
    seconds). A diverged run is never on it.
    """
    requests: dict[tuple, list[dict]] = {}
    for cell in cells:
        cfg = cell.get("config") or {}
        requests.setdefault((tuple(cfg.get("forget_class", ())), cfg.get("seed")), []).append(cell)
    counts: dict[str, tuple[int, int]] = {}
    for group in requests.values():
        points = [_objectives(c) for c in group]
        for cell, point in zip(group, points, strict=True):
            front = point is not None and not any(
                q is not None and dominates(q, point) for q in points
            )
            row = fr.row_name(cell)
            on, total = counts.get(row, (0, 0))
            counts[row] = (on + front, total + 1)
    return counts


def table_markdown(cells: list[dict], partial: bool) -> str:
    """One line per method: means over requests of accuracy, attacks, cost, and how often the
    method is on its request's forget-retain-seconds Pareto front."""
    keys = ("forget_acc", "retain_acc", "mia_svc", "mia_entropy", "forget_entropy_median",
            "probe_recovery", "relearn_steps")  # fmt: skip
    head = ["method", "requests", "diverged", *keys, "entropy fit reversed", "gradient steps",
            "seconds", "cost_ratio", "Pareto front"]  # fmt: skip
    lines = ["## Methods: mean ± std over requests" + (" (PARTIAL)" if partial else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    front = pareto_counts(cells)
    for method, group in fr.group_by_row(cells).items():
        cols = [fr.mean_std(fr.values(group, "final", k)) for k in keys]
        cols.append(fr.reversed_fit_count(group) or "—")
        steps = fr.mean_std(fr.values(group, "info", "gradient_steps"))
        secs = fr.mean_std(fr.values(group, "info", "seconds"))
        cost = fr.mean_std([c["cost_ratio"] for c in group if c.get("cost_ratio") is not None])
        on_front = "{}/{}".format(*front.get(method, (0, 0)))
        n_diverged = sum(bool((c.get("info") or {}).get("diverged")) for c in group)
        lines.append(f"| {method} | {len(group)} | {n_diverged} | " + " | ".join(cols)
                     + f" | {steps} | {secs} | {cost} | {on_front} |")  # fmt: skip
    lines += ["", "Pareto front: on how many of its requests the method is not dominated by "
              "another method of the same request in test forget accuracy (lower), test retain "
              "accuracy (higher) and seconds (fewer; retrain counts its training); diverged "
              "runs never are. Entropy fit reversed: on how many requests SSD's entropy attack "
              "fitted a slope >= 0 (higher entropy -> member), where its mia_entropy is no "
              "evidence; forget_entropy_median (nats) reads the forget images' certainty "
              "directly."]  # fmt: skip
    return "\n".join(lines) + "\n"


def requests_markdown(cells: list[dict], dataset: str) -> str:
    """One line per (forget classes, seed), one column per method: test forget / retain %
    ("diverged" for a run with NaN parameters)."""
    names = data.class_names(dataset)
    methods_seen = list(fr.group_by_row(cells))
    rows: dict[tuple, dict[str, str]] = {}
    for cell in cells:
        cfg = cell.get("config") or {}
        request = ("+".join(names[c] for c in cfg.get("forget_class", ())), cfg.get("seed"))
        point = _objectives(cell)
        text = "diverged" if point is None else f"{point[0]:.2f} / {-point[1]:.2f}"
        rows.setdefault(request, {})[fr.row_name(cell)] = text
    lines = ["## Per request: test forget / retain accuracy (%)", "",
             "| forget | seed | " + " | ".join(methods_seen) + " |",
             "|---|---|" + "---|" * len(methods_seen)]  # fmt: skip
    for (request, seed), by_method in rows.items():
        cols = [by_method.get(m, "—") for m in methods_seen]
        lines.append(f"| {request} | {seed} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(cells: list[dict], workdir: pathlib.Path) -> None:
    groups = fr.group_by_row(cells)
    fig = plots._figure(figsize=(6.0, 4.0), layout="tight")
    ax = fig.add_subplot()
    for method, group in groups.items():
        f = fr.values(group, "final", "forget_acc")
        r = fr.values(group, "final", "retain_acc")
        ax.scatter(f, r, label=method, marker="*" if method == "retrain" else "o")
    ax.set_xlabel("forget accuracy (%)")
    ax.set_ylabel("retain accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    plots._save_figure(fig, workdir / "forget_vs_retain.png")
    names = list(groups)
    for what, source, keys, path in (
        ("MIA (%)", "final", ("mia_svc", "mia_entropy"), "mia.png"),
        ("cost ratio (vs retrain)", None, ("cost_ratio",), "cost.png"),
    ):
        fig = plots._figure(figsize=(max(6.0, 0.8 * len(names)), 3.6), layout="tight")
        ax = fig.add_subplot()
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            heights = []
            for name in names:
                vals = (fr.values(groups[name], source, key) if source else
                        [c[key] for c in groups[name] if c.get(key) is not None])  # fmt: skip
                heights.append(float(np.mean(vals)) if vals else np.nan)
            ax.bar(np.arange(len(names)) + i * width - 0.4 + width / 2, heights, width,
                   label=key)  # fmt: skip
        ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
        plots._save_figure(fig, workdir / path)


def parse_args(cfg: ExperimentConfig) -> tuple[list[str], list[list[int]], list[int]]:
    names = FLAGS.methods.split(",")
    for name in names:
        if name not in methods.METHODS:
            raise ValueError(f"--methods: {name!r} is not one of {', '.join(methods.METHODS)}")
    requests = common.forget_class_list(cfg.dataset, FLAGS.forget_classes, cfg.forget_class)
    seeds = common.parse_seeds(FLAGS.seeds)
    return names, requests, seeds


def main(argv):
    del argv
    defaults = mnist_lenet.DEFAULTS if FLAGS.dataset == "mnist" else cifar_ship.DEFAULTS
    with common.bad_input():
        cfg = common.config_from_flags(FLAGS.dataset, {**defaults, **ENTRY_DEFAULTS})
        if cfg.row is None:  # decay's fine-tuning: the reference's after-each-step row
            cfg = common.validate_config(
                common.apply_preset(cfg, "L4" if FLAGS.dataset == "mnist" else "C7")
            )
        cfg = dataclasses.replace(
            cfg,
            workdir=str(pathlib.Path(cfg.workdir) / "compare"),
            cache_dir=cfg.cache_dir or cfg.workdir,
        )  # shared models
        names, requests, seeds = parse_args(cfg)
        train.validate_optimizer_config(common.base_optimizer(cfg))
        grid = parse_tune_grid(FLAGS.tune_grid)
        workdir = pathlib.Path(cfg.workdir)
        if FLAGS.tune:
            check_tuning_grid(workdir / "tuning.json", grid, FLAGS.tune_search_steps)
    cells = []
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        train_split, test_split, model, params, bs, _ = common.prepare_base(seed_cfg)
        for classes in requests:
            req = dataclasses.replace(seed_cfg, forget_class=classes, compare_retrain=True)
            _, retain = data.forget_retain(train_split, classes)
            configs = method_configs(req, retain.size)
            if FLAGS.tune:
                tuning_path = workdir / "tuning.json"
                if not tuning_path.exists():
                    tuned = tune(req, names, configs, model, params, bs, train_split,
                                 FLAGS.val_fraction, grid, workdir,
                                 FLAGS.tune_search_steps)  # fmt: skip
                    result_files.write_json_atomic(
                        tuning_path,
                        {"request": classes, "seed": seed, "grid": list(grid),
                         "search_steps": FLAGS.tune_search_steps, "chosen": tuned},
                    )  # fmt: skip
                tuned = result_files.read_json(tuning_path)["chosen"]
                configs = {n: scaled(c, tuned[n]["factor"]) if n in tuned else c
                           for n, c in configs.items()}  # fmt: skip
            for name in names:
                path = cell_dir(req, name, classes, seed) / "result.json"
                if path.exists():
                    saved = result_files.read_json(path)
                    with common.bad_input():  # a settings mismatch is the user's to resolve
                        check_cell_settings(saved, req, configs[name], path.parent)
                    logging.info("Skipping finished cell %s", path.parent.name)
                    cells.append(saved)
                    continue
                logging.info("Method %s, forget %s, seed %d", name, classes, seed)
                cell = run_cell(req, name, configs[name], model, params, bs, train_split,
                                test_split)  # fmt: skip
                result_files.write_json_atomic(path, cell)
                cells.append(cell)
                write_outputs(workdir, cells, cfg.dataset, partial=True)
    write_outputs(workdir, cells, cfg.dataset, partial=False)
    print((workdir / "compare.md").read_text())


if __name__ == "__main__":
    common.define_flags(**{**mnist_lenet.DEFAULTS, **ENTRY_DEFAULTS})
    app.run(main)
