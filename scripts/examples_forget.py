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

One JSON line per (model, seed, digit), appended as it finishes (a rerun skips the lines
already there): per variant, accuracies in % on the example's evaluation images (the last
2,000 test images), the chosen K and Δt, the decayed units' layers and seconds.

With ``--attacks`` the example is also retrained without the digit (its own ``run``, same
seed and epochs, on its training images minus the digit: the gold standard), and
``tdu.forgetting_metrics`` judges every model on the example's images (its training images
and evaluation images as the train and test splits): the model before (``base``), the
retrained model, the silenced control (``tdu.silence_classes``) and each variant, recorded
under ``"attacks"`` with the JS divergence to the retrained model's forget predictions.
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
from tdu_jax import data, units

EXAMPLES = {"linen_cnn": linen_cnn, "nnx_cnn": nnx_cnn, "function_mlp": function_mlp}
VARIANTS = ("hand", "forget_ft", "forget_ft_spared", "forget_l1", "forget_l1_spared")


def layers_of(spec: units.UnitSpec, selected) -> dict:
    """How many of the selected units sit in each layer."""
    names = [units.unit_name(spec, int(i)).split("[")[0] for i in selected]
    return dict(collections.Counter(names))


def variants(model, params, state, train, evaluation, digit, config, seed,
             names=VARIANTS, judge=None) -> dict:  # fmt: skip
    """Each variant's record for one digit (the example's data, model and config); with
    ``judge(params, state) -> dict``, its attacks too."""
    out = {}
    start = time.perf_counter()
    hand = _mnist.forget_digit(model, params, state, train, evaluation, digit=digit,
                               config=config, sample_size=256, seed=seed, name="hand")  # fmt: skip
    out["hand"] = {**hand["after"], "before": hand["before"], "top_k": config.top_k,
                   "dt": config.dt, "seconds": time.perf_counter() - start}  # fmt: skip
    if judge is not None:
        out["hand"]["attacks"] = judge(*hand["unlearned"])
    decay_only = tdu.DECAY_ONLY._replace(
        granularity=config.granularity, bn_pairs=config.bn_pairs, lam=config.lam,
        decay_steps=config.decay_steps, batch_size=config.batch_size,
    )  # fmt: skip
    runs = (("forget_ft", config, False), ("forget_ft_spared", config, True),
            ("forget_l1", decay_only, False), ("forget_l1_spared", decay_only, True))  # fmt: skip
    for name, cfg, spare in runs:
        if name not in names:
            continue
        start = time.perf_counter()
        res = tdu.forget(model, params, state, train=train, forget_classes=(digit,),
                         key=jax.random.key(seed), config=cfg, seed=seed,
                         spare_class_outputs=spare, preprocess=_mnist.preprocess)  # fmt: skip
        acc = tdu.evaluate(model, res.unlearned.params, res.unlearned.batch_stats, evaluation,
                           forget_classes=(digit,), preprocess=_mnist.preprocess)  # fmt: skip
        out[name] = {
            **{k: acc[k] for k in ("forget_acc", "retain_acc", "test_acc")},
            **res.calibration["chosen"], "dt_margin": res.calibration["dt_margin"],
            "units": int(res.unlearned.selected.size),
            "layers": layers_of(res.unlearned.spec, res.unlearned.selected),
            "only_class_outputs": res.calibration["only_class_outputs"],
            "chosen_point": res.calibration["chosen_point"],
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
        if judge is not None:
            out[name]["attacks"] = judge(res.unlearned.params, res.unlearned.batch_stats)
    return out


def trained_example(name: str, digit: int, seed: int, without: int | None = None) -> dict:
    """The example's trained model, data and config: its ``run`` up to ``forget_digit``.

    With ``without``, that digit's images are taken out of the training images before the
    example trains (the retrained gold standard); ``train`` is then the retain images."""
    captured = {}

    def capture(model, params, state, train, evaluation, *, config, **_):
        captured.update(model=model, params=params, state=state, train=train,
                        evaluation=evaluation, config=config)  # fmt: skip
        return {}

    def load(*args, **kwargs):
        train, evaluation = original_load(*args, **kwargs)
        return data.forget_retain(train, [without])[1], evaluation

    original, _mnist.forget_digit = _mnist.forget_digit, capture
    original_load = _mnist.load
    if without is not None:
        _mnist.load = load
    try:
        EXAMPLES[name].run(digit=digit, seed=seed)
    finally:
        _mnist.forget_digit, _mnist.load = original, original_load
    return captured


def make_judge(name: str, model, train, evaluation, digit: int, seed: int, reference=None):
    """``judge(params, state)``: accuracies on ``evaluation`` and every forgetting metric, on
    the same samples for every model of this (seed, digit)."""
    features_fn = function_mlp.features_fn if name == "function_mlp" else None
    key = jax.random.fold_in(jax.random.key(seed), 7 + digit)

    def judge(params, state) -> dict:
        acc = tdu.evaluate(model, params, state, evaluation, forget_classes=(digit,),
                           preprocess=_mnist.preprocess)  # fmt: skip
        attacks = tdu.forgetting_metrics(
            model, params, state, train=train, test=evaluation, forget_classes=(digit,),
            key=key, reference_predictions=reference, features_fn=features_fn,
            preprocess=_mnist.preprocess,
        )  # fmt: skip
        return {**{k: acc[k] for k in ("forget_acc", "retain_acc", "test_acc")}, **attacks}

    return judge


def references(name: str, c: dict, digit: int, seed: int) -> tuple[dict, object]:
    """The retrained model's, the base model's and the silenced control's records (each
    under ``"attacks"``, as the variants'), and the judge the variants use (JS divergence
    against the retrained model's forget predictions)."""
    start = time.perf_counter()
    r = trained_example(name, digit, seed, without=digit)
    seconds = time.perf_counter() - start
    judge = make_judge(name, c["model"], c["train"], c["evaluation"], digit, seed)
    retrained = {**judge(r["params"], r["state"]), "forget_prediction_js": 0.0}
    judge = make_judge(name, c["model"], c["train"], c["evaluation"], digit, seed,
                       reference=retrained["forget_predictions"])  # fmt: skip
    control = tdu.silence_classes(c["params"], (digit,))
    out = {"retrained": {"attacks": retrained, "train_seconds": seconds},
           "base": {"attacks": judge(c["params"], c["state"])},
           "control": {"attacks": judge(control, c["state"])}}  # fmt: skip
    return out, judge


def brief(line: dict) -> dict:
    """The line with each model's forget/retain accuracy (and, with attacks, `mia_svc`, the
    probe and the relearn steps) only, rounded."""
    keep = ("forget_acc", "retain_acc", "mia_svc", "probe_recovery", "relearn_steps")
    out = {}
    for k, v in line.items():
        if isinstance(v, dict):
            v = {**v, **v.get("attacks", {})}
            v = {m: round(v[m], 2) for m in keep if m in v}
        out[k] = v
    return out


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


def attacks_markdown(lines: list[dict]) -> str:
    """Per model and judged model (base, silenced control, retrained, each variant): forget
    and retain accuracy, `mia_svc` and the probe (mean, and requests within 2 and 10 points of
    the retrained model), relearn steps, the forget images' median entropy and the JS
    divergence of forget predictions to the retrained model (means over requests)."""
    rows = ["| model | judged | requests | forget % | retain % | mia_svc (within 2 of "
            "retrained) | probe % (within 10) | relearn steps | forget entropy (nats) | "
            "JS to retrained (bits) |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in lines):
        group = [r for r in lines if r["model"] == model]
        for judged in ("base", "control", "retrained", *VARIANTS):
            pairs = [(r[judged]["attacks"], r["retrained"]["attacks"]) for r in group
                     if "attacks" in r.get(judged, {})]  # fmt: skip
            if not pairs:
                continue
            a = {k: np.array([x[k] for x, _ in pairs], float) for k in pairs[0][0]
                 if k != "forget_predictions"}  # fmt: skip
            gold = {k: np.array([g[k] for _, g in pairs], float) for k in a}
            mia_near = int((np.abs(a["mia_svc"] - gold["mia_svc"]) <= 2.0).sum())
            probe_near = int((np.abs(a["probe_recovery"] - gold["probe_recovery"]) <= 10.0).sum())
            n = len(pairs)
            rows.append(
                f"| {model} | {judged} | {n} | {mean_std(a['forget_acc'])} "
                f"| {mean_std(a['retain_acc'])} | {a['mia_svc'].mean():.2f} "
                f"({mia_near}/{n}) | {a['probe_recovery'].mean():.2f} "
                f"({probe_near}/{n}) | {a['relearn_steps'].mean():.1f} "
                f"| {a['forget_entropy_median'].mean():.3f} "
                f"| {a['forget_prediction_js'].mean():.3f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(EXAMPLES))
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="examples_forget.jsonl")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="variants to run (hand always runs: it gives the model before)",
    )
    parser.add_argument("--attacks", action="store_true",
                        help="retrain without each digit and judge every model with "
                             "tdu.forgetting_metrics")  # fmt: skip
    parser.add_argument("--summarize", action="store_true",
                        help="print the table of --out's lines and stop")  # fmt: skip
    args = parser.parse_args()
    if args.summarize:
        lines = [json.loads(x) for x in pathlib.Path(args.out).read_text().splitlines()]
        print(summary_markdown(lines))
        if any("retrained" in line for line in lines):
            print()
            print(attacks_markdown([line for line in lines if "retrained" in line]))
        return
    names = args.models.split(",")
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {', '.join(EXAMPLES)}")
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
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
                refs, judge = references(name, c, digit, seed) if args.attacks else ({}, None)
                rec = variants(c["model"], c["params"], c["state"], c["train"], c["evaluation"],
                               digit, c["config"], seed, names=chosen, judge=judge)  # fmt: skip
                line = {"model": name, "seed": seed, "digit": digit,
                        "train_seconds": train_seconds, **refs, **rec}  # fmt: skip
                with out.open("a") as f:
                    f.write(json.dumps(line, default=float) + "\n")
                print(json.dumps(brief(line), default=float), flush=True)


if __name__ == "__main__":
    main()
