"""Forget-retain trade-off of the importance scores, on the training split.

    python -m experiments.tradeoff --dataset=mnist --forget_classes=0,7 --seeds=0
    python -m experiments.tradeoff --dataset=cifar10 --forget_classes=ship --compute_dtype=bfloat16

For each request (forget class x seed) and each score of ``--scores`` (``forget``: the
accuracy drop on the forget sample; ``selective``: minus ``--selective_beta`` x the drop on a
retain sample; ``ratio``: the forget loss increase per retain loss increase), decays the
top-K units for every (K, dt) of the calibration grid (``--sweep_top_k`` x ``--sweep_dt``,
the table's no-fine-tune lambda and T) and scores forget- and retain-train accuracy, as
``tdu_jax.calibrate.sweep_decay`` does. Writes
``<workdir>/tradeoff/tradeoff.json`` and ``tradeoff-<class>-seed<s>.png`` (one series per
score, its Pareto front, and the point the calibration rule picks). Nothing looks at test data.
"""

import dataclasses
import pathlib

from absl import app, flags, logging

from experiments import cifar_ship, common, mnist_lenet
from tdu_jax import data, plots, result_files, selective

flags.DEFINE_enum("dataset", "mnist", list(data.DATASETS), "Dataset (and its model defaults).")
flags.DEFINE_string("forget_classes", None,
                    "Comma list of classes, each forgotten alone, or 'all' (default: "
                    "--forget_class).")  # fmt: skip
flags.DEFINE_string("seeds", "0", "Comma list of seeds.")
flags.DEFINE_string("scores", "forget,selective", "Comma list of importance scores to compare.")
FLAGS = flags.FLAGS

SWEEP_ROW = {"mnist": "L1", "cifar10": "C1"}  # the table's no-fine-tune row: its lambda and T


def parse_scores(text: str) -> list[str]:
    scores = text.split(",")
    for score in scores:
        if score not in selective.IMPORTANCE_SCORES:
            raise ValueError(f"--scores: {score!r} is not one of "
                             f"{', '.join(selective.IMPORTANCE_SCORES)}")  # fmt: skip
    return scores


def main(argv):
    del argv
    defaults = mnist_lenet.DEFAULTS if FLAGS.dataset == "mnist" else cifar_ship.DEFAULTS
    with common.bad_input():
        cfg = common.config_from_flags(FLAGS.dataset, defaults)
        # The no-fine-tune row's lambda and T (not its score or ceiling: those are what the
        # curves compare); explicit flags win, as with --preset.
        row = common.apply_preset(cfg, SWEEP_ROW[FLAGS.dataset])
        cfg = dataclasses.replace(cfg, lam=row.lam, decay_steps=row.decay_steps)
        scores = parse_scores(FLAGS.scores)
        requests = common.forget_class_list(cfg.dataset, FLAGS.forget_classes, cfg.forget_class)
        seeds = common.parse_seeds(FLAGS.seeds)
    common.check_data(cfg)
    out_dir = pathlib.Path(cfg.workdir) / "tradeoff"
    out: dict[str, dict] = {}
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        train_split, _, model, params, bs, _ = common.prepare_base(seed_cfg)
        spec = common.unit_spec(seed_cfg, params)
        for classes in requests:
            name = "+".join(data.class_names(cfg.dataset)[c] for c in classes)
            curves, chosen, sweeps = {}, {}, {}
            for score in scores:
                req = dataclasses.replace(seed_cfg, forget_class=classes, importance_score=score)
                imp = common.compute_importance(req, model, params, bs, train_split, spec)
                sweep = common.calibrate_decay(req, model, params, bs, train_split, imp, spec,
                                               retain_all_points=True)  # fmt: skip
                beta = f" (beta {req.selective_beta:g})" if score == "selective" else ""
                label = score + beta
                point = lambda p: (p["forget_train_acc"], p["retain_train_acc"])
                curves[label] = [point(p) for p in sweep["points"]]
                chosen[label] = point(sweep["chosen_point"])
                sweeps[score] = sweep
                logging.info("%s, seed %d, %s: chose %s", name, seed, score, sweep["chosen_point"])
            out[f"{name}-seed{seed}"] = sweeps
            result_files.write_json_atomic(out_dir / "tradeoff.json", out)
            plots.plot_tradeoff(
                curves, out_dir / f"tradeoff-{name}-seed{seed}.png", chosen=chosen,
                title=f"{cfg.model}: forget {name}, seed {seed}, decay only (training split)",
                forget_max=cfg.sweep_forget_max,
            )  # fmt: skip
    print(f"wrote {out_dir / 'tradeoff.json'} and its plots")


if __name__ == "__main__":
    common.define_flags(**mnist_lenet.DEFAULTS)
    app.run(main)
