"""The ResNet base-model recipe, A/B: one change at a time against the table's recipe.

    python -m experiments.base_recipe --compute_dtype=bfloat16            # full width, GPU
    python -m experiments.base_recipe --width=0.25 --train_epochs=8 \\
        --max_train_examples=10000                                        # reduced, CPU
    python -m experiments.base_recipe --variants=baseline --train_epochs=60   # the ceiling

Each variant of ``--variants`` is the CIFAR table's base recipe (``cifar_ship.DEFAULTS`` with
the flags given) plus one change; ``a+b`` combines changes. Every model is trained with the
same seeds (``--seeds``) into the shared base-model cache (``<cache_dir or workdir>/base``),
so a rerun resumes and ``reproduce`` reuses the model of the recipe it runs; an invocation with
other variants or seeds of the same recipe adds its runs to the table. For each variant:
test accuracy, its paired difference to ``baseline`` per seed, test accuracy with test-time
flip (softmax averaged over the image and its mirror; reported beside, never instead), the
last epoch's train accuracy and loss, and training seconds. Writes
``<workdir>/base_recipe/base_recipe.json`` and ``base_recipe.md``.
"""

import dataclasses
import os
import pathlib
import platform

import jax
import numpy as np
from absl import app, flags, logging

from experiments import cifar_ship, common
from tdu_jax import checkpoint, data, metrics, result_files

VARIANTS = {
    "baseline": {},
    "symmetric_padding": {"resnet_padding": "symmetric"},
    "no_decay_norm_bias": {"train_decay_norm_bias": False},
    "label_smoothing": {"train_label_smoothing": 0.1},
    "nesterov": {"train_nesterov": True},
    "cosine": {"train_schedule": "cosine"},
}
FLAGS = flags.FLAGS


def define_flags() -> None:
    """This entry point's flags, then every common one (only when run: importing this module
    for its functions defines nothing)."""
    flags.DEFINE_string("variants", ",".join(VARIANTS),
                        f"Comma list of variants, each one of {', '.join(VARIANTS)} or several "
                        "joined by '+' (all changes at once); baseline always runs.")  # fmt: skip
    flags.DEFINE_string("seeds", "0", "Comma list of seeds; every variant trains on each.")
    common.define_flags(**cifar_ship.DEFAULTS)


def parse_variants(text: str) -> dict[str, dict]:
    """``"baseline,nesterov,a+b"`` -> {name: settings changed}; baseline first, always."""
    out = {"baseline": {}}
    for name in filter(None, text.split(",")):
        changes = {}
        for part in name.split("+"):
            if part not in VARIANTS:
                raise ValueError(f"--variants: {part!r} is not one of {', '.join(VARIANTS)}")
            changes.update(VARIANTS[part])
        out[name] = changes
    return out


def flip_accuracy(model, params, batch_stats, split: data.Split, dataset: str) -> tuple:
    """(test accuracy, test accuracy with test-time flip), percent."""

    def probs(images):
        return jax.nn.softmax(metrics.logits(model, params, batch_stats, images, dataset=dataset))

    plain = probs(split.images)
    mirrored = probs(np.ascontiguousarray(split.images[:, :, ::-1]))
    acc = metrics.accuracy(np.argmax(plain, -1), split.labels)
    return acc, metrics.accuracy(np.argmax(plain + mirrored, -1), split.labels)


def machine() -> str:
    """The accelerator's kind, or the CPU's model name."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.platform} {device.device_kind}"
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else ():
        if line.startswith("model name"):
            return f"cpu {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def train_one(cfg, train_split, test_split) -> dict:
    """Trains (or reuses) ``cfg``'s base model -> its row of measurements."""
    model, params, batch_stats, info = common.get_base_model(cfg, train_split, test_split)
    history = info.get("train_history")
    seconds = info.get("train_seconds")
    if history is None:  # reused: its training record lies beside the checkpoint
        saved = common.training_record(info["checkpoint"])
        history, seconds = saved.get("history") or [{}], saved.get("seconds")
    acc, acc_flip = flip_accuracy(model, params, batch_stats, test_split, cfg.dataset)
    last = history[-1]
    return {"test_acc": acc, "test_acc_flip": acc_flip, "train_acc": last.get("train_acc"),
            "train_loss": last.get("loss"), "train_seconds": seconds,
            "checkpoint": info["checkpoint"], "trained_now": info["trained_now"]}  # fmt: skip


