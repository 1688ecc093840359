"""Policy decision latency in-process (`make bench`).

Rows (p50/p99 in microseconds, printed and stored in benchmark extra_info):
- `PolicyEngine.decide` for one (action, resource) pair, the per-mint re-check, with the parsed
  policy set warm (goal: p50 <= 100 us)
- the same Cedar question with the policy text re-parsed on every call (what "warm" saves), and
  the bare cedarpy call with the warm set (what svidd's own Python adds)
- a task begin: 3 actions x 2 resources = 6 pairs in one batch
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cedarpy

from server.policy import DecisionRequest, Intent, PolicyEngine, cedar_request
from svid._clock import FakeClock

GOAL_P50_US = 100.0
ROUNDS = 3000
TD = "example.org"
AGENT = "spiffe://example.org/agents/research-bot"
NODE = "spiffe://example.org/svid/agent/join_token/n1"
DEFAULT = Path(__file__).resolve().parents[1] / "server" / "policy" / "default.cedar"


def _percentiles(op: Callable[[], Any], rounds: int = ROUNDS) -> tuple[float, float]:
    for _ in range(300):
        op()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        op()
        samples.append(time.perf_counter_ns() - t)
    samples.sort()
    return samples[rounds // 2] / 1000, samples[int(rounds * 0.99)] / 1000


def _engine() -> PolicyEngine:
    return PolicyEngine(None, FakeClock(), trust_domain=TD)


def _mint_request() -> DecisionRequest:
    return DecisionRequest(
        agent_id=AGENT,
        node_id=NODE,
        intent=Intent(
            frozenset({"read", "write", "invoke_tool"}),
            frozenset({"docs", "search"}),
            on_behalf_of="alice",
        ),
        requested_ttl=300,
        pairs=(("read", "docs"),),
    )


def test_decision_latency_warm_vs_reparsed(benchmark: Any) -> None:
    engine = _engine()
    req = _mint_request()
    assert engine.decide(req).allowed
    warm_p50, warm_p99 = _percentiles(lambda: engine.decide(req))

    # The same request, but Cedar gets the policy text and parses it every time.
    text = DEFAULT.read_text()
    ctx = cedar_request.context_json(req, TD, 1_800_000_000)
    cedar_reqs = cedar_request.cedar_requests(req, [("read", "docs")], ctx)
    # Entities pre-parsed in both rows, so only the policy parse differs.
    entities = cedarpy.Entities.from_json_str(
        cedar_request.entities_json(AGENT, NODE, 0, req.intent)
    )
    warm_set = cedarpy.PolicySet.from_str(text)
    (answer,) = cedarpy.is_authorized_batch(cedar_reqs, text, entities)
    assert answer.allowed
    cold_p50, cold_p99 = _percentiles(
        lambda: cedarpy.is_authorized_batch(cedar_reqs, text, entities), rounds=1000
    )
    raw_p50, _ = _percentiles(lambda: cedarpy.is_authorized_batch(cedar_reqs, warm_set, entities))

    benchmark.pedantic(engine.decide, args=(req,), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        {
            "warm_p50_us": warm_p50,
            "warm_p99_us": warm_p99,
            "reparsed_p50_us": cold_p50,
            "reparsed_p99_us": cold_p99,
            "raw_cedar_warm_p50_us": raw_p50,
            "goal_p50_us": GOAL_P50_US,
        }
    )
    print(
        f"\npolicy decision, 1 pair: warm p50 {warm_p50:.1f} us p99 {warm_p99:.1f} us "
        f"(goal p50 <= {GOAL_P50_US:.0f}); re-parsed per call p50 {cold_p50:.1f} us "
        f"p99 {cold_p99:.1f} us ({cold_p50 / warm_p50:.1f}x); bare cedarpy call with the warm "
        f"set p50 {raw_p50:.1f} us"
    )
    assert warm_p50 < cold_p50


def test_task_begin_decision_latency(benchmark: Any) -> None:
    engine = _engine()
    req = DecisionRequest(
        agent_id=AGENT,
        node_id=NODE,
        intent=Intent(
            frozenset({"read", "write", "fetch_secret"}),
            frozenset({"docs", "search"}),
            on_behalf_of="alice",
        ),
        requested_ttl=300,
    )
    assert len(engine.decide(req).pairs) == 6
    p50, p99 = _percentiles(lambda: engine.decide(req), rounds=1000)
    benchmark.pedantic(engine.decide, args=(req,), rounds=1000, iterations=1)
    benchmark.extra_info.update({"pairs": 6, "p50_us": p50, "p99_us": p99})
    print(f"\npolicy decision, task begin with 6 pairs: p50 {p50:.1f} us p99 {p99:.1f} us")
