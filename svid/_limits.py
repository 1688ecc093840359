"""Size limits on JWT-SVID audiences and on a task's declared intent, one set for the agent
and the server, so a request the agent lets through is never refused by the server for its size.

Why the audience numbers: a JWT travels in an HTTP header, and common servers refuse headers
over 8 KB (nginx's default buffer, Apache's LimitRequestFieldSize). 4,096 bytes of audiences grow
to about 5.5 KB in base64url, leaving room for the other claims, the header and the signature.
1,024 bytes holds any realistic URL or service name; 32 values is more than any relying party
checks. The cap also bounds every audit record and cached token that carries the audiences. The
intent's numbers are explained where they are set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_AUDIENCES = 32
MAX_AUDIENCE_BYTES = 1024  # each, UTF-8
MAX_AUDIENCE_TOTAL_BYTES = 4096  # all of one request together, UTF-8


def utf8_size(text: str) -> int:
    # An ASCII str answers isascii() from a flag, without a scan: the common case costs nothing.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def audience_problem(audience: Sequence[str], *, commas: bool = False) -> str:
    """What makes `audience` too big, or one of its values hold a comma ("" when nothing):
    names the limit and the index, never echoes a value.

    No comma, because the audit log records a token's audiences joined with commas: the one
    relying party "a,b" and the two "a" and "b" would leave identical events. `commas` lets
    them through where nothing is minted (the audience a token is validated for).
    """
    if len(audience) > MAX_AUDIENCES:
        return f"audience: {len(audience)} values, at most {MAX_AUDIENCES} allowed"
    total = 0
    for index, value in enumerate(audience):
        size = utf8_size(value)
        if size > MAX_AUDIENCE_BYTES:
            return (
                f"audience[{index}]: {size} bytes, at most {MAX_AUDIENCE_BYTES} bytes "
                "(UTF-8) allowed per audience"
            )
        if not commas and "," in value:
            return (
                f"audience[{index}]: holds a comma; one relying party per audience value "
                "(several are several values)"
            )
        total += size
    if total > MAX_AUDIENCE_TOTAL_BYTES:
        return (
            f"audience: {total} bytes in all, at most {MAX_AUDIENCE_TOTAL_BYTES} bytes (UTF-8) "
            "allowed per request"
        )
    return ""


# Size limits on a task's declared intent, one set for the agent's Tasks API and the server's
# NodeTasks, checked before anything is decided: the server asks Cedar every action on every
# resource (and each tool), so the intent's size is the decision's cost, and the task-begin
# audit event records the declared lists in its `extra` (at most 4,096 bytes encoded).
#
# Why these numbers: a task is one unit of work; it names the few actions it takes (the shipped
# schema has six; 32 leaves room for an operator's own) and the APIs and tools it calls, a
# handful usually, 64 of each at most. 512 pairs bound a decision to about 0.1 s of server CPU
# (the shipped policy, measured) where 6 x 5,000 took 10 s. 2,048 bytes of names together keep
# the task-begin event within its 4,096 bytes with everything else it records; 256 bytes hold
# any realistic resource or tool name. `on_behalf_of` names a user (an OIDC `sub` is at most 255
# characters) or an upstream agent's SPIFFE ID, and travels in every JWT of the task (`obo`) and
# every mint's audit event: 512 bytes. `environment` and `classification` are short labels.
MAX_INTENT_ACTIONS = 32
MAX_INTENT_RESOURCES = 64
MAX_INTENT_TOOLS = 64
MAX_INTENT_DECISIONS = 512  # actions x resources + tools: the pairs policy is asked about
MAX_INTENT_NAME_BYTES = 256  # each action, resource and tool, UTF-8
MAX_INTENT_NAMES_BYTES = 2048  # all actions, resources and tools of one intent together, UTF-8
MAX_ON_BEHALF_OF_BYTES = 512
MAX_INTENT_LABEL_BYTES = 256  # environment, classification


def intent_problem(
    actions: Sequence[str],
    resources: Sequence[str],
    tools: Sequence[str],
    *,
    classification: str = "",
    environment: str = "",
    on_behalf_of: str = "",
) -> str:
    """What makes an intent too big, or one of its names hold a comma ("" when nothing): names
    the field and the limit, never echoes a value but a name refused for its comma (within the
    per-name limit then). Counts are of the values sent, duplicates included.

    No comma in an action, resource or tool, because the audit log records each list joined
    with commas: the resource "a,b" and the two "a" and "b" would leave identical events."""
    lists = (
        ("actions", actions, MAX_INTENT_ACTIONS),
        ("resources", resources, MAX_INTENT_RESOURCES),
        ("tools", tools, MAX_INTENT_TOOLS),
    )
    for name, values, most in lists:
        if len(values) > most:
            return f"intent.{name}: {len(values)} values, at most {most} allowed"
    decisions = len(actions) * len(resources) + len(tools)
    if decisions > MAX_INTENT_DECISIONS:
        return (
            f"intent: {len(actions)} actions x {len(resources)} resources + {len(tools)} tools "
            f"are {decisions} policy decisions, at most {MAX_INTENT_DECISIONS} allowed"
        )
    total = 0
    for name, values, _ in lists:
        for index, value in enumerate(values):
            size = utf8_size(value)
            if not size:
                return f"intent.{name}[{index}]: empty"
            if size > MAX_INTENT_NAME_BYTES:
                return (
                    f"intent.{name}[{index}]: {size} bytes, at most {MAX_INTENT_NAME_BYTES} "
                    "bytes (UTF-8) allowed per name"
                )
            if "," in value:
                return (
                    f"intent.{name}[{index}]: {value!r} holds a comma; one name per value "
                    "(several are several values)"
                )
            total += size
    if total > MAX_INTENT_NAMES_BYTES:
        return (
            f"intent: actions, resources and tools are {total} bytes in all, at most "
            f"{MAX_INTENT_NAMES_BYTES} bytes (UTF-8) allowed"
        )
    texts = (
        ("on_behalf_of", on_behalf_of, MAX_ON_BEHALF_OF_BYTES),
        ("environment", environment, MAX_INTENT_LABEL_BYTES),
        ("classification", classification, MAX_INTENT_LABEL_BYTES),
    )
    for name, text, most in texts:
        size = utf8_size(text)
        if size > most:
            return f"intent.{name}: {size} bytes, at most {most} bytes (UTF-8) allowed"
    return ""


def principal_problem(on_behalf_of: str, runtime_id: str, chain: Iterable[str] = ()) -> str:
    """Why a task may not declare `on_behalf_of` ("" when it may). The principal becomes the
    `sub` of the task's exchanged tokens: a user or an upstream agent, as the runtime declares
    it. A SPIFFE ID there is the subject that workload's own tokens carry, so it is taken only
    when the task's chain proves it: the runtime itself, or one of `chain` (the SPIFFE IDs of
    the tasks above it and their runtimes; read lazily, only for such a principal).
    Any case and surrounding blanks count as a SPIFFE ID: a resource server may fold them."""
    if not on_behalf_of.strip().lower().startswith("spiffe:"):
        return ""
    if on_behalf_of == runtime_id or on_behalf_of in chain:
        return ""
    return (
        f"intent.on_behalf_of: {cut_text(on_behalf_of, 200)!r} is a SPIFFE ID the task's "
        "chain does not prove: a task acts for a workload only when it is the task's runtime, "
        "a task it is a sub-task of or that task's runtime"
    )


def cut_text(text: str, max_bytes: int, mark: str = " ... (cut)") -> str:
    """`text` if it fits `max_bytes` (UTF-8), else its start and `mark` within them: for free
    text built from a request (a refusal's reason) that goes into a log line, an audit event
    and a gRPC status message (a trailer, refused past 16 KiB)."""
    if utf8_size(text) <= max_bytes:
        return text
    head = text.encode("utf-8", "surrogatepass")[: max(max_bytes - utf8_size(mark), 0)]
    return head.decode("utf-8", "ignore") + mark
