"""One table for `make bench`: every row is a ratio against a baseline measured in the same run.

Benchmarks report rows in ``benchmark.extra_info["rows"]`` as dicts with keys ``row``, ``value``,
``unit``, ``baseline`` (name of the baseline row), ``ratio`` and optionally ``goal`` (a minimum
ratio). Benchmarks that only store ``<name>_ratio`` / ``<name>_goal`` pairs in extra_info are shown
too. The table is printed at the end of the run and added to the JSON file as ``svidd_table``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

RESULTS_DIR = Path(__file__).parent / "results"


def pytest_configure(config: pytest.Config) -> None:
    # `make bench` writes bench/results/latest.json; the folder is not committed.
    RESULTS_DIR.mkdir(exist_ok=True)


def _benchmarks(config: pytest.Config) -> list[Any]:
    session = getattr(config, "_benchmarksession", None)
    return list(getattr(session, "benchmarks", []) or [])


def _rows(config: pytest.Config) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for bench in _benchmarks(config):
        info = dict(getattr(bench, "extra_info", {}) or {})
        explicit = info.get("rows")
        if isinstance(explicit, list):
            rows.extend(r for r in explicit if isinstance(r, dict))
            continue
        for key, value in info.items():
            if key.endswith("_ratio") and isinstance(value, int | float):
                prefix = key.removesuffix("_ratio")
                rows.append(
                    {
                        "row": f"{bench.name}: {prefix}",
                        "value": None,
                        "unit": "",
                        "baseline": "see test",
                        "ratio": float(value),
                        "goal": info.get(f"{prefix}_goal"),
                    }
                )
    return rows


def _fmt_value(row: dict[str, Any]) -> str:
    value = row.get("value")
    if value is None:
        return ""
    if isinstance(value, float) and value < 100:
        return f"{value:,.2f} {row.get('unit', '')}".strip()
    return f"{value:,.0f} {row.get('unit', '')}".strip()


def _render(rows: list[dict[str, Any]]) -> list[str]:
    header = ("row", "value", "vs baseline", "ratio", "goal", "")
    table = [header]
    for r in rows:
        goal = r.get("goal")
        ratio = r.get("ratio")
        verdict = ""
        if goal is not None and ratio is not None:
            verdict = "ok" if ratio >= goal else "BELOW GOAL"
        table.append(
            (
                str(r.get("row", "")),
                _fmt_value(r),
                str(r.get("baseline", "")),
                "" if ratio is None else f"{ratio:.2f}x",
                "" if goal is None else f">= {goal}x",
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = _rows(config)
    if not rows:
        return
    terminalreporter.section("svidd benchmark table (ratios measured in this run)")
    for line in _render(rows):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"cpus: {os.cpu_count()}")


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]
) -> None:
    output_json["svidd_table"] = _rows(config)
