"""The Cedar policy engine: outcomes, the high-risk rule, TTL caps, reload and validation."""

from __future__ import annotations

import logging
from pathlib import Path

import cedarpy
import pytest
from cedarpy import pst

from server.policy import (
    Decision,
    DecisionRequest,
    Intent,
    Outcome,
    PolicyEngine,
    PolicyError,
    validate_policy_dir,
)
from server.policy import engine as engine_module
from server.policy.cedar_request import cedar_requests, context_json, entities_json
from server.policy.engine import EVALUATION_ERROR_LOG_INTERVAL, MAX_REASON_BYTES
from server.policy.errors import Problem
from server.policy.loader import PolicyMeta, merge_files
from svid._clock import FakeClock

TD = "example.org"
NODE = "spiffe://example.org/svid/agent/join_token/n1"
RESEARCH = "spiffe://example.org/agents/research-bot"
BILLING = "spiffe://example.org/agents/billing-bot"


def ask(
    engine: PolicyEngine,
    actions: set[str],
    resources: set[str],
    *,
    agent: str = RESEARCH,
    ttl: int = 300,
    risk: int = 0,
    violations: int = 0,
    **intent: object,
) -> Decision:
    return engine.decide(
        DecisionRequest(
            agent_id=agent,
            node_id=NODE,
            intent=Intent(frozenset(actions), frozenset(resources), **intent),  # type: ignore[arg-type]
            requested_ttl=ttl,
            risk=risk,
            violations=violations,
        )
    )


@pytest.fixture
def engine() -> PolicyEngine:
    return PolicyEngine(None, FakeClock(), trust_domain=TD)


def write(d: Path, name: str, text: str) -> Path:
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(text)
    return p


READ_ONLY = """
@id("read_docs")
@ttl_cap("600")
permit (principal is Agent, action == Action::"read", resource);
"""


def test_default_policy_allows_reading_declared_resources(engine: PolicyEngine) -> None:
    d = ask(engine, {"read", "write"}, {"docs"})
    assert d.outcome is Outcome.ALLOW
    assert d.granted_actions == ("read", "write")
    assert d.granted_resources == ("docs",)
    assert d.policy_ids == ("default.cedar:work_within_intent",)
    assert "work_within_intent" in d.reason
    assert d.ttl == 300
    assert d.policy_set_hash == engine.policy_set_hash
    assert d.latency_us > 0


def test_an_agent_of_another_trust_domain_is_denied(engine: PolicyEngine) -> None:
    d = ask(engine, {"read"}, {"docs"}, agent="spiffe://evil.org/agents/x")
    assert d.outcome is Outcome.DENY
    assert d.ttl == 0
    assert "default deny" in d.reason


def test_ttl_above_a_cap_is_constrained(engine: PolicyEngine) -> None:
    d = ask(engine, {"read"}, {"docs"}, ttl=3600)
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert d.ttl == 900
    assert "TTL capped to 900s by default.cedar:work_within_intent" in d.reason


@pytest.mark.parametrize("action", ["fetch_secret", "export_data", "change_infra"])
def test_high_risk_actions_are_denied_by_default(engine: PolicyEngine, action: str) -> None:
    d = ask(engine, {action}, {"vault"})
    assert d.outcome is Outcome.DENY
    assert f"no policy permits {action} on vault" in d.reason


def test_mixed_intent_is_narrowed_to_the_permitted_actions(engine: PolicyEngine) -> None:
    d = ask(engine, {"read", "fetch_secret"}, {"docs"})
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert d.granted_actions == ("read",)
    assert d.granted == (("read", "docs"),)
    assert "refused fetch_secret on docs" in d.reason


def test_explicit_permit_grants_a_secret_with_its_ttl_cap(engine: PolicyEngine) -> None:
    d = ask(
        engine,
        {"fetch_secret"},
        {"vault:billing/db-password"},
        agent=BILLING,
        ttl=600,
        environment="prod",
        on_behalf_of="alice",
    )
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert d.granted_actions == ("fetch_secret",)
    assert d.ttl == 60
    assert d.policy_ids == ("default.cedar:billing_bot_reads_db_password",)
    # The same agent outside the permit's conditions gets nothing.
    d = ask(engine, {"fetch_secret"}, {"vault:billing/db-password"}, agent=BILLING, ttl=600)
    assert d.outcome is Outcome.DENY


def test_a_broad_permit_does_not_grant_high_risk_actions(tmp_path: Path) -> None:
    write(tmp_path, "broad.cedar", "permit (principal, action, resource);\n")
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    d = ask(engine, {"read", "export_data", "change_infra"}, {"db"})
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert d.granted_actions == ("read",)
    assert "change_infra is high-risk and no permit names it explicitly" in d.reason
    assert "broad.cedar:policy0" in d.reason


