"""Read an operator's policy directory into a validated, parsed, ready-to-serve policy set.

Policy ids are `<file>:<@id>` (or `<file>:policyN`, Cedar's positional id, when a policy has no
@id), so a decision names the file an operator has to open. Neither part may hold `:`, so one id
comes from one file only. Annotations svidd reads:

- `@id("name")`: the policy's name in decisions and the audit log (unique per file, no `:`).
- `@ttl_cap("seconds")`: on a permit, the longest TTL it grants; the effective cap is the minimum
  over the determining policies.
- `@reason("text")`: on a forbid, the sentence a denial carries.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cedarpy
from cedarpy import pst

from server.policy.errors import PolicyError, Problem
from server.policy.schema import (
    BUILTIN_SCHEMA_NAME,
    SCHEMA_SUFFIX,
    SchemaInfo,
    builtin_schema_text,
    load_schema,
)
from server.policy.tool_probes import ToolProbes, find_tool_probes

POLICY_SUFFIX = ".cedar"
# Between a policy's file name and its name in its id: neither may hold it.
ID_SEPARATOR = ":"
BUILTIN_POLICY_NAME = "default.cedar"
_HASH_DOMAIN = b"svidd-policy-set-v1\x00"


@dataclass(frozen=True)
class PolicyMeta:
    """What svidd needs to know about one policy beyond Cedar's verdict."""

    policy_id: str
    file: str
    effect: str
    # Action names written in the policy's scope; empty when the scope is `action` (any action).
    named_actions: frozenset[str]
    ttl_cap: int | None
    reason: str | None


@dataclass(frozen=True)
class SourceFile:
    name: str
    data: bytes


@dataclass(frozen=True)
class LoadedSet:
    policy_set: cedarpy.PolicySet
    meta: Mapping[str, PolicyMeta]
    schema: SchemaInfo
    hash: str
    files: tuple[str, ...]
    source: str
    # The tools asked about for a grant of a server's every tool, and the forbids that refuse
    # such a grant as the probes cannot decide them.
    tool_probes: ToolProbes


