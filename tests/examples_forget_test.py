"""scripts/examples_forget.py's summary table, on numbers small enough to check by hand."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "examples_forget.py"
_spec = importlib.util.spec_from_file_location("examples_forget", SCRIPT)
examples_forget = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(examples_forget)


def _line(digit, hand, l1, only):
    before = {"forget_acc": 99.0, "retain_acc": 97.0}
    return {"model": "m", "seed": 0, "digit": digit,
            "hand": {"forget_acc": hand[0], "retain_acc": hand[1], "before": before, "top_k": 12},
            "forget_l1": {"forget_acc": l1[0], "retain_acc": l1[1], "units": 2,
                          "only_class_outputs": only}}  # fmt: skip


def test_summary_counts_and_means_by_hand():
    lines = [_line(0, (0.0, 96.0), (0.0, 97.5), True), _line(1, (2.0, 95.0), (0.5, 90.0), False)]
    rows = examples_forget.summary_markdown(lines).splitlines()
    assert len(rows) == 4  # header, rule, hand, forget_l1 (other variants absent)
    # hand: forget 1.00 ± 1.41, retain 95.50 ± 0.71; forget <= 1 on 1/2; retain >= 96 on 1/2.
    assert rows[2] == ("| m | hand | 2 | 1.00 ± 1.41 | 95.50 ± 0.71 (97.00) | 1/2 | 1/2 "
                       "| 12.0 | 0/2 |")  # fmt: skip
    assert rows[3] == ("| m | forget_l1 | 2 | 0.25 ± 0.35 | 93.75 ± 5.30 (97.00) | 2/2 | 1/2 "
                       "| 2.0 | 1/2 |")  # fmt: skip