def test_a_permit_on_the_high_risk_group_is_not_explicit(tmp_path: Path) -> None:
    write(
        tmp_path,
        "group.cedar",
        'permit (principal, action in Action::"high_risk", resource);\n',
    )
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    assert ask(engine, {"fetch_secret"}, {"vault"}).outcome is Outcome.DENY


def test_a_forbid_on_the_high_risk_group_overrides_a_permit_naming_the_action(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "p.cedar",
        '@id("secrets")\npermit (principal, action == Action::"fetch_secret", resource);\n'
        '@id("no_high_risk_in_prod")\n'
        'forbid (principal, action in Action::"high_risk", resource)\n'
        'when { context.intent.environment == "prod" };\n',
    )
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    d = ask(engine, {"fetch_secret", "read"}, {"vault"}, environment="prod")
    assert d.outcome is Outcome.DENY
    assert "forbidden by p.cedar:no_high_risk_in_prod" in d.reason
    assert ask(engine, {"fetch_secret"}, {"vault"}, environment="dev").allowed


def test_a_permit_naming_the_action_grants_it_with_the_high_risk_cap(tmp_path: Path) -> None:
    write(
        tmp_path,
        "ops.cedar",
        'permit (principal, action in [Action::"change_infra", Action::"read"], resource);\n',
    )
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    d = ask(engine, {"change_infra"}, {"k8s"}, ttl=3600)
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert d.ttl == 60
    assert "high-risk default cap" in d.reason


def test_restricted_export_is_forbidden_even_with_a_permit(tmp_path: Path) -> None:
    default = Path(__file__).parents[2] / "server" / "policy" / "default.cedar"
    write(tmp_path, "default.cedar", default.read_text())
    write(
        tmp_path,
        "export.cedar",
        '@id("exports")\npermit (principal, action == Action::"export_data", resource);\n',
    )
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    d = ask(engine, {"export_data"}, {"bucket"}, classification="restricted")
    assert d.outcome is Outcome.DENY
    assert "forbidden by default.cedar:no_restricted_export" in d.reason
    assert "needs an explicit exception" in d.reason
    assert d.policy_ids == ("default.cedar:no_restricted_export",)
    # Non-restricted data goes out under the explicit permit.
    d = ask(engine, {"export_data"}, {"bucket"}, classification="internal")
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert d.policy_ids == ("export.cedar:exports",)


@pytest.mark.parametrize(("risk", "violations"), [(80, 0), (0, 3)])
def test_risk_signal_stops_issuance(engine: PolicyEngine, risk: int, violations: int) -> None:
    d = ask(engine, {"read"}, {"docs"}, risk=risk, violations=violations)
    assert d.outcome is Outcome.DENY
    assert "default.cedar:stop_risky_agents" in d.reason
    assert ask(engine, {"read"}, {"docs"}, risk=79, violations=2).outcome is Outcome.ALLOW


def test_delegation_depth_cap_in_policy(engine: PolicyEngine) -> None:
    assert ask(engine, {"read"}, {"docs"}, delegation_depth=3).outcome is Outcome.ALLOW
    d = ask(engine, {"read"}, {"docs"}, delegation_depth=4)
    assert d.outcome is Outcome.DENY
    assert "delegation_depth_cap" in d.reason


def test_an_action_unknown_to_the_schema_is_denied(engine: PolicyEngine) -> None:
    d = ask(engine, {"teleport", "read"}, {"docs"})
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert "teleport is not an action of the policy schema" in d.reason


def test_a_reason_names_a_few_pairs_of_each_clause_and_counts_the_rest(
    engine: PolicyEngine,
) -> None:
    """It went whole into the task's record, its event, a log line and a denial's gRPC status:
    every granted pair and every refused pair of a reason."""
    resources = {f"https://api.example/{i:03d}" for i in range(60)}
    d = ask(engine, {"read", "teleport"}, resources)
    assert d.outcome is Outcome.ALLOW_CONSTRAINED
    assert len(d.granted) == 60  # all granted, as the reason lists only a few
    assert d.reason.startswith(
        "allowed constrained: granted read on https://api.example/000, "
        + ", ".join(f"read on https://api.example/{i:03d}" for i in range(1, 5))
        + " and 55 more; refused teleport on https://api.example/000, "
    )
    assert "teleport on https://api.example/004 and 55 more: teleport is not an action" in (
        d.reason
    )
    # Long names listed still make a short reason: cut, and said to be.
    long = {f"{i:02d}" + "r" * 254 for i in range(8)}
    d = ask(engine, {"teleport", "warp", "jump", "fly"}, long)
    assert d.outcome is Outcome.DENY
    assert len(d.reason.encode()) <= MAX_REASON_BYTES
    assert d.reason.endswith(" ... (cut)")


