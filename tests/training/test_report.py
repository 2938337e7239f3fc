"""The progress bar: phase, rate and time left for the generation and the run on a terminal;
nothing at all elsewhere."""

from __future__ import annotations

import io

import pytest

from training import report
from training.report import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_it_shows_phase_rate_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    stream = Terminal()
    bar = ProgressBar(100, "gen 2/5", enabled=True, stream=stream)
    for _ in range(10):
        bar.advance(1, "learn")
    shown = stream.getvalue()
    assert "gen 2/5" in shown and "learn" in shown and "step/s" in shown
    # 10 of 100 units in 10 s (one per clock reading): 90 s left, and 3 more generations of 100 s each
    assert bar.postfix("learn", bar.started + 10) == "learn    gen left 1:30  run left 6:30"
    bar.close()


def test_it_is_silent_when_not_on_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(10, "gen 1/1", enabled=True, stream=stream)
    for _ in range(10):
        bar.advance(1, "explore")
    bar.close()
    assert stream.getvalue() == "" and bar.done == 10


def test_it_is_silent_when_turned_off() -> None:
    stream = Terminal()
    bar = ProgressBar(10, "gen 1/1", enabled=False, stream=stream)
    bar.advance(5, "explore")
    bar.close()
    assert stream.getvalue() == ""


def test_time_left_reads_hours() -> None:
    assert report._clock(3 * 3600 + 62) == "3:01:02" and report._clock(59.6) == "1:00"
