"""Reference rows of METHOD.md as flag presets (``--preset=C7``).

A preset sets what the reference varies between rows, plus our own choice for a row
where one measured better (``OURS``); table-wide choices (K, dt, learning rates) stay at
each entry point's defaults, and any flag given explicitly on the command line wins over
the preset.
"""

LENET = {
    "L1": dict(selection="topk", decay_steps=7, finetune="none"),
    "L2": dict(selection="random", decay_steps=7, finetune="none"),
    "L3": dict(selection="topk", decay_steps=7, finetune="after_all", finetune_epochs=1.0),
    "L4": dict(selection="topk", decay_steps=7, finetune="after_each", finetune_batches=21),
}

_C7 = dict(lam=0.1, decay_steps=16, finetune="after_each", finetune_batches=17)
CIFAR = {
    "C1": dict(lam=0.05, decay_steps=5, finetune="none"),
    "C2": dict(lam=0.05, decay_steps=5, finetune="after_all", finetune_epochs=1.0),
    "C3": dict(lam=0.05, decay_steps=5, finetune="after_all", finetune_epochs=2.0),
    "C4": dict(lam=0.05, decay_steps=5, finetune="after_all", finetune_epochs=6.0),
    "C5": dict(decay_steps=0, finetune="after_all", finetune_epochs=6.0),
    "C6": dict(lam=0.1, decay_steps=21, finetune="after_each", finetune_batches=11),
    "C7": dict(_C7),
    "C8": dict(_C7, selection="random"),
    "C9": dict(_C7, importance_data="forget", importance_fraction=0.1),
    "C10": dict(_C7, importance_data="all", importance_fraction=0.1),
    # Not in the reference: fine-tuning alone with C7's budget (16 x 17 = 272 batches).
    "C7-ftonly": dict(decay_steps=0, finetune="after_all", finetune_batches=272),
}

# Not the reference's: LeNet's decay-only row ranks units by the ratio score and calibrates
# under a 0.5% forget-train ceiling (nothing after the decay can take the class further
# down); rows that fine-tune keep the forget score and 1%. Adopted after a check on new
# seeds 6-7 by a rule fixed beforehand (BUILD_NOTES.md, sixteenth session). CIFAR's
# decay-only row ranks filters by the ratio score too (its 5% ceiling unchanged): adopted by
# a rule fixed beforehand on five classes of the reduced CPU model (seventeenth session);
# the full-width check needs a GPU.
OURS = {
    "L1": dict(importance_score="ratio", sweep_forget_max=0.5),
    "C1": dict(importance_score="ratio"),
}

PRESETS = {**LENET, **CIFAR}
# Rows that use importance (topk) share it when their sample is the same.
TABLES = {"lenet": tuple(LENET), "cifar": tuple(CIFAR)}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got {name!r}")
    return {**PRESETS[name], **OURS.get(name, {})}
