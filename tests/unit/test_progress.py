"""A job's progress: nested phases named after their parents, the time left of a counted phase,
and the bars (or lines) that show them."""

import io

import pytest

from worker import progress as progress_module
from worker.progress import Pace, PhaseBars, Step, within


def test_nested_phases_map_percentages_and_join_their_names() -> None:
    seen: list[tuple[int, Step | None]] = []
    job = within(lambda percent, step=None: seen.append((percent, step)), 0, 90)
    rung = within(job, 50, 100, "relabel (rung 3 of 4)")
    audit = within(rung, 50, 100, "audit")
    assert audit is not None
    audit(0, Step("reference models", 0, 8, "models"))
    audit(100)
    assert seen == [
        (67, Step("relabel (rung 3 of 4): audit: reference models", 0, 8, "models")),
        (90, Step("relabel (rung 3 of 4): audit")),  # a bare percentage: the parents' names
    ]
    assert within(None, 0, 100, "nothing listens") is None


def test_the_time_left_follows_the_pace_of_the_phase_since_it_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 130.0, 160.0, 500.0, 510.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    pace = Pace()
    training = Step("training", 0, 40, "steps")
    assert pace.detail(training)["left_seconds"] is None  # no pace yet
    assert pace.detail(Step("training", 10, 40, "steps"))["left_seconds"] == 90  # 3 s a step
    assert pace.detail(Step("training", 30, 40, "steps"))["left_seconds"] == 20
    # A new phase starts its own clock: 10 s for its first model of 8 (the first seen at 2).
    assert pace.detail(Step("reference models", 2, 8, "models"))["left_seconds"] is None
    detail = pace.detail(Step("reference models", 3, 8, "models"))
    assert detail == {
        "phase": "reference models",
        "done": 3,
        "total": 8,
        "unit": "models",
        "left_seconds": 50,
    }


def test_off_a_terminal_each_phase_is_one_line() -> None:
    out = io.StringIO()
    bars = PhaseBars(out)
    for done in range(4):
        bars(done * 25, Step("reference models", done, 8, "models"))
    bars(60, Step())  # says nothing new: no line
    bars(90, Step("attack models"))
    bars.close()
    assert out.getvalue() == "  reference models (8 models)\n  attack models\n"


def test_on_a_terminal_a_counted_phase_is_a_bar_with_its_count() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    bars = PhaseBars(out)
    for done in range(9):
        bars.show(Step("reference models", done, 8, "models"))
    bars.close()
    assert "reference models: 8/8 models |" in out.getvalue()