def test_pairs_restrict_evaluation_to_one_mint(engine: PolicyEngine) -> None:
    req = DecisionRequest(
        agent_id=RESEARCH,
        node_id=NODE,
        intent=Intent(frozenset({"read", "write"}), frozenset({"docs", "search"})),
        requested_ttl=60,
        pairs=(("read", "search"),),
    )
    d = engine.decide(req)
    assert d.outcome is Outcome.ALLOW
    assert d.granted == (("read", "search"),)


def test_action_list_comes_from_the_schema(engine: PolicyEngine) -> None:
    assert engine.actions == {
        "read",
        "write",
        "invoke_tool",
        "fetch_secret",
        "export_data",
        "change_infra",
    }
    assert engine.high_risk_actions == {"fetch_secret", "export_data", "change_infra"}


def test_the_request_svidd_builds_fits_the_schema() -> None:
    engine = PolicyEngine(None, FakeClock(), trust_domain=TD)
    schema = cedarpy.Schema.from_json_str(
        (Path(__file__).parents[2] / "server/policy/svid.cedarschema.json").read_text()
    )
    req = DecisionRequest(
        RESEARCH,
        NODE,
        Intent(frozenset({"read"}), frozenset({"docs"}), on_behalf_of="alice", parent_task="t"),
        60,
    )
    ents = cedarpy.Entities.from_json_str(entities_json(RESEARCH, NODE, 5, req.intent), schema)
    ctx = context_json(req, TD, 1_700_000_000)
    (r,) = cedarpy.is_authorized_batch(
        cedar_requests(req, [("read", "docs")], ctx),
        engine._loaded.policy_set,
        ents,
        schema=schema,
    )
    assert r.diagnostics.errors == []
    assert r.allowed


# --- loading, validation, reload ---


def test_syntax_error_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "a.cedar", READ_ONLY)
    write(
        tmp_path,
        "b.cedar",
        '// header\n@id("ok")\npermit (principal, action == Action::"read", resource);\n\n'
        '@id("broken")\npermit (principal, action, resource) when { principal.risk >>= 3 };\n',
    )
    with pytest.raises(PolicyError) as exc:
        PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    (problem,) = exc.value.problems
    assert problem.file == "b.cedar"
    assert problem.line == 5
    assert "syntax error" in problem.message
    assert "b.cedar:5" in str(exc.value)


def test_schema_invalid_policy_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.cedar",
        READ_ONLY + '\n@id("typo")\nforbid (principal, action, resource)\n'
        "  when { principal.rsk > 3 };\n",
    )
    with pytest.raises(PolicyError) as exc:
        PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    (problem,) = exc.value.problems
    assert problem.policy_id == "p.cedar:typo"
    assert problem.line == 6
    assert "rsk" in problem.message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('@ttl_cap("soon")\npermit (principal, action, resource);', "not a positive number"),
        ('@ttl_cap("0")\npermit (principal, action, resource);', "not a positive number"),
        # A digit to str.isdigit, not to int(): superscript two.
        ('@ttl_cap("\u00b2")\npermit (principal, action, resource);', "not a positive number"),
        ('@ttl_cap("5")\nforbid (principal, action, resource);', "no effect"),
        (
            '@id("x")\npermit (principal, action, resource);\n'
            '@id("x")\nforbid (principal, action, resource);',
            "duplicate @id",
        ),
        ("permit (principal == ?principal, action, resource);", "templates"),
        ('permit (principal, action == Action::"fly", resource);', "schema"),
    ],
)
def test_bad_annotations_and_unknown_actions_are_refused(
    tmp_path: Path, text: str, needle: str
) -> None:
    write(tmp_path, "p.cedar", READ_ONLY + "\n" + text)
    with pytest.raises(PolicyError, match=needle) as exc:
        PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    # READ_ONLY takes lines 1-5; the offending policy starts on line 6 or later.
    assert all(p.line is None or p.line >= 6 for p in exc.value.problems)
    if needle != "templates":
        assert any(p.line is not None for p in exc.value.problems)


def test_failed_reload_keeps_the_old_set_serving(tmp_path: Path) -> None:
    write(tmp_path, "p.cedar", READ_ONLY)
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    old_hash = engine.policy_set_hash
    assert ask(engine, {"read"}, {"docs"}).outcome is Outcome.ALLOW
    write(tmp_path, "p.cedar", READ_ONLY + "permit (principal, action, resource")
    with pytest.raises(PolicyError, match=r"p\.cedar"):
        engine.reload()
    assert engine.policy_set_hash == old_hash
    d = ask(engine, {"read"}, {"docs"})
    assert d.outcome is Outcome.ALLOW
    assert d.policy_set_hash == old_hash


