"""svid_server_gc_pause_seconds: each collection's pause, by generation."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from server.gc_pauses import GcPauses
from server.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    return {
        (s.name, s.labels["generation"], s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
    }


def _registry(pauses: GcPauses) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(pauses)
    return registry


def test_each_collection_is_observed_under_its_generation() -> None:
    clock = Clock()
    pauses = GcPauses(clock)
    for generation, seconds in ((2, 0.14), (2, 0.003), (0, 0.00005)):
        pauses("start", {"generation": generation})
        clock.now += seconds
        pauses("stop", {"generation": generation, "collected": 0, "uncollectable": 0})
    got = _samples(_registry(pauses))
    name = "svid_server_gc_pause_seconds"
    assert got[(f"{name}_count", "2", "")] == 2
    assert abs(got[(f"{name}_sum", "2", "")] - 0.143) < 1e-9
    assert got[(f"{name}_bucket", "2", "0.005")] == 1
    assert got[(f"{name}_bucket", "2", "0.1")] == 1
    assert got[(f"{name}_bucket", "2", "0.25")] == 2
    assert got[(f"{name}_bucket", "0", "0.0001")] == 1
    assert got[(f"{name}_count", "1", "")] == 0


def test_a_stop_without_its_start_or_generation_is_not_counted() -> None:
    clock = Clock()
    pauses = GcPauses(clock)
    pauses("stop", {"generation": 2})  # installed mid-collection
    pauses("start", {"generation": 1})
    pauses("stop", {})
    pauses("start", {"generation": 7})
    pauses("stop", {"generation": 7})
    got = _samples(_registry(pauses))
    assert all(got[("svid_server_gc_pause_seconds_count", g, "")] == 0 for g in "012")


def test_installed_it_times_real_collections_and_removed_it_stops() -> None:
    pauses = GcPauses()
    registry = _registry(pauses)
    count = ("svid_server_gc_pause_seconds_count", "2", "")
    pauses.install()
    try:
        pauses.install()  # once only
        assert gc.callbacks.count(pauses) == 1
        gc.collect()
        assert _samples(registry)[count] == 1
    finally:
        pauses.remove()
    assert pauses not in gc.callbacks
    gc.collect()
    assert _samples(registry)[count] == 1


def test_the_server_metrics_export_it() -> None:
    text = Metrics().render().decode()
    assert 'svid_server_gc_pause_seconds_count{generation="2"} 0.0' in text