def read_sources(policy_dir: Path | None) -> tuple[list[SourceFile], SourceFile | None, str]:
    """Policy files and schema file of a directory; the shipped defaults fill in what is missing.

    A directory named but not there is an error, never the default: a mistyped path (or one
    moved away under a running server, then reloaded) would trade the operator's policies, their
    forbids with them, for the shipped ones. Only no directory at all means the default."""
    policies: list[SourceFile] = []
    schema: SourceFile | None = None
    if policy_dir is not None and not policy_dir.is_dir():
        why = "not a directory" if policy_dir.exists() else "no such directory"
        raise PolicyError([Problem(str(policy_dir), why)])
    if policy_dir is not None:
        for path in sorted(policy_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                if _dangling_source(path):
                    # Skipped, its policies (a forbid, say) would be gone without a word.
                    raise PolicyError([Problem(path.name, "a symbolic link to no file")])
                continue
            if path.name.endswith(SCHEMA_SUFFIX):
                if schema is not None:
                    raise PolicyError(
                        [Problem(path.name, f"second schema file (already have {schema.name})")]
                    )
                schema = SourceFile(path.name, path.read_bytes())
            elif path.suffix == POLICY_SUFFIX:
                policies.append(SourceFile(path.name, path.read_bytes()))
    source = str(policy_dir) if policies else "builtin default"
    if not policies:
        text = resources.files("server.policy").joinpath(BUILTIN_POLICY_NAME).read_bytes()
        policies = [SourceFile(BUILTIN_POLICY_NAME, text)]
    return policies, schema, source


def _dangling_source(path: Path) -> bool:
    """A policy or schema file name that is a symbolic link to nothing (a moved target)."""
    named = path.suffix == POLICY_SUFFIX or path.name.endswith(SCHEMA_SUFFIX)
    return named and not path.name.startswith(".") and path.is_symlink() and not path.exists()


def policy_set_hash(policies: list[SourceFile], schema: SourceFile) -> str:
    """sha256 over the exact bytes of every file, in name order, each framed by name and length."""
    h = hashlib.sha256(_HASH_DOMAIN)
    for f in sorted([*policies, schema], key=lambda f: f.name):
        h.update(f.name.encode() + b"\x00" + str(len(f.data)).encode() + b"\x00" + f.data)
    return h.hexdigest()


def _first_code_line(lines: list[str], start: int) -> int:
    """1-based number of the first line at or after index `start` that is not blank or comment."""
    for i in range(start, len(lines)):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("//"):
            return i + 1
    return max(1, min(start + 1, len(lines)))


def policy_start_lines(text: str) -> tuple[list[int], int]:
    """Where each policy starts (1-based), and where the first unparsable policy starts.

    cedarpy reports no source positions, so on the error path only we find them by parsing growing
    prefixes of the file: a prefix that parses ends on a policy boundary.
    """
    lines = text.splitlines()
    starts: list[int] = []
    count = 0
    boundary = 0
    for k in range(1, len(lines) + 1):
        try:
            n = len(cedarpy.PolicySet.from_str("\n".join(lines[:k])))
        except ValueError:
            continue
        if n > count:
            start = _first_code_line(lines, boundary)
            starts.extend([start] * (n - count))
            count, boundary = n, k
    return starts, _first_code_line(lines, boundary)


def _named_actions(scope: object) -> frozenset[str]:
    if isinstance(scope, pst.ActionEq):
        return frozenset({scope.entity.id})
    if isinstance(scope, pst.ActionIn):
        return frozenset(e.id for e in scope.entities)
    return frozenset()


def _meta_for(file: str, local_id: str, policy: pst.Template) -> tuple[PolicyMeta, list[str]]:
    ann = policy.annotations
    name = ann.get("id") or local_id
    complaints: list[str] = []
    if ID_SEPARATOR in name:
        # `a.cedar` with @id("b:x") and a file `a.cedar:b` with @id("x") would both be
        # `a.cedar:b:x`, and one policy (a forbid, say) would be gone from the set.
        complaints.append(f"@id({name!r}) holds {ID_SEPARATOR!r}, which separates file and name")
    ttl_cap: int | None = None
    if "ttl_cap" in ann:
        raw = ann["ttl_cap"]
        # isdecimal, not isdigit: "²" is a digit that int() refuses (a ValueError, not a Problem).
        if not raw.isdecimal() or int(raw) <= 0:
            complaints.append(f"@ttl_cap({raw!r}) is not a positive number of seconds")
        elif policy.effect != "permit":
            complaints.append("@ttl_cap on a forbid policy has no effect")
        else:
            ttl_cap = int(raw)
    meta = PolicyMeta(
        policy_id=f"{file}{ID_SEPARATOR}{name}",
        file=file,
        effect=str(policy.effect),
        named_actions=_named_actions(policy.action),
        ttl_cap=ttl_cap,
        reason=ann.get("reason"),
    )
    return meta, complaints


def _position(local_id: str) -> int | None:
    """Cedar numbers policies of one parse `policy0`, `policy1`, ... in file order."""
    digits = local_id.removeprefix("policy")
    return int(digits) if digits.isdigit() else None


def _parse_file(
    src: SourceFile, schema: SchemaInfo, problems: list[Problem]
) -> dict[str, tuple[pst.Template, PolicyMeta]]:
    try:
        text = src.data.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(Problem(src.name, f"not UTF-8: {e}"))
        return {}
    try:
        tree = cedarpy.policies_to_pst(text)
    except ValueError as e:
        _, bad_line = policy_start_lines(text)
        problems.append(Problem(src.name, f"syntax error: {e}", bad_line))
        return {}
    if tree.templates:
        problems.append(
            Problem(src.name, "policy templates (?principal/?resource) are not supported")
        )
        return {}
    found: dict[str, tuple[pst.Template, PolicyMeta]] = {}
    # (Cedar's local id, message): the local id locates the line once we know there is a problem.
    complaints: list[tuple[str | None, str]] = []
    names: dict[str, str] = {}
    for local_id, policy in tree.static_policies.items():
        meta, theirs = _meta_for(src.name, local_id, policy)
        names[local_id] = meta.policy_id
        complaints.extend((local_id, c) for c in theirs)
        if meta.policy_id in found:
            complaints.append((local_id, "duplicate @id in this file"))
        found[meta.policy_id] = (dataclasses.replace(policy, id=meta.policy_id), meta)
    result = cedarpy.validate_policies(text, schema.handle)
    complaints.extend(
        (e.policy_id if e.policy_id in names else None, f"schema: {e.error}") for e in result.errors
    )
    if complaints:
        starts = policy_start_lines(text)[0]
        for where, message in complaints:
            pos = None if where is None else _position(where)
            line = starts[pos] if pos is not None and pos < len(starts) else None
            pid = None if where is None else names[where]
            # Cedar names the policy by its positional id; name it as decisions will.
            text_ = message if pid is None else message.replace(f"`{where}`", f"`{pid}`")
            problems.append(Problem(src.name, text_, line, pid))
    return found


def merge_files(
    parsed: list[tuple[str, dict[str, tuple[pst.Template, PolicyMeta]]]], problems: list[Problem]
) -> tuple[dict[str, pst.Template], dict[str, PolicyMeta]]:
    """One policy set of the files' policies; a policy id given by two files is a problem.

    Ids without `:` in either part cannot collide, but a merge that kept the last of two would
    drop the other (a forbid, say) without a word, so it is checked here whatever made them."""
    merged: dict[str, pst.Template] = {}
    meta: dict[str, PolicyMeta] = {}
    for file, found in parsed:
        for pid, (policy, m) in found.items():
            first = meta.get(pid)
            if first is not None:
                problems.append(
                    Problem(file, f"policy id {pid!r} is also given by {first.file}", None, pid)
                )
                continue
            merged[pid] = policy
            meta[pid] = m
    return merged, meta


def load(policy_dir: Path | None) -> LoadedSet:
    """Load, validate (syntax, schema, svidd annotations) and parse; PolicyError lists problems."""
    try:
        policies, schema_src, source = read_sources(policy_dir)
    except OSError as e:
        raise PolicyError([Problem(str(policy_dir), f"cannot read: {e}")]) from e
    if schema_src is None:
        schema_src = SourceFile(BUILTIN_SCHEMA_NAME, builtin_schema_text().encode())
    schema = load_schema(schema_src.name, schema_src.data.decode("utf-8", "replace"))
    if isinstance(schema, Problem):
        raise PolicyError([schema])
    problems: list[Problem] = []
    parsed: list[tuple[str, dict[str, tuple[pst.Template, PolicyMeta]]]] = []
    for src in policies:
        if ID_SEPARATOR in src.name:
            problems.append(
                Problem(
                    src.name,
                    f"a policy file name must not hold {ID_SEPARATOR!r}: it separates the file "
                    "and the policy's name in a policy id",
                )
            )
        parsed.append((src.name, _parse_file(src, schema, problems)))
    merged, meta = merge_files(parsed, problems)
    if problems:
        raise PolicyError(problems)
    tree = pst.PolicySet(templates={}, static_policies=merged, template_links=())
    try:
        policy_set = cedarpy.PolicySet.from_pst(tree)
    except ValueError as e:
        raise PolicyError([Problem(source, f"cannot build the policy set: {e}")]) from e
    return LoadedSet(
        policy_set=policy_set,
        meta=meta,
        schema=schema,
        hash=policy_set_hash(policies, schema_src),
        files=tuple(f.name for f in [*policies, schema_src]),
        source=source,
        tool_probes=find_tool_probes(merged),
    )
