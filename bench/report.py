"""The one table `make bench` prints: rows that benchmarks register, each judged against its goal.

A benchmark asks for the ``table`` fixture (bench/conftest.py) and adds `Row`s to it; the rows
appear in the table in the order the tests ran, under the test's file. Build rows with the
helpers here (`Rounds.rate_row`, `Rounds.ratio_row`, `latency_row`, `value_row`) so that the
value, its unit, the goal, the per-round spread and the number of rounds or samples travel
together. Benchmarks that only fill ``benchmark.extra_info`` are shown too (`legacy_rows`).

Rules the table keeps (issue 13):
- a latency is shown in milliseconds, p50 and p99; a p99 needs at least `MIN_P99_SAMPLES`;
- every row with a goal is judged: MET or MISSED on its median (or the judged percentile), and
  a ``?`` is added when at least a quarter of the rounds fall on the other side of the goal;
- the spread is the min-max of the judged quantity over the rounds, in the row's unit.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MIN_P99_SAMPLES = 100
LATENCY_ROUNDS = 5  # latency samples are split in this many consecutive rounds for the spread
UNSTABLE_FRACTION = 0.25


def scale() -> float:
    """SVIDD_BENCH_SCALE multiplies every round count (0.2 to iterate, 4 for `make bench-long`)."""
    try:
        return max(0.01, float(os.environ.get("SVIDD_BENCH_SCALE", "1")))
    except ValueError:
        return 1.0


def rounds(default: int, minimum: int = 3) -> int:
    """The number of rounds a measurement runs, after SVIDD_BENCH_SCALE."""
    return max(minimum, round(default * scale()))


def samples(default: int) -> int:
    """Latency sample counts scale too, but never below what a p99 needs."""
    return max(MIN_P99_SAMPLES, round(default * scale()))


@dataclass(frozen=True)
class Goal:
    """`op` is ">=" or "<="; `stat` names what is judged: "" (the value), "p50" or "p99"."""

    op: str
    target: float
    stat: str = ""

    def met(self, x: float) -> bool:
        return x >= self.target if self.op == ">=" else x <= self.target


def at_least(target: float, stat: str = "") -> Goal:
    return Goal(">=", target, stat)


def at_most(target: float, stat: str = "") -> Goal:
    return Goal("<=", target, stat)


@dataclass(frozen=True)
class Row:
    """One measured thing. `value` is the median (for a latency row: the p50, in ms)."""

    what: str
    value: float
    unit: str  # "/s", "x", "ms", "B", or "" for a plain number
    goal: Goal | None = None
    per_round: tuple[float, ...] = ()  # the judged quantity in each round, for the spread
    n: int = 0
    n_of: str = "rounds"  # or "samples"
    p99: float | None = None  # latency rows only
    note: str = ""
    section: str = ""  # the test file; set by the table fixture
    failed: bool = False  # stands for the rows of a test that failed before adding them

    def judged(self) -> float | None:
        if self.goal is not None and self.goal.stat == "p99":
            return self.p99
        return self.value

    def verdict(self) -> str:
        if self.failed:
            return "FAILED"
        judged = self.judged()
        if self.goal is None or judged is None or math.isnan(judged):
            return "not judged"
        ok = self.goal.met(judged)
        text = "MET" if ok else "MISSED"
        other_side = sum(1 for x in self.per_round if self.goal.met(x) != ok)
        if self.per_round and other_side >= UNSTABLE_FRACTION * len(self.per_round):
            text += "?"
        return text

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict()
        return out


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least p % of samples at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_row(
    what: str, seconds: Sequence[float], *, goal: Goal | None = None, note: str = ""
) -> Row:
    """p50 and p99 (ms) of samples given in seconds, in the order they were taken. The spread is
    the judged percentile (p50 unless the goal names p99) of each of `LATENCY_ROUNDS` runs of
    consecutive samples."""
    ms = [s * 1000 for s in seconds]
    if goal is not None and goal.stat == "p99" and len(ms) < MIN_P99_SAMPLES:
        raise ValueError(f"{what}: a p99 needs {MIN_P99_SAMPLES} samples, got {len(ms)}")
    p99 = percentile(ms, 99) if len(ms) >= MIN_P99_SAMPLES else None
    stat = 99 if goal is not None and goal.stat == "p99" else 50
    size = max(1, len(ms) // LATENCY_ROUNDS)
    chunks = [ms[i : i + size] for i in range(0, size * LATENCY_ROUNDS, size) if ms[i : i + size]]
    return Row(
        what,
        percentile(ms, 50),
        "ms",
        goal,
        tuple(percentile(c, stat) for c in chunks),
        len(ms),
        "samples",
        p99,
        note,
    )


def value_row(
    what: str, value: float, unit: str, *, goal: Goal | None = None, note: str = ""
) -> Row:
    return Row(what, value, unit, goal, note=note, n=1, n_of="run")


# -- rounds: every window of a measurement, interleaved, so background load falls on all alike --


def rate(op: Callable[[], object], seconds: float) -> float:
    """Calls of `op` per second over a window of about `seconds` (checked every 10 calls)."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(10):
            op()
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


