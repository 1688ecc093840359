"""Datastore errors: the caller learns what was missing or clashing, never a backend detail."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from server.datastore.records import (
    BundleWrite,
    Credential,
    Head,
    credential_agents,
    credential_tasks,
)
from svid._errors import SvidError


class DataStoreError(SvidError):
    """Root of every datastore error."""


class NotFoundError(DataStoreError, LookupError):
    """No record with that key."""


class AlreadyExistsError(DataStoreError):
    """A record with the same identity is already stored."""


class ConflictError(DataStoreError):
    """The write lost a race: the record changed since the caller read it."""


class RemovalUnderWayError(DataStoreError):
    """The agent's removal (records.Removal) is still being finished: the agent is not saved,
    admitted again least of all, until everything it held is revoked on record. The message
    names the agent, and how the caller gets past it."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(
            f"agent {agent_id} is still being removed (an eviction or ban cut short is being "
            "finished): attest again in a few minutes, or have an operator evict it again"
        )
        self.agent_id = agent_id


class AgentReplacedError(DataStoreError):
    """An agent save conditioned on the record its caller read found another (the agent was
    evicted, banned or attested again since): nothing was written. The message names the
    agent, and how the caller gets past it."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(
            f"agent {agent_id} was evicted, banned or attested again while this request was "
            "being served: attest again"
        )
        self.agent_id = agent_id


class StorageError(DataStoreError):
    """The backend could not complete a write or a read (I/O error, disk full, locked file).

    A failed write kept nothing: its whole transaction was rolled back. The message names the
    operation, never a file path or a driver detail a client should not see.
    """


class CommitUnknownError(StorageError):
    """A COMMIT failed in a way that leaves its outcome unknown. SQLite: an fsync or other I/O
    error while the transaction's WAL frames were being written and synced. They may be on
    disk (or in the page cache) and be replayed by the next open's recovery, so the write may
    appear after a restart although this process took it for failed. The store takes no write
    after it and the server stops (fail-stop, as PostgreSQL's data_sync_retry=off): the state
    it serves is the disk's again once recovery has decided (`server_stops`). PostgreSQL: the
    connection was lost with the COMMIT sent and no answer back; the database may have
    committed it. Its own server decides (it handles its fsync failures itself), and this
    server's view follows what it holds through the change feed, so it serves on. The
    message names the datastore and the error, for the operator's log; a client is told only
    that the outcome is unknown."""

    def __init__(self, datastore: str, error: str, *, server_stops: bool = True) -> None:
        then = (
            "no further write is taken and the server stops (start it again once the disk is "
            "sound: the datastore's recovery decides)"
            if server_stops
            else "the database decides, and the server reads back what it holds"
        )
        super().__init__(
            f"the datastore {datastore} failed while committing a write ({error}): whether "
            f"it is stored is unknown; {then}"
        )
        self.datastore = datastore
        self.error = error
        self.server_stops = server_stops


class DatastoreMovedError(StorageError):
    """The datastore's file was deleted, moved away or replaced under the running server.
    SQLite goes on writing to the file it has open, which no path names any more: a write
    committed there was acknowledged and gone with it at the next start. None is taken (the
    transaction rolled back); the server serves on from what it holds. The message names the
    path and what is wrong, for the operator's log; a client is told only of an outage."""


class UnreachableError(StorageError):
    """The backend did not answer in time, or the connection to it was lost: another request
    now would most likely wait, or fail, the same way."""


class ChainMovedError(StorageError):
    """An audit batch was sealed on a head the chain is no longer at: another writer sharing
    the database appended since. Nothing of the ledger write was kept; `head` is the stored
    head (None: an empty chain) to seal the batch on again."""

    def __init__(self, message: str, head: Head | None = None) -> None:
        super().__init__(message)
        self.head = head


class JtiHeldError(StorageError):
    """A ledger write claimed an assertion `jti` that is held already (a replay, perhaps
    racing through another server sharing the database): the whole write was rolled back and
    nothing of it kept. `held` names the (issuer, jti) pairs that were refused, so the callers
    whose rows shared the write can tell a replay of their own from a neighbour's."""

    def __init__(self, message: str, held: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.held = frozenset(held)

    def among(self, jtis: Iterable[tuple[str, str, int]]) -> JtiHeldError | None:
        """The refusal as it concerns `jtis` (JtiClaim) only (None: none of theirs)."""
        own = self.held.intersection((issuer, jti) for issuer, jti, _ in jtis)
        return JtiHeldError(held_message(sorted(own)), own) if own else None


class HolderGoneError(StorageError):
    """A ledger write held credentials whose holder is no longer admitted: an agent evicted,
    banned or under removal (AgentRemovedError), or a task no longer active
    (TaskEndedMeanwhileError).
    Their issuance was decided before that change committed, but its revocations read the
    holder's credentials after that commit, before this write could land, so the credentials
    would never be revoked: the whole write was rolled back and nothing of it kept."""

    def among(self, credentials: Sequence[Credential]) -> HolderGoneError | None:
        """The refusal as it concerns `credentials` only (None: none of theirs), so the
        callers whose rows shared the write can tell their own refusal from a neighbour's
        and record again."""
        raise NotImplementedError


class AgentRemovedError(HolderGoneError):
    """HolderGoneError for agents deleted (evicted), banned, or with a removal under way;
    `agents` names them. `chains`: of the tokens the write's credentials were exchanged for
    (their `derived_from`, by jti), those whose chain holds any of them, with those agents
    (the write's chains, of every agent holding each, are given; the rest are left out)."""

    def __init__(
        self, agents: Iterable[str], chains: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        self.agents = frozenset(agents)
        held = ((jti, self.agents.intersection(of)) for jti, of in (chains or {}).items())
        self.chains = {jti: frozenset(of) for jti, of in held if of}
        names = ", ".join(sorted(self.agents)[:4])
        super().__init__(
            f"agent(s) {names} were evicted or banned while credentials were being issued "
            "through them: nothing was issued (an evicted agent may attest again once its "
            "removal is finished)"
        )

    def among(self, credentials: Sequence[Credential]) -> AgentRemovedError | None:
        own = set(self.agents.intersection(credential_agents(credentials)))
        # A token exchanged for one whose chain holds a removed agent is refused for it too.
        chains = {
            c.derived_from: self.chains[c.derived_from]
            for c in credentials
            if c.derived_from is not None and c.derived_from in self.chains
        }
        own.update(*chains.values())
        return AgentRemovedError(own, chains) if own else None


class TaskEndedMeanwhileError(HolderGoneError):
    """HolderGoneError for tasks whose row is no longer active (its end claimed: ending, then
    ended, revoked or expired; or no row at all); `tasks` names them (task ids)."""

    def __init__(self, tasks: Iterable[str]) -> None:
        self.tasks = frozenset(tasks)
        names = ", ".join(sorted(self.tasks)[:4])
        super().__init__(
            f"task(s) {names} ended while credentials were being issued for them: "
            "nothing was issued"
        )

    def among(self, credentials: Sequence[Credential]) -> TaskEndedMeanwhileError | None:
        own = self.tasks.intersection(credential_tasks(credentials))
        return TaskEndedMeanwhileError(own) if own else None


class RemovalClaimLostError(StorageError):
    """A ledger write required removal claims (write_ledger's `claims`) some of which are no
    longer held: another server took the removal over (the claim lapsed), or it was finished.
    Nothing of the write was kept; `claims` are the (agent, holder) claims lost, `agents`
    their agents. The new holder logs what is left, so the loser logs nothing more."""

    def __init__(self, claims: Iterable[tuple[str, str]]) -> None:
        self.claims = frozenset((agent_id, holder) for agent_id, holder in claims)
        self.agents = frozenset(agent_id for agent_id, _ in self.claims)
        names = ", ".join(sorted(self.agents)[:4])
        super().__init__(
            f"the claim on the removal of agent(s) {names} was lost to another finisher (or the "
            "removal is finished): nothing was logged"
        )

    def among(self, claims: Iterable[tuple[str, str]]) -> RemovalClaimLostError | None:
        """The refusal as it concerns `claims` only (None: none of theirs). By claim, not by
        agent: a finish that lost its claim and the one that took the removal over since may
        share a group commit, and only the first is refused."""
        own = self.claims.intersection((agent_id, holder) for agent_id, holder in claims)
        return RemovalClaimLostError(own) if own else None


class BundleRefusedError(StorageError):
    """A ledger write held foreign bundles (BundleWrite) the store did not take, as it holds
    a higher spiffe_sequence for their trust domains (another server stored a newer one), or
    removals of bundles it does not hold (`missing`: never stored, or removed meanwhile):
    nothing of the write was kept, the events recording their change included; `older` and
    `missing` name the trust domains of each kind, `trust_domains` all of them."""

    def __init__(
        self,
        trust_domains: Iterable[str],
        missing: Iterable[str] = (),
        *,
        positions: Iterable[int] | None = None,
    ) -> None:
        self.older = frozenset(trust_domains)
        self.missing = frozenset(missing)
        # Which of the write's bundles (their index in write_ledger's `bundles`) were refused:
        # one trust domain may be written twice in a group commit (a removal sent twice), and
        # only the one refused is its caller's failure.
        self.positions = None if positions is None else frozenset(positions)
        self.trust_domains = self.older | self.missing
        said = []
        if self.older:
            said.append(
                f"foreign bundle(s) of {', '.join(sorted(self.older)[:4])} not stored: the "
                "stored one carries a higher spiffe_sequence"
            )
        if self.missing:
            said.append(
                f"no foreign bundle of {', '.join(sorted(self.missing)[:4])} stored to remove"
            )
        super().__init__("; ".join(said))

    def among(self, bundles: Sequence[BundleWrite], at: int = 0) -> BundleRefusedError | None:
        """The refusal as it concerns `bundles` only (None: none of theirs), they being the
        write's bundles from index `at` on: a trust domain refused for a stored write's
        sequence is not one of a removal's, nor the reverse, and where the store said which
        writes it refused (`positions`), another write of the same trust domain is not."""
        if self.positions is not None:
            bundles = [b for i, b in enumerate(bundles, at) if i in self.positions]
        own_older = self.older.intersection(b.bundle.trust_domain for b in bundles if not b.remove)
        own_missing = self.missing.intersection(b.bundle.trust_domain for b in bundles if b.remove)
        if not own_older and not own_missing:
            return None
        return BundleRefusedError(own_older, own_missing)


def held_message(held: Iterable[tuple[str, str]]) -> str:
    """JtiHeldError's message: the first few held jtis (names of assertions, not secrets)."""
    names = sorted(jti[:64] for _, jti in held)
    return f"assertion jti(s) accepted before: {', '.join(repr(n) for n in names[:4])}"


class LeaseLostError(StorageError):
    """A write fenced by a lease (LeaseFence) whose holder no longer holds it: another server
    took it over (the holder paused past its life), or it lapsed. Nothing was written."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"the lease {name!r} is no longer this server's (another took it over, or it "
            "lapsed): nothing was written"
        )
