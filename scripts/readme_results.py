"""Rewrites README's forgetting-results block from results folders' forgetting.json.

    python scripts/readme_results.py results/lenet_forgetting_cpu_2026-11-27 \\
        --title="LeNet-5 / MNIST, every digit, seed 0 (CPU)"

Replaces the text between ``<!-- FORGETTING-RESULTS -->`` and ``<!-- /FORGETTING-RESULTS -->``
(the end marker is added after the first when missing), so README's figures are the
measured ones, never retyped.
"""

import argparse
import json
import pathlib

from tdu_jax import forgetting_report as fr

START, END = "<!-- FORGETTING-RESULTS -->", "<!-- /FORGETTING-RESULTS -->"
KEYS = ("forget_acc", "retain_acc", "mia_svc", "mia_entropy", "probe_recovery", "relearn_steps")


def block(results: list[dict], title: str, sources: list[str]) -> str:
    where = ", ".join(f"`{s}/forgetting.md`" for s in sources)
    lines = [f"### {title}", "", f"From {where} (mean ± std over requests; "
             "unlearned / retrained / silenced control).", "",
             "| row | requests | " + " | ".join(KEYS) + " | cost ratio % |",
             "|---|---|" + "---|" * (len(KEYS) + 1)]  # fmt: skip
    for row, group in fr.group_by_row(results).items():
        cells = []
        for key in KEYS:
            parts = [fr.mean_std(fr.values(group, src, key))
                     for src in ("final", "retrained", "control")]  # fmt: skip
            cells.append(" / ".join(parts))
        lines.append(f"| {row} | {len(group)} | " + " | ".join(cells)
                     + f" | {fr.cost_text(group)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders",
        type=pathlib.Path,
        nargs="+",
        help="results folders; their rows are listed together",
    )
    parser.add_argument("--title", required=True)
    parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("README.md"))
    args = parser.parse_args()
    results = [
        r
        for folder in args.folders
        for r in json.loads((folder / "forgetting.json").read_text())["results"]
    ]
    text = args.readme.read_text()
    if START not in text:
        raise SystemExit(f"{args.readme} has no {START} marker")
    if END not in text:
        text = text.replace(START, f"{START}\n{END}", 1)
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = block(results, args.title, [f.as_posix() for f in args.folders])
    args.readme.write_text(f"{head}{START}\n{new}{END}{tail}")


if __name__ == "__main__":
    main()