class Rounds:
    """`count` rounds; each round runs one window of every measurement (a callable that runs
    its window and returns a rate per second). The order rotates from round to round so that no
    measurement always runs first (the one after an idle gap pays for waking things up).

    Ratios are the median of the per-round ratios, rates the median rate: a burst of outside
    load lands on one round, not on the result, and the spread shows how far rounds differ.
    """

    def __init__(self, windows: Mapping[str, Callable[[], float]], count: int) -> None:
        names = list(windows)
        self.count = count
        self.turns: list[dict[str, float]] = []
        for turn in range(count):
            k = turn % len(names)
            self.turns.append({name: windows[name]() for name in names[k:] + names[:k]})

    def per_round(self, name: str) -> tuple[float, ...]:
        return tuple(t[name] for t in self.turns)

    def rate(self, name: str) -> float:
        return _median(self.per_round(name))

    def ratios(self, name: str, base: str, factor: float = 1.0) -> tuple[float, ...]:
        return tuple(t[name] / (t[base] * factor) for t in self.turns)

    def rate_row(self, what: str, name: str, *, goal: Goal | None = None, note: str = "") -> Row:
        values = self.per_round(name)
        return Row(what, _median(values), "/s", goal, values, self.count, note=note)

    def ratio_row(
        self,
        what: str,
        name: str,
        base: str,
        *,
        factor: float = 1.0,
        goal: Goal | None = None,
        note: str = "",
    ) -> Row:
        """Per round: rate(name) / (rate(base) x factor); the row is their median."""
        values = self.ratios(name, base, factor)
        return Row(what, _median(values), "x", goal, values, self.count, note=note)


# -- rendering ---------------------------------------------------------------------------------


def _num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _bare(x: float, unit: str) -> str:
    return f"{x:.2f}" if unit == "x" and abs(x) < 10 else _num(x)


def _with_unit(x: float, unit: str) -> str:
    if unit == "x":
        return f"{_bare(x, unit)}x"
    return f"{_num(x)} {unit}".strip()


def _value(row: Row) -> str:
    if row.failed:
        return "-"
    if row.unit == "ms" and row.n_of == "samples":
        p99 = "n/a (<100 samples)" if row.p99 is None else _num(row.p99)
        return f"p50 {_num(row.value)} / p99 {p99} ms"
    return _with_unit(row.value, row.unit)


def _goal(row: Row) -> str:
    if row.goal is None:
        return "-"
    stat = f"{row.goal.stat} " if row.goal.stat else ""
    return f"{stat}{row.goal.op} {_with_unit(row.goal.target, row.unit)}"


def _spread(row: Row) -> str:
    if len(row.per_round) < 2:
        return "-"
    return f"{_bare(min(row.per_round), row.unit)}-{_with_unit(max(row.per_round), row.unit)}"


