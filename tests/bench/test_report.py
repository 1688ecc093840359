"""The benchmark table's rules (bench/report.py): verdicts, spread, percentiles, legacy rows."""

from __future__ import annotations

import pytest

from bench.report import (
    Rounds,
    Row,
    at_least,
    at_most,
    latency_row,
    legacy_rows,
    percentile,
    render,
    value_row,
)


def test_a_row_without_a_goal_is_not_judged() -> None:
    assert value_row("raw", 1000.0, "/s").verdict() == "not judged"


def test_a_ratio_row_is_judged_on_its_median_and_flags_noisy_rounds() -> None:
    steady = Row("x", 0.5, "x", at_least(0.35), per_round=(0.45, 0.5, 0.55, 0.6), n=4)
    assert steady.verdict() == "MET"
    noisy = Row("x", 0.4, "x", at_least(0.35), per_round=(0.3, 0.4, 0.45, 0.5), n=4)
    assert noisy.verdict() == "MET?"
    missed = Row("x", 0.2, "x", at_least(0.35), per_round=(0.1, 0.2, 0.3), n=3)
    assert missed.verdict() == "MISSED"


def test_rounds_take_the_median_of_per_round_ratios() -> None:
    a, b = iter([10.0, 2.0, 8.0]), iter([5.0, 10.0, 10.0])
    r = Rounds({"a": lambda: next(a), "b": lambda: next(b)}, 3)
    row = r.ratio_row("a / b", "a", "b", goal=at_least(1.5))
    assert sorted(row.per_round) == sorted((10 / 5, 2 / 10, 8 / 10))
    assert row.value == pytest.approx(0.8)
    assert row.verdict() == "MISSED?"  # one round in three met the goal
    per_core = r.ratio_row("a / 2b", "a", "b", factor=2)
    assert per_core.value == pytest.approx(0.4)


def test_percentile_is_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0


def test_latency_rows_are_in_ms_and_judge_the_named_percentile() -> None:
    seconds = [0.001] * 98 + [2.0, 2.0]
    row = latency_row("create -> svid", seconds, goal=at_most(1000, "p99"))
    assert row.unit == "ms"
    assert row.value == pytest.approx(1.0)
    assert row.p99 == pytest.approx(2000.0)
    assert row.verdict().startswith("MISSED")
    assert "p50 1.00 / p99 2,000 ms" in "\n".join(render([row]))


def test_a_p99_goal_needs_a_hundred_samples() -> None:
    with pytest.raises(ValueError, match="100 samples"):
        latency_row("few", [0.001] * 30, goal=at_most(1000, "p99"))
    assert latency_row("few", [0.001] * 30).p99 is None


def test_extra_info_only_benchmarks_are_shown_with_units_and_goals() -> None:
    rows = {
        r.what: r
        for r in legacy_rows(
            {"append_us": 900.0, "append_us_goal": 500.0, "append_per_s": 1111.0, "note": "x"}
        )
    }
    assert set(rows) == {"append_us", "append_per_s"}
    assert rows["append_us"].unit == "ms"
    assert rows["append_us"].value == pytest.approx(0.9)
    assert rows["append_us"].verdict() == "MISSED"
    assert rows["append_per_s"].unit == "/s"
    assert rows["append_per_s"].verdict() == "not judged"
