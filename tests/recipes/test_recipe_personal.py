"""recipes/personal's summary says what was measured: a harmful update counts as rejected only when
one reached the gate (a learn its preflight stopped before training tested nothing)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("personal_run", REPO / "recipes/personal/run.py")
personal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(personal)


def _row(step: str, harmful: bool, accepted: bool) -> dict:
    gate = {
        "prior_answers": {"current": 0.8, "questions": 16},
        "current_measures": {"prior": {"accuracy": 0.75, "right": [True, True, True, False]}},
    }
    served = {"prior": 0.75, "prior_all": 0.75, "prior_n": 4, "rules": {}}
    return {
        "step": step,
        "rule": "r",
        "harmful": harmful,
        "accepted": accepted,
        "gate": gate,
        "served": served,
        "wall_s": 1.0,
        "cpu_s": 1.0,
    }


def test_the_harmful_update_is_rejected_only_when_one_was_gated_and_none_accepted():
    def rejected(rows):
        summary = personal.summarize("m", rows, {}, {})
        return summary["models"]["m"]["harmful_update_rejected"]

    first = _row("learn r", False, True)
    assert rejected([first]) is None  # none reached the gate: not "rejected"
    assert rejected([first, _row("learn s (lr x100)", True, False)]) is True
    assert rejected([first, _row("learn s (lr x100)", True, True)]) is False
