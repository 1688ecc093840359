"""The svid-server CLI's bulk entry work: reading entry files, sending them in batches, and
following list pages (of entries, agents, tasks, federation relationships and foreign bundles:
`add_page_size`, `page_size`, `all_pages`).

An entry file is JSON: an array of entries, an object with an "entries" array (what
`svid-server entry show --output json` prints, so a listing can be fed back), or JSON Lines
(one entry object per line). Each entry uses the field names `entry show --output json`
prints; a selector may also be written as one "type:value" string.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from server.cli_files import read_at_most
from server.errors import CliError
from server.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from server.registration import MAX_BATCH
from svid._proto import admin_pb2, common_pb2

# The server takes at most MAX_BATCH items per batch call, and gRPC at most 4 MiB per message:
# a chunk stops at whichever it reaches first, with room to spare.
BATCH_ITEMS = MAX_BATCH
BATCH_BYTES = 3 * 1024 * 1024
# An entry file is read whole and parsed in memory (some 7 times its size at the peak). The
# bound is for what is no entry file (/dev/zero, a stream that never ends): `entry show
# --output json` prints some 650 bytes an entry, and 64 MiB refused the export of 100,000 of
# them fed back. 256 MiB holds some 400,000.
MAX_FILE_BYTES = 256 * 1024 * 1024

_M = TypeVar("_M", bound=Message)
_CODE_NAMES: dict[int, str] = {int(c.value[0]): c.name for c in grpc.StatusCode}


@dataclass(frozen=True)
class Item:
    """One entry read from a file, and where it was (for messages: "file:line" or "file#n")."""

    where: str
    entry: common_pb2.Entry


def _entry(where: str, data: object) -> Item:
    if not isinstance(data, dict):
        raise CliError(f"{where}: an entry must be a JSON object, got {type(data).__name__}")
    fields = dict(data)
    selectors = fields.get("selectors")
    if isinstance(selectors, list):
        fields["selectors"] = [_selector(where, s) for s in selectors]
    try:
        return Item(where, json_format.ParseDict(fields, common_pb2.Entry()))
    except json_format.ParseError as exc:
        raise CliError(f"{where}: {exc}") from None


def _selector(where: str, value: object) -> object:
    if not isinstance(value, str):
        return value
    kind, sep, rest = value.partition(":")
    if not sep or not kind or not rest:
        raise CliError(f"{where}: selector {value!r} must be TYPE:VALUE, e.g. unix:uid:1000")
    return {"type": kind, "value": rest}


def _loads(where: str, text: str) -> Any:
    """json.loads, with a document nested past Python's recursion limit refused naming it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CliError(f"{where}: JSON nested too deeply") from None


def read_entries(path: str) -> list[Item]:
    """Every entry of the file (`-` for stdin), or a CliError naming the first bad one."""
    name = "stdin" if path == "-" else path
    body = read_at_most("--file", path, MAX_FILE_BYTES, "split it into several files")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"--file: cannot read {name}: {exc}") from None
    try:
        whole: Any = _loads(name, text)
    except json.JSONDecodeError:
        whole = None  # not one JSON document: JSON Lines
    if isinstance(whole, dict) and isinstance(whole.get("entries"), list):
        whole = whole["entries"]
    if isinstance(whole, list):
        return [_entry(f"{name}#{n}", item) for n, item in enumerate(whole, 1)]
    if isinstance(whole, dict):
        return [_entry(f"{name}:1", whole)]
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = _loads(f"{name}:{number}", line)
        except json.JSONDecodeError as exc:
            raise CliError(f"{name}:{number}: not JSON ({exc.msg}, column {exc.colno})") from None
        items.append(_entry(f"{name}:{number}", data))
    if not items:
        raise CliError(f"--file: {name} holds no entries")
    return items


