"""Writes the results of saved tables back as run folders, so that tables run on other
machines or at other times can be pooled with ``reproduce --summarize_only``.

    python scripts/unpack_results.py results/lenet_forgetting_v3_cpu_2026-11-28/L1_seeds0-1 \\
        --workdir=/tmp/pooled
    python -m experiments.reproduce --table=lenet --forget_classes=all --seeds=0,1,2 \\
        --rows=L1,L3,L4 --importance_fraction=0.1 --workdir=/tmp/pooled --summarize_only

Each result of ``<folder>/forgetting.json`` (or ``summary.json``) becomes
``<workdir>/<table>/<run_name>/result.json`` (table: lenet for MNIST, cifar for CIFAR-10),
written atomically. A run folder that already holds a result is left alone unless it is the
same run (same resume key), so nothing saved is overwritten with something else.
"""

import argparse
import json
import pathlib

from experiments import common
from tdu_jax import result_files

TABLE = {"mnist": "lenet", "cifar10": "cifar"}


def unpack(folder: pathlib.Path, workdir: pathlib.Path) -> tuple[int, int]:
    """(written, already there) for one saved table folder."""
    source = folder / "forgetting.json"
    if not source.exists():
        source = folder / "summary.json"
    results = json.loads(source.read_text())["results"]
    written = kept = 0
    for result in results:
        config = result["config"]
        path = workdir / TABLE[config["dataset"]] / config["run_name"] / "result.json"
        if path.exists():
            saved = json.loads(path.read_text())["config"]
            if common.resume_key(saved) != common.resume_key(config):
                raise FileExistsError(f"{path} holds a different run; not overwritten")
            kept += 1
            continue
        result_files.write_json_atomic(path, result)
        written += 1
    return written, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders",
        nargs="+",
        type=pathlib.Path,
        help="saved table folders (with forgetting.json or summary.json)",
    )
    parser.add_argument("--workdir", type=pathlib.Path, required=True,
                        help="the --workdir to pool them in")  # fmt: skip
    args = parser.parse_args()
    for folder in args.folders:
        written, kept = unpack(folder, args.workdir)
        print(f"{folder}: {written} results written, {kept} already there")


if __name__ == "__main__":
    main()