def test_reload_swaps_in_new_policies_and_hash(tmp_path: Path) -> None:
    clock = FakeClock()
    write(tmp_path, "p.cedar", READ_ONLY)
    engine = PolicyEngine(tmp_path, clock, trust_domain=TD)
    old = engine.info
    assert ask(engine, {"write"}, {"docs"}).outcome is Outcome.DENY
    write(
        tmp_path,
        "p.cedar",
        READ_ONLY.replace('== Action::"read"', 'in [Action::"read", Action::"write"]'),
    )
    clock.advance(5)
    info = engine.reload()
    assert info.hash != old.hash
    assert info.loaded_at == old.loaded_at + 5
    assert info.policy_ids == ("p.cedar:read_docs",)
    d = ask(engine, {"write"}, {"docs"})
    assert d.outcome is Outcome.ALLOW
    assert d.policy_set_hash == info.hash


def test_hash_depends_on_content_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "p.cedar", READ_ONLY)
    write(b, "p.cedar", READ_ONLY)
    ha = PolicyEngine(a, FakeClock(), trust_domain=TD).policy_set_hash
    assert ha == PolicyEngine(b, FakeClock(), trust_domain=TD).policy_set_hash
    write(b, "p.cedar", READ_ONLY + "\n// a comment is content too\n")
    assert ha != PolicyEngine(b, FakeClock(), trust_domain=TD).policy_set_hash


def test_validate_reports_problems_without_swapping(tmp_path: Path) -> None:
    live, candidate = tmp_path / "live", tmp_path / "candidate"
    write(live, "p.cedar", READ_ONLY)
    engine = PolicyEngine(live, FakeClock(), trust_domain=TD)
    write(candidate, "p.cedar", "permit (principal, action, resource) when { nope };")
    problems = engine.validate(candidate)
    assert len(problems) == 1
    assert problems[0].file == "p.cedar"
    assert engine.validate() == []
    write(candidate, "p.cedar", "permit (principal, action, resource);")
    assert engine.validate(candidate) == []
    assert engine.info.policy_ids == ("p.cedar:read_docs",)


def test_no_dir_or_an_empty_one_serves_the_shipped_default(tmp_path: Path) -> None:
    # A configured directory that is missing is an error (test_a_policy_dir_that_is_gone...).
    for d in (None, tmp_path):
        engine = PolicyEngine(d, FakeClock(), trust_domain=TD)
        assert engine.info.source == "builtin default"
        assert "default.cedar:work_within_intent" in engine.info.policy_ids


def test_an_operator_schema_can_add_actions(tmp_path: Path) -> None:
    import json

    doc = json.loads(
        (Path(__file__).parents[2] / "server/policy/svid.cedarschema.json").read_text()
    )
    actions = doc[""]["actions"]
    actions["deploy"] = {
        "memberOf": [{"id": "high_risk"}],
        "appliesTo": actions["read"]["appliesTo"],
    }
    write(tmp_path, "site.cedarschema.json", json.dumps(doc))
    write(tmp_path, "p.cedar", 'permit (principal, action == Action::"deploy", resource);')
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    assert "deploy" in engine.high_risk_actions
    assert ask(engine, {"deploy"}, {"k8s"}).granted_actions == ("deploy",)


def test_an_action_in_a_group_of_the_high_risk_group_is_high_risk(tmp_path: Path) -> None:
    import json

    doc = json.loads(
        (Path(__file__).parents[2] / "server/policy/svid.cedarschema.json").read_text()
    )
    actions = doc[""]["actions"]
    actions["secrets"] = {"memberOf": [{"id": "high_risk"}]}
    actions["fetch_secret"]["memberOf"] = [{"id": "secrets"}]
    write(tmp_path, "site.cedarschema.json", json.dumps(doc))
    write(tmp_path, "broad.cedar", "permit (principal, action, resource);\n")
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    assert "fetch_secret" in engine.high_risk_actions
    d = ask(engine, {"fetch_secret"}, {"vault"}, ttl=3600)
    assert d.outcome is Outcome.DENY
    assert "fetch_secret is high-risk and no permit names it explicitly" in d.reason


def test_a_schema_that_does_not_fit_svidd_requests_is_refused(tmp_path: Path) -> None:
    import json

    doc = json.loads(
        (Path(__file__).parents[2] / "server/policy/svid.cedarschema.json").read_text()
    )
    doc[""]["entityTypes"]["Agent"]["shape"]["attributes"]["team"] = {"type": "String"}
    write(tmp_path, "site.cedarschema.json", json.dumps(doc))
    write(tmp_path, "p.cedar", READ_ONLY)
    with pytest.raises(PolicyError, match="schema rejects"):
        PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)


def test_a_policy_file_linking_to_nothing_is_refused_not_skipped(tmp_path: Path) -> None:
    write(tmp_path, "p.cedar", READ_ONLY)
    (tmp_path / "site.cedar").symlink_to(tmp_path / "moved" / "site.cedar")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "moved" / "notes.txt")  # not a policy
    with pytest.raises(PolicyError, match="a symbolic link to no file") as exc:
        PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    (problem,) = exc.value.problems
    assert problem.file == "site.cedar"