LEGEND = """\
value    /s: median over rounds of calls (or credentials) per second. x: median over rounds of
         the per-round ratio named in the row. ms: p50 / p99 over all samples (nearest rank;
         a p99 is shown only from >= 100 samples); "ms" alone: mean time per operation over
         one run. B: bytes.
cores    N = the worker threads/processes issuance uses (os.cpu_count() unless the row says).
         "1 core" = the raw operation on one thread (issuance: in one worker process; verify:
         in the test process, like the verifier); "N cores" = in N worker processes at once.
         Baselines run in the same rounds as the rows compared with them.
         whole-machine ratio = measured rate / raw rate on N cores.
         per-core ratio      = measured rate / (N x raw rate on 1 core).
goal     judged on the whole-machine ratio unless the row says otherwise; for latency rows on
         the percentile the goal names.
verdict  MET / MISSED on the value (or the named percentile); "?" = at least a quarter of the
         rounds fell on the other side of the goal: noisy, re-measure on a quiet machine.
         not judged = the row has no goal (a baseline, or shown for reference).
         FAILED = the test stopped before it added its rows (see the log above the table).
spread   min-max of the judged quantity over the rounds (ratio rows: of the per-round ratios;
         latency rows: of the judged percentile over 5 runs of consecutive samples).
n        rounds (interleaved windows of every measurement of that test) or samples.
servers  "N PostgreSQL servers / 1" (test_bench_ha.py): the same callers spread over N
         servers that share this machine's cores and one database. On a 2-core machine
         that ratio shows what more servers cost (overhead), not scale-out."""


def render(rows: Sequence[Row]) -> list[str]:
    header = ("what", "value", "goal", "verdict", "spread", "n", "notes")
    lines: list[tuple[str, ...] | str] = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines.append(f"{section}:")
        lines.append(
            (
                f"  {row.what}",
                _value(row),
                _goal(row),
                row.verdict(),
                _spread(row),
                f"{row.n} {row.n_of}" if row.n else "-",
                row.note,
            )
        )
    cells = [header] + [line for line in lines if isinstance(line, tuple)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]

    def fmt(cols: tuple[str, ...]) -> str:
        head = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False))
        return f"{head}  {cols[-1]}".rstrip()

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    out.extend(line if isinstance(line, str) else fmt(line) for line in lines)
    return out


# -- rows from benchmarks that only fill extra_info ----------------------------------------------

# suffix -> (unit, factor to that unit, goal direction)
_SUFFIXES = {
    "_per_s": ("/s", 1.0, ">="),
    "_ratio": ("x", 1.0, ">="),
    "_us": ("ms", 1e-3, "<="),
    "_ms": ("ms", 1.0, "<="),
    "_s": ("ms", 1e3, "<="),
    "_bytes": ("B", 1.0, "<="),
}


def _plain_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def legacy_rows(info: Mapping[str, Any]) -> list[Row]:
    """Rows for a benchmark that did not use the table fixture.

    - ``info["rows"]``: dicts with ``row``, ``value``, ``unit``, and optionally ``baseline``,
      ``ratio`` and ``goal`` (a minimum ratio): a value row and a ratio row.
    - any other number, by the suffix of its key: ``_per_s`` (/s), ``_ratio`` (x), ``_us``,
      ``_ms``, ``_s`` (shown in ms), ``_bytes``; ``<key>_goal`` or ``goal_<key>`` judges it (a
      minimum for rates and ratios, a maximum for times and sizes).
    """
    rows: list[Row] = []
    explicit = info.get("rows")
    if isinstance(explicit, list):
        for r in explicit:
            if not isinstance(r, dict):
                continue
            name = str(r.get("row", "?"))
            if _plain_number(r.get("value")):
                rows.append(value_row(name, float(r["value"]), str(r.get("unit", ""))))
            if _plain_number(r.get("ratio")):
                goal: Any = r.get("goal")
                rows.append(
                    value_row(
                        f"{name} / {r.get('baseline', 'baseline')}",
                        float(r["ratio"]),
                        "x",
                        goal=at_least(float(goal)) if _plain_number(goal) else None,
                    )
                )
    for key, value in info.items():
        if key == "rows" or not _plain_number(value) or "goal" in key.split("_"):
            continue
        unit, factor, op = "", 1.0, ">="
        for suffix, (u, f, o) in _SUFFIXES.items():
            if key.endswith(suffix):
                unit, factor, op = u, f, o
                break
        goal_value = info.get(f"{key}_goal", info.get(f"goal_{key}"))
        if goal_value is None and key.endswith("_ratio"):
            goal_value = info.get(f"{key.removesuffix('_ratio')}_goal")
        goal = Goal(op, float(goal_value) * factor) if _plain_number(goal_value) else None
        rows.append(value_row(key, float(value) * factor, unit, goal=goal))
    return rows


def with_section(rows: Iterable[Row], section: str) -> list[Row]:
    return [replace(r, section=r.section or section) for r in rows]


@dataclass
class Table:
    """What the ``table`` fixture hands a benchmark: rows to add, in order."""

    rows: list[Row] = field(default_factory=list)

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)