def summarise(rows: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per variant: mean test accuracy (and with flip), std over seeds, and the mean paired
    difference to baseline over the seeds both have."""
    out = {}
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        acc = np.array([by_seed[s]["test_acc"] for s in seeds])
        diffs = [by_seed[s]["test_acc"] - rows["baseline"][s]["test_acc"]
                 for s in seeds if s in rows["baseline"]]  # fmt: skip
        out[name] = {
            "seeds": seeds, "test_acc": float(acc.mean()),
            "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else None,
            "diff_to_baseline": float(np.mean(diffs)) if diffs else None,
            "test_acc_flip": float(np.mean([by_seed[s]["test_acc_flip"] for s in seeds])),
            "train_acc": _mean([by_seed[s]["train_acc"] for s in seeds]),
            "train_seconds": _mean([by_seed[s]["train_seconds"] for s in seeds]),
        }  # fmt: skip
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def markdown(setup: dict, variants: dict[str, dict], summary: dict[str, dict]) -> str:
    def num(v, fmt="{:.2f}"):
        return "—" if v is None else fmt.format(v)

    lines = [
        "# ResNet base recipe, one change at a time",
        "",
        ", ".join(f"{k} {v}" for k, v in setup.items()),
        "",
        "| variant | change | test acc | ± std | vs baseline | with flip | train acc | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        change = ", ".join(f"{k}={v}" for k, v in variants[name].items()) or "—"
        lines.append(
            f"| {name} | {change} | {s['test_acc']:.2f} | {num(s['test_acc_std'])} | "
            f"{num(s['diff_to_baseline'], '{:+.2f}')} | {s['test_acc_flip']:.2f} | "
            f"{num(s['train_acc'])} | {num(s['train_seconds'], '{:.0f}')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    with common.bad_input():
        cfg = common.config_from_flags("cifar10", cifar_ship.DEFAULTS)
        variants = parse_variants(FLAGS.variants)
        seeds = common.parse_seeds(FLAGS.seeds)
        configs = {(name, seed): common.validate_config(
                       dataclasses.replace(cfg, seed=seed, **changes))
                   for name, changes in variants.items() for seed in seeds}  # fmt: skip
        out_dir = pathlib.Path(cfg.workdir) / "base_recipe"
        rows, variants = earlier_runs(out_dir, recipe_key(cfg), variants)
    train_split, test_split = common.load_data(cfg)
    here = machine()
    for (name, seed), vcfg in configs.items():
        logging.info("Variant %s, seed %d: %s", name, seed, variants[name] or "the recipe")
        row = train_one(vcfg, train_split, test_split)
        before = rows.get(name, {}).get(seed, {})
        row["machine"] = here if row.pop("trained_now") else before.get("machine", "unrecorded")
        rows.setdefault(name, {})[seed] = row
        logging.info("Variant %s, seed %d: %s", name, seed, row)
        setup = {
            "model": cfg.model, "width": cfg.width, "epochs": cfg.train_epochs,
            "train images": train_split.size, "test images": test_split.size,
            "dtype": cfg.compute_dtype,
            "seeds": ",".join(map(str, sorted({s for r in rows.values() for s in r}))),
            "trained on": "; ".join(sorted({r["machine"] for v in rows.values()
                                            for r in v.values()})),
        }  # fmt: skip
        summary = summarise(rows)
        result_files.write_json_atomic(out_dir / "base_recipe.json", {
            "recipe_key": recipe_key(cfg), "setup": setup, "variants": variants,
            "summary": summary, "runs": rows, "versions": common.versions()})  # fmt: skip
        result_files.write_text_atomic(out_dir / "base_recipe.md",
                                       markdown(setup, variants, summary))  # fmt: skip
    print(markdown(setup, variants, summarise(rows)))


def recipe_key(cfg) -> str:
    """What makes two invocations' tables one: the recipe and data, every seed alike."""
    record = {k: v for k, v in common.base_config(cfg).items() if k != "seed"}
    return checkpoint.config_key({**record, "max_test_examples": cfg.max_test_examples})


def earlier_runs(out_dir: pathlib.Path, key: str, variants: dict) -> tuple[dict, dict]:
    """The runs an earlier invocation recorded in ``out_dir`` (same recipe: they join this
    table; another recipe: refused, never overwritten), and the variants of both."""
    path = out_dir / "base_recipe.json"
    if not path.is_file():
        return {}, variants
    saved = result_files.read_json(path)
    if saved.get("recipe_key") != key:
        raise ValueError(
            f"{path} holds the A/B of another base recipe or data ({saved.get('setup')}); "
            "use another --workdir, or move that folder away"
        )
    rows = {name: {int(seed): row for seed, row in by_seed.items()}
            for name, by_seed in saved["runs"].items()}  # fmt: skip
    return rows, {**saved["variants"], **variants}


if __name__ == "__main__":
    define_flags()
    app.run(main)