def test_validate_policy_dir_without_an_engine(tmp_path: Path) -> None:
    write(tmp_path, "p.cedar", READ_ONLY)
    assert validate_policy_dir(tmp_path, trust_domain=TD, clock=FakeClock()).problems == ()
    write(tmp_path, "q.cedar", "forbid (principal, action, resource) when { principal.nope };")
    (problem,) = validate_policy_dir(tmp_path, trust_domain=TD, clock=FakeClock()).problems
    assert problem.file == "q.cedar"
    assert problem.line == 1


def test_decision_audit_fields(engine: PolicyEngine) -> None:
    d = ask(engine, {"read"}, {"docs"})
    fields = d.audit_fields()
    assert fields["decision"] == "allow"
    assert fields["policy_ids"] == ("default.cedar:work_within_intent",)
    assert fields["policy_set_hash"] == engine.policy_set_hash
    assert fields["ttl"] == 300


def test_a_tool_is_a_member_of_its_server_and_can_be_named_alone(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.cedar",
        """
        permit (principal, action == Action::"invoke_tool", resource in Resource::"mcp-a")
        when { resource is Tool && resource.name != "drop_table" };
        forbid (principal, action, resource == Tool::"mcp-a#export");
        """,
    )
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    tools = frozenset({"mcp-a#read", "mcp-a#export", "mcp-a#drop_table", "mcp-b#read"})
    decision = ask(engine, set(), set(), tools=tools)
    assert decision.outcome is Outcome.ALLOW_CONSTRAINED
    assert decision.granted == (("invoke_tool", "mcp-a#read"),)


def test_the_default_policy_grants_declared_tools_and_sees_elevation(engine: PolicyEngine) -> None:
    decision = ask(engine, {"read"}, {"docs"}, tools=frozenset({"mcp-a#read"}), elevated=True)
    assert decision.outcome is Outcome.ALLOW
    assert decision.granted == (("invoke_tool", "mcp-a#read"), ("read", "docs"))
    assert "default.cedar:call_declared_tools" in decision.policy_ids


def test_a_decision_is_reused_only_for_the_same_question_set_and_second(tmp_path: Path) -> None:
    # Policy may read context.now: an answer is reused within its second, never after it, and
    # never across a reload (even one that lands in the same second).
    clock = FakeClock(1_700_000_000.0)
    write(
        tmp_path,
        "p.cedar",
        'permit(principal, action == Action::"read", resource) when { context.now < 1700000001 };',
    )
    engine = PolicyEngine(tmp_path, clock, trust_domain=TD)
    first = ask(engine, {"read"}, {"docs"})
    assert first.outcome is Outcome.ALLOW
    clock.advance(0.5)
    assert ask(engine, {"read"}, {"docs"}) is first
    assert ask(engine, {"read"}, {"docs"}, violations=1) is not first  # another question
    clock.advance(0.5)
    assert ask(engine, {"read"}, {"docs"}).outcome is Outcome.DENY  # the next second
    write(tmp_path, "p.cedar", 'permit(principal, action == Action::"read", resource);')
    engine.reload()
    assert ask(engine, {"read"}, {"docs"}).outcome is Outcome.ALLOW


