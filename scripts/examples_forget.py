"""The examples' own models (examples/: a Linen CNN with BatchNorm and dropout, an NNX CNN, a
pure-function MLP) forget each digit five ways, to see whether ``tdu.forget`` sizes the decay
of models it was never tuned on:

  hand        the example as written (K = 12 filters, λ = 1, Δt = 1, T = 5, 20 fine-tune batches)
  forget_ft   ``tdu.forget`` with the example's config (K and Δt from the sweep, checked through
              the same fine-tuning; 1% forget-train ceiling)
  forget_l1   ``tdu.forget`` decay-only with the library's defaults (``tdu.DECAY_ONLY``: ratio
              score, per-layer budget, 0.5% ceiling), the example's units
  *_spared    the same with ``spare_class_outputs=True``: the digit's own output unit ranked
              last, so the sweep cannot settle for silencing the logit

    python scripts/examples_forget.py --models=linen_cnn,nnx_cnn,function_mlp \\
        --digits=0,1,2,3,4,5,6,7,8,9 --seeds=0 --out=/tmp/examples_forget.jsonl

One JSON line per (model, seed, digit, variant), appended as it finishes (a rerun skips the
lines already there): accuracies in % on the example's evaluation images (the last 2,000 test
images), the chosen K and Δt, the decayed units' layers and seconds.
"""

import argparse
import collections
import json
import pathlib
import time

import jax
import numpy as np

import tdu_jax as tdu
from examples import _mnist, function_mlp, linen_cnn, nnx_cnn
from tdu_jax import units

EXAMPLES = {"linen_cnn": linen_cnn, "nnx_cnn": nnx_cnn, "function_mlp": function_mlp}
VARIANTS = ("hand", "forget_ft", "forget_ft_spared", "forget_l1", "forget_l1_spared")


def layers_of(spec: units.UnitSpec, selected) -> dict:
    """How many of the selected units sit in each layer."""
    names = [units.unit_name(spec, int(i)).split("[")[0] for i in selected]
    return dict(collections.Counter(names))


def variants(model, params, state, train, evaluation, digit, config, seed) -> dict:
    """Each variant's record for one digit (the example's data, model and config)."""
    out = {}
    start = time.perf_counter()
    hand = _mnist.forget_digit(model, params, state, train, evaluation, digit=digit,
                               config=config, sample_size=256, seed=seed, name="hand")  # fmt: skip
    out["hand"] = {**hand["after"], "before": hand["before"], "top_k": config.top_k,
                   "dt": config.dt, "seconds": time.perf_counter() - start}  # fmt: skip
    decay_only = tdu.DECAY_ONLY._replace(
        granularity=config.granularity, bn_pairs=config.bn_pairs, lam=config.lam,
        decay_steps=config.decay_steps, batch_size=config.batch_size,
    )  # fmt: skip
    runs = (("forget_ft", config, False), ("forget_ft_spared", config, True),
            ("forget_l1", decay_only, False), ("forget_l1_spared", decay_only, True))  # fmt: skip
    for name, cfg, spare in runs:
        start = time.perf_counter()
        res = tdu.forget(model, params, state, train=train, forget_classes=(digit,),
                         key=jax.random.key(seed), config=cfg, seed=seed,
                         spare_class_outputs=spare, preprocess=_mnist.preprocess)  # fmt: skip
        acc = tdu.evaluate(model, res.unlearned.params, res.unlearned.batch_stats, evaluation,
                           forget_classes=(digit,), preprocess=_mnist.preprocess)  # fmt: skip
        out[name] = {
            **{k: acc[k] for k in ("forget_acc", "retain_acc", "test_acc")},
            **res.calibration["chosen"], "units": int(res.unlearned.selected.size),
            "layers": layers_of(res.unlearned.spec, res.unlearned.selected),
            "only_class_outputs": res.calibration["only_class_outputs"],
            "chosen_point": res.calibration["chosen_point"],
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
    return out


def trained_example(name: str, digit: int, seed: int) -> dict:
    """The example's trained model, data and config: its ``run`` up to ``forget_digit``."""
    captured = {}

    def capture(model, params, state, train, evaluation, *, config, **_):
        captured.update(model=model, params=params, state=state, train=train,
                        evaluation=evaluation, config=config)  # fmt: skip
        return {}

    original, _mnist.forget_digit = _mnist.forget_digit, capture
    try:
        EXAMPLES[name].run(digit=digit, seed=seed)
    finally:
        _mnist.forget_digit = original
    return captured


def brief(line: dict) -> dict:
    """The line with each variant's forget/retain accuracy only, rounded."""
    keep = ("forget_acc", "retain_acc")
    return {k: {m: round(v[m], 2) for m in keep} if isinstance(v, dict) else v
            for k, v in line.items()}  # fmt: skip


def mean_std(values) -> str:
    """'mean ± sample std' to 2 decimals (std 0 for one value)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{float(np.mean(values)):.2f} ± {std:.2f}"


def summary_markdown(lines: list[dict]) -> str:
    """Per model and variant: requests, forget and retain accuracy (mean ± std), requests
    with forget <= 1%, retain within 1 point of the model before, decayed units (mean) and
    requests that decayed only the digit's own output unit."""
    rows = ["| model | variant | requests | forget % | retain % (before) | forget <= 1 | "
            "retain >= before - 1 | units | only the class's output unit |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in lines):
        group = [r for r in lines if r["model"] == model]
        before = np.array([r["hand"]["before"]["retain_acc"] for r in group])
        for variant in VARIANTS:
            runs = [r[variant] for r in group if variant in r]
            if not runs:
                continue
            forget = np.array([x["forget_acc"] for x in runs])
            retain = np.array([x["retain_acc"] for x in runs])
            units_ = [x.get("units", x.get("top_k")) for x in runs]
            only = sum(bool(x.get("only_class_outputs")) for x in runs)
            rows.append(
                f"| {model} | {variant} | {len(runs)} | {mean_std(forget)} "
                f"| {mean_std(retain)} ({before.mean():.2f}) "
                f"| {(forget <= 1).sum()}/{len(runs)} | {(retain >= before - 1).sum()}/{len(runs)} "
                f"| {np.mean(units_):.1f} | {only}/{len(runs)} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(EXAMPLES))
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="examples_forget.jsonl")
    parser.add_argument("--summarize", action="store_true",
                        help="print the table of --out's lines and stop")  # fmt: skip
    args = parser.parse_args()
    if args.summarize:
        lines = [json.loads(x) for x in pathlib.Path(args.out).read_text().splitlines()]
        print(summary_markdown(lines))
        return
    names = args.models.split(",")
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {', '.join(EXAMPLES)}")
    digits = [int(d) for d in args.digits.split(",")]
    out = pathlib.Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["seed"], r["digit"]))
    for seed in map(int, args.seeds.split(",")):
        for name in names:
            todo = [d for d in digits if (name, seed, d) not in done]
            if not todo:
                continue
            start = time.perf_counter()
            c = trained_example(name, todo[0], seed)
            train_seconds = time.perf_counter() - start
            for digit in todo:
                rec = variants(c["model"], c["params"], c["state"], c["train"], c["evaluation"],
                               digit, c["config"], seed)  # fmt: skip
                line = {"model": name, "seed": seed, "digit": digit,
                        "train_seconds": train_seconds, **rec}  # fmt: skip
                with out.open("a") as f:
                    f.write(json.dumps(line, default=float) + "\n")
                print(json.dumps(brief(line), default=float), flush=True)


if __name__ == "__main__":
    main()
