"""What fine-tuning alone costs an unchanged base model, and the recipe that costs least.

    python -m experiments.finetune_harm --compute_dtype=bfloat16 --validation_examples=5000
    python -m experiments.finetune_harm --width=0.25 --train_epochs=6 --max_train_examples=5000 \\
        --validation_examples=1000 --budgets=20,0.5e                      # CPU rehearsal

The base model is trained without the last ``--validation_examples`` training images (its own
checkpoint). Every fine-tuning recipe of the grid (``--grid_lr`` x ``--grid_momentum`` x
``--grid_augment`` x ``--grid_schedule``; weight decay ``--finetune_weight_decay``, batch
``--batch_size``) then fine-tunes it on the retain classes of the training split for each
budget of ``--budgets`` (the reference's: C7's 272 batches, 1 and 6 epochs), and retain
accuracy is measured on the validation split and on test, before and after. The recipe
chosen is the one whose worst budget loses the least validation retain accuracy (ties: the
table's recipe first); test is reported, never used to choose. Writes
``<workdir>/finetune_harm/finetune_harm.json`` and ``finetune_harm.md``; a rerun reuses the
cells already measured on the same base model (another base model's are refused, never
overwritten).
"""

import itertools
import pathlib

import jax
from absl import app, flags, logging

from experiments import cifar_ship, common
from tdu_jax import checkpoint, data, metrics, result_files, train, unlearn

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This entry point's flags, then every common one (only when run: importing this module
    for its functions defines nothing)."""
    flags.DEFINE_string("budgets", "272,1e,6e",
                        "Comma list of fine-tuning budgets: a batch count, or epochs of the "
                        "retain set with an 'e' (1e, 0.5e).")  # fmt: skip
    flags.DEFINE_string("grid_lr", "0.001,0.003,0.01", "Fine-tuning learning rates tried.")
    flags.DEFINE_string("grid_momentum", "0.9", "SGD momenta tried.")
    flags.DEFINE_string("grid_augment", "true,false", "Augmentation settings tried.")
    flags.DEFINE_string("grid_schedule", "constant,cosine",
                        f"Schedules tried, of {', '.join(train.SCHEDULES)}.")  # fmt: skip
    common.define_flags(**cifar_ship.DEFAULTS)


def parse_budgets(text: str) -> list[str]:
    """``"272,1e"`` -> ["272", "1e"], each checked: a count >= 1 or epochs > 0."""
    out = []
    for item in filter(None, text.split(",")):
        try:
            value = float(item[:-1]) if item.endswith("e") else int(item)
        except ValueError:
            value = 0
        if not value > 0:
            raise ValueError(f"--budgets: {item!r} is neither a batch count >= 1 nor epochs "
                             "'<x>e' with x > 0")  # fmt: skip
        out.append(item)
    if not out:
        raise ValueError("--budgets is empty")
    return out


def budget_batches(budget: str, retain_size: int, batch_size: int) -> int:
    if budget.endswith("e"):
        return unlearn.epochs_to_batches(float(budget[:-1]), retain_size, batch_size)
    return int(budget)


def parse_grid(cfg) -> list[dict]:
    """The recipes of the grid flags, the table's own recipe first."""
    lrs = common.parse_number_list("grid_lr", FLAGS.grid_lr)
    momenta = common.parse_number_list("grid_momentum", FLAGS.grid_momentum)
    augments = []
    for text in FLAGS.grid_augment.split(","):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--grid_augment values are true or false; got {text!r}")
        augments.append(text.lower() == "true")
    schedules = FLAGS.grid_schedule.split(",")
    for schedule in schedules:
        if schedule not in train.SCHEDULES:
            raise ValueError(f"--grid_schedule: {schedule!r} is not one of "
                             f"{', '.join(train.SCHEDULES)}")  # fmt: skip
    table = {"lr": cfg.finetune_lr, "momentum": cfg.finetune_momentum, "augment": cfg.augment,
             "schedule": cfg.finetune_schedule}  # fmt: skip
    grid = [dict(zip(table, values, strict=True))
            for values in itertools.product(lrs, momenta, augments, schedules)]  # fmt: skip
    names = {"OptimizerConfig.learning_rate": "lr", "OptimizerConfig.momentum": "momentum"}
    with common._as_flags(names, prefix="grid_"):  # errors name --grid_lr / --grid_momentum
        for recipe in grid:
            train.validate_optimizer_config(optimizer(cfg, recipe))
    return [table] + [r for r in grid if r != table]


def optimizer(cfg, recipe: dict) -> train.OptimizerConfig:
    return train.OptimizerConfig(
        name=cfg.finetune_optimizer, learning_rate=recipe["lr"], momentum=recipe["momentum"],
        weight_decay=cfg.finetune_weight_decay, schedule=recipe["schedule"],
    )  # fmt: skip


def recipe_name(recipe: dict) -> str:
    aug = "aug" if recipe["augment"] else "noaug"
    return f"lr {recipe['lr']:g}, mom {recipe['momentum']:g}, {aug}, {recipe['schedule']}"


def cell_name(recipe: dict, budget: str) -> str:
    return f"{recipe_name(recipe)} | {budget}"


