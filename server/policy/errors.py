"""Errors of the policy engine, rooted in the svidd exception tree."""

from __future__ import annotations

from dataclasses import dataclass

from svid._errors import SvidError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy directory: where (file, line, policy id) and what."""

    file: str
    message: str
    line: int | None = None
    policy_id: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.policy_id:
            where = f"{where} [{self.policy_id}]"
        return f"{where}: {self.message}"


class PolicyError(SvidError, ValueError):
    """A policy set could not be loaded; `problems` lists every finding, the message the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        head = str(problems[0]) if problems else "invalid policy set"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"policy set refused: {head}{more}")


class RequestError(SvidError, ValueError):
    """A decision request is malformed (bad TTL, empty intent, ...); the message names the field."""
