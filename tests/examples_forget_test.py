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


def _attacks(forget, retain, mia, probe, steps, entropy, js):
    return {"attacks": {"forget_acc": forget, "retain_acc": retain, "mia_svc": mia,
                        "probe_recovery": probe, "relearn_steps": steps,
                        "forget_entropy_median": entropy, "forget_prediction_js": js,
                        "forget_predictions": [0.1] * 10}}  # fmt: skip


def test_attacks_summary_by_hand():
    lines = [
        {"model": "m", "digit": 0, "retrained": _attacks(0.0, 98.0, 99.0, 80.0, 4, 0.5, 0.0),
         "forget_ft": _attacks(1.0, 97.0, 98.0, 95.0, 2, 1.0, 0.2)},
        {"model": "m", "digit": 1, "retrained": _attacks(0.0, 96.0, 97.0, 70.0, 6, 0.3, 0.0),
         "forget_ft": _attacks(0.0, 95.0, 90.0, 75.0, 3, 0.7, 0.4)},
    ]  # fmt: skip
    rows = examples_forget.attacks_markdown(lines).splitlines()
    assert len(rows) == 4  # header, rule, retrained, forget_ft
    assert rows[2] == ("| m | retrained | 2 | 0.00 ± 0.00 | 97.00 ± 1.41 | 98.00 (2/2) "
                       "| 75.00 (2/2) | 5.0 | 0.400 | 0.000 |")  # fmt: skip
    # mia_svc within 2 of retrained: |98-99| yes, |90-97| no; probe within 10: 15 no, 5 yes.
    assert rows[3] == ("| m | forget_ft | 2 | 0.50 ± 0.71 | 96.00 ± 1.41 | 94.00 (1/2) "
                       "| 85.00 (1/2) | 2.5 | 0.850 | 0.300 |")  # fmt: skip
    brief = examples_forget.brief({"model": "m", **lines[0]})
    assert brief["forget_ft"] == {"forget_acc": 1.0, "retain_acc": 97.0, "mia_svc": 98.0,
                                  "probe_recovery": 95.0, "relearn_steps": 2}  # fmt: skip
