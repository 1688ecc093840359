"""The operator docs and the code name the same things: every config key the server and the
agent take is documented, every key a documented config shows is taken (with the default it
shows), and every `svid-server` / `svid-agent` command line the docs show names subcommands and
flags that exist. A team adopting svidd copies these as written."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from agent_attestor import cli as agent_cli
from agent_attestor.config import KEYS as AGENT_KEYS
from agent_attestor.config import AgentConfig
from server import cli as server_cli
from server.config import CONFIG_KEYS as SERVER_KEYS
from server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = (README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md")
SHELL_FENCES = ("", "sh", "bash", "console")
PROGRAMS = {"svid-server": server_cli.build_parser, "svid-agent": agent_cli._parser}


def _fenced(text: str, langs: tuple[str, ...]) -> Iterator[str]:
    for lang, body in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", text):
        if lang in langs:
            yield body


def _named(text: str) -> set[str]:
    """Config-key-like words in `text`, and `--flag` spellings read as keys."""
    words = set(re.findall(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*", text))
    return words | {f.replace("-", "_") for f in re.findall(r"--([a-z][a-z0-9-]*)", text)}


@pytest.mark.parametrize(
    ("program", "keys"), [("svid-server", SERVER_KEYS), ("svid-agent", AGENT_KEYS)]
)
def test_every_config_key_is_documented(program: str, keys: tuple[str, ...]) -> None:
    named = _named(README.read_text())
    assert [k for k in keys if k not in named] == [], f"{program} keys missing from README.md"


def _server_reference() -> str:
    """The README's server.toml block: its keys, set or commented with their defaults."""
    blocks = [b for b in _fenced(README.read_text(), ("toml",)) if "# server.toml" in b]
    assert len(blocks) == 1, "README.md lost its server.toml reference block"
    return blocks[0]


def _shown_defaults(block: str) -> dict[str, str]:
    """`key = value` pairs a config block shows, set or in its comments."""
    pairs = re.findall(
        r"(?<![\w-])([a-z][a-z0-9_]*) = (\"[^\"]*\"|-?[0-9][0-9_.]*)(?![\w.])", block
    )
    return dict(pairs)


def _code_default(config: type, key: str) -> object:
    field = next(f for f in fields(config) if f.name == key)
    if field.default is not MISSING:
        return field.default
    assert field.default_factory is not MISSING
    return field.default_factory()


def test_the_server_reference_block_shows_real_keys_and_their_defaults() -> None:
    block = _server_reference()
    assert "trust_domain" in block
    shown = _shown_defaults(block)
    assert set(shown) - set(SERVER_KEYS) == set(), "README's server.toml names unknown keys"
    # The uncommented lines are an example deployment's, and so is a commented line of one key
    # and its own comment (an alternative); the lists in the comments are the defaults.
    example = set(re.findall(r"(?m)^([a-z][a-z0-9_]*) = ", block))
    example |= set(re.findall(r"(?m)^# ([a-z][a-z0-9_]*) = \S+\s+#", block))
    wrong = {}
    for key, text in shown.items():
        if key in example:
            continue
        value = text.strip('"') if text.startswith('"') else float(text.replace("_", ""))
        code = _code_default(ServerConfig, key)
        if value != code:
            wrong[key] = (text, code)
    assert wrong == {}, "README's server.toml shows defaults the code does not have"


def test_every_config_block_of_the_docs_names_real_keys() -> None:
    known = set(SERVER_KEYS) | set(AGENT_KEYS)
    unknown = []
    for doc in DOCS:
        for block in _fenced(doc.read_text(), ("toml",)):
            keys = re.findall(r"(?m)^(?:# )?([a-z][a-z0-9_]*) = ", block)
            unknown += [f"{doc.name}: {k}" for k in keys if k not in known]
    assert unknown == []


def _commands(line: str) -> Iterator[tuple[str, list[str]]]:
    """(program, words after it) of each svid-server / svid-agent command on a shell line."""
    spans = list(re.finditer(r"(?:^|(?<=[\s(`$]))(svid-server|svid-agent)(?=\s|$)", line))
    for i, m in enumerate(spans):
        end = spans[i + 1].start() if i + 1 < len(spans) else len(line)
        rest = re.split(r"&&|;|\|\||\s>", line[m.end() : end])[0]
        yield m.group(1), rest.split()


def _shell_lines() -> Iterator[tuple[str, str]]:
    for doc in DOCS:
        for body in _fenced(doc.read_text(), SHELL_FENCES):
            for line in body.replace("\\\n", " ").splitlines():
                code = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
                if code.strip():
                    yield doc.name, code


def _tree(parser: argparse.ArgumentParser) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    found = {(): parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for path, p in _tree(sub).items():
                    found[(name, *path)] = p
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _check(program: str, words: list[str]) -> list[str]:
    """What a documented command line names that the parser does not take. `a | b | c`
    between subcommands lists alternatives; a flag is checked against the last one named."""
    tree = _tree(PROGRAMS[program]())
    path: tuple[str, ...] = ()
    problems = []
    if not words or not re.fullmatch(r"[a-z][a-z0-9-]*", words[0]):
        return []  # the program named in prose or a diagram, not run
    for segment in " ".join(words).split("|"):
        tokens = segment.split()
        while tokens and re.fullmatch(r"[a-z][a-z0-9-]*", tokens[0]):
            word = tokens[0]
            if (*path, word) in tree:
                path = (*path, word)
            elif path and (*path[:-1], word) in tree:
                path = (*path[:-1], word)
            elif (word,) in tree:
                path = (word,)
            else:
                break
            tokens.pop(0)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(tokens)):
            if flag not in _options(tree[path]):
                problems.append(f"{program} {' '.join(path)}: no {flag}")
    if any(isinstance(a, argparse._SubParsersAction) for a in tree[path]._actions):
        problems.append(f"{program} {' '.join(path)}: no such command")
    return problems


def test_every_documented_command_line_parses() -> None:
    seen = 0
    problems = []
    for doc, line in _shell_lines():
        for program, words in _commands(line):
            seen += 1
            problems += [f"{doc}: {p}  <- {line.strip()}" for p in _check(program, words)]
    assert seen > 30, "the docs' command lines were not found"
    assert problems == []


@pytest.mark.parametrize(
    "line",
    [
        "svid-server entry shw --id X",
        "svid-server entry show --no-such-flag",
        "svid-agent api fetch x509 | jwt --audienc A",
    ],
)
def test_the_command_check_finds_a_wrong_command(line: str) -> None:
    ((program, words),) = _commands(line)
    assert _check(program, words) != []


def test_the_defaults_check_reads_a_shown_default() -> None:
    shown = _shown_defaults('# ca_ttl = 86400, log_format = "json" | "text", key_type = "ec-p256"')
    assert shown == {"ca_ttl": "86400", "log_format": '"json"', "key_type": '"ec-p256"'}
    assert _code_default(AgentConfig, "reconnect_max") == 10.0