def retain_accuracies(model, params, batch_stats, cfg, splits: dict) -> dict:
    """Retain-class accuracy (%) on each split of ``splits`` ({name: Split})."""
    return {name: metrics.evaluate(model, params, batch_stats, split, dataset=cfg.dataset,
                                   forget_classes=cfg.forget_class)["retain_acc"]
            for name, split in splits.items()}  # fmt: skip


def choose(cells: dict, recipes: list[dict], budgets: list[str]) -> dict:
    """The recipe whose worst budget changes validation retain accuracy least (the first of
    equals; the table's recipe is first)."""

    def worst(recipe):
        return min(cells[cell_name(recipe, b)]["validation_change"] for b in budgets)

    return max(recipes, key=worst)


def markdown(setup: dict, base_acc: dict, cells: dict, recipes, budgets, chosen) -> str:
    lines = [
        "# Fine-tuning alone on an unchanged base model: retain accuracy change (points)",
        "",
        ", ".join(f"{k} {v}" for k, v in setup.items()),
        "",
        f"Base retain accuracy: validation {base_acc['validation']:.2f}, test "
        f"{base_acc['test']:.2f}. Cells: validation / test change; chosen on validation "
        "(worst budget), marked **.",
        "",
        "| recipe | " + " | ".join(f"{b} ({cells[cell_name(recipes[0], b)]['batches']} batches)"
                                   for b in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]  # fmt: skip
    for recipe in recipes:
        row = [f"{cells[cell_name(recipe, b)]['validation_change']:+.2f} / "
               f"{cells[cell_name(recipe, b)]['test_change']:+.2f}" for b in budgets]  # fmt: skip
        mark = "**" if recipe == chosen else ""
        table = " (table's)" if recipe is recipes[0] else ""
        lines.append(f"| {mark}{recipe_name(recipe)}{table}{mark} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    with common.bad_input():
        cfg = common.config_from_flags("cifar10", cifar_ship.DEFAULTS)
        if cfg.validation_examples < 1:
            raise ValueError("--validation_examples must be >= 1: the recipe is chosen on a "
                             "validation split carved from train (e.g. 5000)")  # fmt: skip
        budgets = parse_budgets(FLAGS.budgets)
        recipes = parse_grid(cfg)
        base_key = checkpoint.config_key(common.base_config(cfg))
        out_dir = pathlib.Path(cfg.workdir) / "finetune_harm"
        path = out_dir / "finetune_harm.json"
        saved = result_files.read_json(path) if path.is_file() else {"base_key": base_key}
        if saved["base_key"] != base_key:
            raise ValueError(f"{path} holds the cells of another base model "
                             f"({saved.get('base')}); use another --workdir, or move that "
                             "folder away")  # fmt: skip
        cells = saved.get("cells", {})
    train_split, test_split, validation = common.load_data(cfg, with_validation=True)
    model, params, batch_stats, info = common.get_base_model(cfg, train_split, test_split)
    _, retain_train = data.forget_retain(train_split, cfg.forget_class)
    splits = {"validation": validation, "test": test_split}
    base_acc = retain_accuracies(model, params, batch_stats, cfg, splits)
    setup = {"model": cfg.model, "width": cfg.width, "base epochs": cfg.train_epochs,
             "retain-train images": retain_train.size, "validation images": validation.size,
             "forget": ",".join(data.class_names(cfg.dataset)[c] for c in cfg.forget_class),
             "batch": cfg.batch_size, "weight decay": cfg.finetune_weight_decay,
             "optimizer": cfg.finetune_optimizer, "seed": cfg.seed}  # fmt: skip
    key = jax.random.fold_in(jax.random.key(cfg.seed), 7)  # one batch stream for every cell
    record = {"base_key": base_key, "base": info["checkpoint"], "setup": setup,
              "base_retain_acc": base_acc, "cells": cells}  # fmt: skip
    for recipe, budget in itertools.product(recipes, budgets):
        name = cell_name(recipe, budget)
        if name in cells:
            continue
        batches = budget_batches(budget, retain_train.size, cfg.batch_size)
        new_params, new_stats, _ = train.fine_tune(
            model, params, batch_stats, retain_train, dataset=cfg.dataset,
            config=optimizer(cfg, recipe), num_batches=batches, batch_size=cfg.batch_size,
            key=key, augment=recipe["augment"],
        )  # fmt: skip
        acc = retain_accuracies(model, new_params, new_stats, cfg, splits)
        cells[name] = {"recipe": recipe, "budget": budget, "batches": batches,
                       "validation_retain_acc": acc["validation"], "test_retain_acc": acc["test"],
                       "validation_change": acc["validation"] - base_acc["validation"],
                       "test_change": acc["test"] - base_acc["test"]}  # fmt: skip
        logging.info("%s: %s", name, cells[name])
        result_files.write_json_atomic(path, record)
    record["chosen"] = chosen = choose(cells, recipes, budgets)
    result_files.write_json_atomic(path, record)
    text = markdown(setup, base_acc, cells, recipes, budgets, chosen)
    result_files.write_text_atomic(out_dir / "finetune_harm.md", text)
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