def test_the_decisions_of_one_second_are_kept_up_to_a_bound_in_pairs(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Within one second a fleet's distinct questions are many: past the bound (in pairs, as a
    # max-size intent's decision weighs 512 one-pair ones) the second's cache starts again.
    monkeypatch.setattr(engine_module, "_DECISION_CACHE_PAIRS", 8, raising=False)
    first = ask(engine, {"read"}, {"docs"})
    assert ask(engine, {"read"}, {"docs"}) is first
    ask(engine, {"read", "write"}, {"docs", "wiki", "mail"})  # 6 pairs: 7 held
    assert ask(engine, {"read"}, {"docs"}) is first
    ask(engine, {"read", "write"}, {"docs", "wiki"})  # 4 more: past 8, the cache starts again
    assert ask(engine, {"read"}, {"docs"}) is not first


# -- a server's every tool (invoke_tool on the server as a resource) -------------------------

WHOLE_SERVER = """
permit (principal, action == Action::"invoke_tool", resource in Resource::"mcp-a");
"""


@pytest.mark.parametrize(
    ("forbid", "named"),
    [
        # The documented form: one tool named.
        ('forbid (principal, action, resource == Tool::"mcp-a#export");', "mcp-a#export"),
        # Named in a set, in a condition.
        (
            "forbid (principal, action, resource is Tool) "
            'when { [Tool::"mcp-a#export"].contains(resource) };',
            "mcp-a#export",
        ),
        # By name, or by a pattern of names.
        (
            'forbid (principal, action, resource is Tool) when { resource.name == "export" };',
            "mcp-a#export",
        ),
        (
            'forbid (principal, action, resource is Tool) when { resource.name like "drop_*" };',
            "mcp-a#drop_",
        ),
        # Every tool but one.
        (
            'forbid (principal, action, resource is Tool) unless { resource.name == "read" };',
            "mcp-a#",
        ),
    ],
)
def test_a_forbidden_tool_keeps_a_whole_server_grant_out(
    tmp_path: Path, forbid: str, named: str
) -> None:
    # invoke_tool on a server grants every tool of it. A forbid on one of its tools never saw
    # such a request (its resource is the server, not the tool), so the task got the forbidden
    # tool all the same: the server-wide grant is refused while a forbid keeps a tool of it out.
    write(tmp_path, "p.cedar", WHOLE_SERVER + forbid)
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    decision = ask(engine, {"invoke_tool"}, {"mcp-a"})
    assert decision.outcome is Outcome.DENY
    (pair,) = decision.pairs
    assert not pair.allowed
    assert f"every tool of mcp-a: {named}" in pair.reason
    assert "name the tools" in pair.reason
    # Naming the tools it needs, the task gets those.
    named_ok = ask(engine, set(), set(), tools=frozenset({"mcp-a#read"}))
    assert named_ok.outcome is Outcome.ALLOW


def test_a_whole_server_grant_stands_when_no_forbid_reaches_its_tools(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.cedar",
        WHOLE_SERVER
        + 'forbid (principal, action, resource == Tool::"mcp-b#export");'
        + 'forbid (principal, action, resource is Tool) when { resource.server == "mcp-b" };',
    )
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    decision = ask(engine, {"invoke_tool"}, {"mcp-a"})
    assert decision.outcome is Outcome.ALLOW
    assert decision.granted == (("invoke_tool", "mcp-a"),)


def test_the_default_policy_tool_forbid_example_holds_for_a_whole_server(
    engine: PolicyEngine, tmp_path: Path
) -> None:
    default = (Path(__file__).parents[2] / "server/policy/default.cedar").read_text()
    example = default.split("// One tool of a server stays out of reach")[1].split("\n//\n")[0]
    policy = "\n".join(line.removeprefix("// ") for line in example.splitlines()[1:])
    assert "forbid" in policy
    write(tmp_path, "default.cedar", default + "\n" + policy)
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    decision = ask(engine, {"invoke_tool", "read"}, {"mcp-tickets"})
    assert decision.outcome is Outcome.ALLOW_CONSTRAINED
    assert decision.granted == (("read", "mcp-tickets"),)


def test_a_policy_dir_that_is_gone_is_an_error_not_the_default_policy(tmp_path: Path) -> None:
    # A mistyped policy_dir, or one moved away under a running server, must not swap the
    # operator's policies (their forbids with them) for the shipped default.
    missing = tmp_path / "polices"
    with pytest.raises(PolicyError, match="no such directory"):
        PolicyEngine(missing, FakeClock(), trust_domain=TD)
    (tmp_path / "file").write_text("")
    with pytest.raises(PolicyError, match="not a directory"):
        PolicyEngine(tmp_path / "file", FakeClock(), trust_domain=TD)
    policies = tmp_path / "policies"
    write(policies, "p.cedar", READ_ONLY)
    engine = PolicyEngine(policies, FakeClock(), trust_domain=TD)
    serving = engine.policy_set_hash
    policies.rename(tmp_path / "moved")
    with pytest.raises(PolicyError, match="no such directory"):
        engine.reload()
    assert engine.policy_set_hash == serving  # the operator's set keeps serving
    assert ask(engine, {"write"}, {"docs"}).outcome is Outcome.DENY  # READ_ONLY, not default
    # No directory configured at all: the shipped default, as documented.
    assert PolicyEngine(None, FakeClock(), trust_domain=TD).info.source == "builtin default"


@pytest.mark.parametrize(
    ("condition", "tool", "why"),
    [
        # Two patterns at once: a probe for each ("admin_", "_write") matches only one of them,
        # so such a forbid is not left to the probes.
        (
            'when { resource.name like "admin_*" && resource.name like "*_write" }',
            "admin_db_write",
            "forbid p.cedar:policy1 may keep some of them out, and svidd cannot tell which "
            "(two `like` patterns",
        ),
        # A pattern with its own shortest instance exempted: "export" is let through, so a
        # longer name the pattern matches is asked too.
        (
            'when { resource.name like "export*" } unless { resource.name == "export" }',
            "export_all",
            "mcp-a#exporta is forbidden by p.cedar:policy1",
        ),
        # Every tool but a pattern's and one: the made-up name matches the pattern, so a name
        # matching neither is asked too.
        (
            'unless { resource.name like "*-tool" || resource.name == "read" }',
            "write",
            "mcp-a#a is forbidden by p.cedar:policy1",
        ),
        # The name against the request: no probe can stand for every tool.
        (
            "when { resource.name == context.intent.environment }",
            "prod",
            "forbid p.cedar:policy1 may keep some of them out, and svidd cannot tell which "
            "(it reads the tool other than",
        ),
    ],
)
def test_a_whole_server_grant_is_refused_while_a_forbid_could_keep_a_tool_out_unasked(
    tmp_path: Path, condition: str, tool: str, why: str
) -> None:
    # A server-wide invoke_tool grant lets its token call any tool of the server
    # (TaskClaims.grants_tool). The probes asked for it once stood for a forbid's patterns one
    # by one (literals joined), so a forbid no probe met kept its tool out only when named.
    write(
        tmp_path,
        "p.cedar",
        WHOLE_SERVER + f"forbid (principal, action, resource is Tool) {condition};",
    )
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    # The tool named alone is forbidden ...
    named = ask(engine, set(), set(), tools=frozenset({f"mcp-a#{tool}"}), environment="prod")
    assert named.outcome is Outcome.DENY
    # ... so the grant of every tool of mcp-a, that one among them, does not stand.
    whole = ask(engine, {"invoke_tool"}, {"mcp-a"}, environment="prod")
    assert whole.outcome is Outcome.DENY, whole.reason
    assert f"every tool of mcp-a: {why}" in whole.reason
    assert whole.reason.endswith("name the tools the task needs in intent.tools")
    assert whole.policy_ids == ("p.cedar:policy1",)


@pytest.mark.parametrize(
    "forbid",
    [
        # Its scope is another server's tools, or another action than invoke_tool.
        'forbid (principal, action, resource is Tool in Resource::"mcp-b") '
        'when { resource.name like "a*" && resource.name like "*b" };',
        'forbid (principal, action == Action::"read", resource) '
        'when { resource is Tool && resource.name like "a*" && resource.name like "*b" };',
    ],
)
def test_a_forbid_the_probes_cannot_decide_leaves_grants_it_cannot_reach_standing(
    tmp_path: Path, forbid: str
) -> None:
    write(tmp_path, "p.cedar", WHOLE_SERVER + forbid)
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    whole = ask(engine, {"invoke_tool"}, {"mcp-a"})
    assert whole.outcome is Outcome.ALLOW, whole.reason


def test_a_policy_that_fails_to_evaluate_denies_and_is_logged_once_an_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Cedar skips a policy whose condition errors at run time (a Long overflow here, which the
    # schema passes): a skipped forbid no longer overrides the permit. Any evaluation error is
    # a denial, with the error in its reason.
    overflow = "context.requested_ttl * 100000000000000000 > 500000000000000000"
    write(
        tmp_path,
        "p.cedar",
        READ_ONLY
        + WHOLE_SERVER
        + '@id("no_long_tasks")\n@reason("no long tasks")\n'
        + f"forbid (principal, action, resource) when {{ {overflow} }};",
    )
    clock = FakeClock()
    engine = PolicyEngine(tmp_path, clock, trust_domain=TD)
    caplog.set_level(logging.WARNING, "svid.server.policy")
    decision = ask(engine, {"read"}, {"docs"}, ttl=300)
    assert decision.outcome is Outcome.DENY, decision.reason
    assert decision.policy_ids == ("p.cedar:no_long_tasks",)
    assert "failed to evaluate" in decision.reason
    assert "integer overflow" in decision.reason
    # Below the overflow the forbid applies as written, and lets 4 s through.
    assert ask(engine, {"read"}, {"docs"}, ttl=4).outcome is Outcome.ALLOW
    # Logged once for the policy, then once an interval saying how many it stands for.
    (line,) = caplog.records
    assert line.policy_id == "p.cedar:no_long_tasks"  # type: ignore[attr-defined]
    assert "integer overflow" in line.error  # type: ignore[attr-defined]
    ask(engine, {"read"}, {"docs"}, ttl=301)
    clock.advance(EVALUATION_ERROR_LOG_INTERVAL)
    ask(engine, {"read"}, {"docs"}, ttl=302)
    assert [r.times for r in caplog.records] == [1, 2]  # type: ignore[attr-defined]
    # A grant of a server's every tool, with the forbid on its tools only: their probes fail.
    tools_only = tmp_path / "tools_only"
    write(
        tools_only,
        "p.cedar",
        WHOLE_SERVER + f"forbid (principal, action, resource is Tool) when {{ {overflow} }};",
    )
    engine = PolicyEngine(tools_only, clock, trust_domain=TD)
    whole = ask(engine, {"invoke_tool"}, {"mcp-a"}, ttl=300)
    assert whole.outcome is Outcome.DENY
    assert "every tool of mcp-a: mcp-a#svidd.unnamed-tool is denied as a policy failed" in (
        whole.reason
    )
    assert ask(engine, {"invoke_tool"}, {"mcp-a"}, ttl=4).outcome is Outcome.ALLOW


def test_a_colon_in_a_policy_file_name_or_id_is_refused_so_no_two_files_give_one_id(
    tmp_path: Path,
) -> None:
    # Ids are `<file>:<@id>`: `@id("b.cedar:guard")` in a.cedar and `@id("guard")` in a file
    # named `a.cedar:b.cedar` were both `a.cedar:b.cedar:guard`, and merging the files by id
    # kept the permit and dropped the forbid without a problem.
    guarded = (
        'permit (principal, action == Action::"read", resource);\n'
        '@id("guard")\n'
        'forbid (principal, action == Action::"read", resource == Resource::"payroll");\n'
    )
    write(tmp_path, "a.cedar", guarded)
    engine = PolicyEngine(tmp_path, FakeClock(), trust_domain=TD)
    serving = engine.policy_set_hash
    write(tmp_path, "a.cedar", guarded.replace('@id("guard")', '@id("b.cedar:guard")'))
    write(
        tmp_path,
        "a.cedar:b.cedar",
        '@id("guard")\npermit (principal, action == Action::"write", resource == Resource::"x");\n',
    )
    problems = validate_policy_dir(tmp_path, trust_domain=TD, clock=FakeClock()).problems
    found = {(p.file, p.line, p.policy_id): p.message for p in problems}
    assert found.keys() == {
        ("a.cedar", 2, "a.cedar:b.cedar:guard"),  # the @id
        ("a.cedar:b.cedar", None, None),  # the file name
        ("a.cedar:b.cedar", None, "a.cedar:b.cedar:guard"),  # and the id both give
    }
    assert "':'" in found["a.cedar", 2, "a.cedar:b.cedar:guard"]
    assert "':'" in found["a.cedar:b.cedar", None, None]
    assert "also given by a.cedar" in found["a.cedar:b.cedar", None, "a.cedar:b.cedar:guard"]
    with pytest.raises(PolicyError):
        engine.reload()
    # The set before keeps serving, its forbid with it.
    assert engine.policy_set_hash == serving
    assert ask(engine, {"read"}, {"payroll"}).outcome is Outcome.DENY


def test_one_policy_id_from_two_files_is_a_problem_naming_both() -> None:
    # Unreachable through file names and @ids once neither holds ':', and checked all the same:
    # a merge keeping the last of two would drop the other policy without a word.
    def parsed(file: str, effect: str) -> dict[str, tuple[pst.Template, PolicyMeta]]:
        tree = cedarpy.policies_to_pst(f"{effect} (principal, action, resource);")
        (policy,) = tree.static_policies.values()
        meta = PolicyMeta("x.cedar:p", file, effect, frozenset(), None, None)
        return {meta.policy_id: (policy, meta)}

    problems: list[Problem] = []
    _, meta = merge_files(
        [("x.cedar", parsed("x.cedar", "forbid")), ("y.cedar", parsed("y.cedar", "permit"))],
        problems,
    )
    assert meta["x.cedar:p"].effect == "forbid"
    assert [(p.file, p.policy_id) for p in problems] == [("y.cedar", "x.cedar:p")]
    assert "also given by x.cedar" in problems[0].message


UNDECIDED_FORBID = (
    'permit (principal, action == Action::"invoke_tool", resource in Resource::"mcp-a");\n'
    '@id("by-environment")\n'
    'forbid (principal, action, resource is Tool in Resource::"mcp-a")\n'
    "when { resource.name == context.intent.environment };\n"
)


def test_a_served_set_with_a_forbid_the_probes_cannot_decide_is_logged_at_load_and_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `policy validate` warns of it, but a server's operator may never run that: the server says
    # so when it starts serving the set, and again when a reload brings one in.
    policy_dir = tmp_path / "policy"
    write(policy_dir, "site.cedar", READ_ONLY)
    caplog.set_level(logging.WARNING, logger="svid.server.policy")
    engine = PolicyEngine(policy_dir, FakeClock(), trust_domain=TD)
    assert not [r for r in caplog.records if "forbid" in r.getMessage()]
    write(policy_dir, "site.cedar", READ_ONLY + UNDECIDED_FORBID)
    engine.reload()
    (reloaded,) = [r.getMessage() for r in caplog.records]
    assert "site.cedar [site.cedar:by-environment]" in reloaded
    assert "every tool of mcp-a" in reloaded
    caplog.clear()
    PolicyEngine(policy_dir, FakeClock(), trust_domain=TD)
    (started,) = [r.getMessage() for r in caplog.records]
    assert started == reloaded
