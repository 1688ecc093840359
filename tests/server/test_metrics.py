"""observe_times against what it stands for: `times` calls of observe."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from server.metrics import observe_times

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize(
    "amount", [0.0, -1.0, 0.0001, 0.0005, 0.00051, 0.003, 1.0, 1.5, 1e9, math.inf, math.nan]
)
@pytest.mark.parametrize("times", [0, 1, 7, 100])
def test_observe_times_equals_repeated_observe(amount: float, times: int) -> None:
    registries = CollectorRegistry(), CollectorRegistry()
    one, many = (
        Histogram("h", "h", ["kind"], buckets=BUCKETS, registry=r).labels(kind="jwt")
        for r in registries
    )
    for _ in range(times):
        one.observe(amount)
    observe_times(many, amount, times)
    expected, got = _samples(registries[0]), _samples(registries[1])
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key


def test_observe_times_on_a_labelled_parent_fails_as_observe_does() -> None:
    parent = Histogram("h", "h", ["kind"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="label") as direct:
        parent.observe(1.0)
    with pytest.raises(ValueError, match="label") as batched:
        observe_times(parent, 1.0, 3)
    assert str(batched.value) == str(direct.value)