def chunks(items: Sequence[Item]) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    size = 0
    for item in items:
        item_size = item.entry.ByteSize()
        if chunk and (len(chunk) >= BATCH_ITEMS or size + item_size > BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Outcome:
    where: str
    result: admin_pb2.EntryResult

    @property
    def ok(self) -> bool:
        return self.result.status.code == 0  # grpc.StatusCode.OK

    def code_name(self) -> str:
        code = self.result.status.code
        return _CODE_NAMES.get(code, str(code))


def send_batches(
    items: Sequence[Item],
    call: Callable[[list[common_pb2.Entry]], Sequence[admin_pb2.EntryResult]],
    verb: str,
) -> list[Outcome]:
    """Send the items chunk by chunk; per-item outcomes in file order.

    A chunk is one server transaction: when a call fails outright, the chunks before it are
    written and the error says which items those were.
    """
    outcomes: list[Outcome] = []
    for chunk in chunks(items):
        try:
            results = call([i.entry for i in chunk])
        except grpc.RpcError as exc:
            if not outcomes:
                raise
            done = sum(o.ok for o in outcomes)
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise CliError(
                f"{details or 'the call failed'} - stopped at {chunk[0].where}: the items "
                f"before it were sent ({done} {verb}, {len(outcomes) - done} refused); "
                "nothing from there on was"
            ) from None
        if len(results) != len(chunk):
            raise CliError(f"the server answered {len(results)} results for {len(chunk)} items")
        outcomes.extend(Outcome(i.where, r) for i, r in zip(chunk, results, strict=True))
    return outcomes


def outcomes_text(outcomes: Sequence[Outcome], verb: str) -> tuple[str, list[str]]:
    """The summary line (stdout) and one line per refused item (stderr)."""
    done = sum(o.ok for o in outcomes)
    failed = [o for o in outcomes if not o.ok]
    summary = f"{verb.capitalize()} {done} of {len(outcomes)} entries"
    if failed:
        summary += f"; {len(failed)} refused"
    lines = [f"{o.where}: {o.code_name()}: {o.result.status.message}" for o in failed]
    return summary, lines


def outcomes_json(outcomes: Sequence[Outcome]) -> str:
    return json.dumps(
        {
            "results": [
                {
                    "item": o.where,
                    "code": o.code_name(),
                    "message": o.result.status.message,
                    "id": o.result.id,
                    "spiffe_id": o.result.spiffe_id,
                    "revision": o.result.revision,
                    "created_at": o.result.created_at,
                }
                for o in outcomes
            ],
            "ok": sum(o.ok for o in outcomes),
            "refused": sum(not o.ok for o in outcomes),
        },
        indent=2,
        sort_keys=True,
    )


def add_page_size(parser: argparse.ArgumentParser, default: str = str(DEFAULT_PAGE_SIZE)) -> None:
    parser.add_argument(
        "--page-size",
        type=int,
        default=None,
        metavar="N",
        help=f"items per page asked of the server (default {default}, at most "
        f"{MAX_PAGE_SIZE}); every page is read",
    )


def refuse_empty(args: argparse.Namespace, *names: str) -> None:
    """A listing's filter flag given empty is refused: on the wire "" means no filter, and a
    script's `--spiffe-id "$ID"` with $ID empty got every entry (agent, task), exit 0."""
    for name in names:
        if getattr(args, name, None) == "":
            raise CliError(f"--{name.replace('_', '-')}: empty (leave the flag out to list all)")


def page_size(args: argparse.Namespace) -> int:
    """--page-size checked (0 when not given: the server's default)."""
    if args.page_size is None:
        return 0
    if not 1 <= args.page_size <= MAX_PAGE_SIZE:
        raise CliError(f"--page-size: {args.page_size} must be between 1 and {MAX_PAGE_SIZE}")
    return int(args.page_size)


def all_pages(fetch: Callable[[str], tuple[Sequence[_M], str]]) -> list[_M]:
    """Follow next_page_token from the first page to the last.

    A CliError when the listing stops advancing: a server that hands back a token it gave
    before, or an empty page with a token (svidd's never does: a page holds at least one item
    when a later one exists), would have this loop ask forever, gathering the same items."""
    items: list[_M] = []
    token = ""
    seen: set[str] = set()
    while True:
        page, token = fetch(token)
        items.extend(page)
        if not token:
            return items
        if token in seen or not page:
            raise CliError(
                f"the server's listing does not advance (after {len(items)} items, "
                + ("a page token it gave before" if token in seen else "an empty page")
                + "): stopped rather than ask forever"
            )
        seen.add(token)
