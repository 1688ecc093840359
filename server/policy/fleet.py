"""One policy set across the servers sharing a datastore.

Each server loads Cedar policy from its own policy_dir. A `policy reload` on one server used to
reload that one only: the others decided under the old set until each was reloaded by hand, so
one task request was granted by one server and denied by another. Now a reload announces the
hash it loaded on the change feed (FEED_POLICY); every server's follower hands the hash here,
and a server serving another set reloads its own directory. The policies stay files: storing
them in the database would make the files a second, silent source of truth on each host, and
keep `policy validate` and the shipped tooling from seeing what serves.

Announcements are told apart by their feed revision, and each is judged only while it is the
newest the datastore holds: the follower may read one after a newer one served (two reloads
on one server within a second), and reloading to it then recorded a reload nobody asked for
and reported the set diverged until the newer one was read.

A server whose set still differs after that (its directory differs from the announcer's, or
fails to load: the old set keeps serving, as for a local reload) says so: a warning log, the
`diverged` reason (the svid_server_policy_diverged metric), until a later announcement matches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from server.audit.errors import AuditError
from server.audit.log import AuditLog
from server.datastore.records import PolicyAnnouncement
from server.policy.engine import PolicyEngine, PolicySetInfo

_log = logging.getLogger("svid.server.policy")


class PolicyFleet:
    """`announce(hash)` writes the feed row (DataStore.announce_policy); `newest()` reads the
    newest one back (DataStore.announced_policy). Thread-safe: reloads come from admin calls
    and from the follower's thread."""

    def __init__(
        self,
        engine: PolicyEngine,
        audit: AuditLog,
        announce: Callable[[str], None],
        newest: Callable[[], PolicyAnnouncement | None] = lambda: None,
    ) -> None:
        self._engine = engine
        self._audit = audit
        self._announce = announce
        self._newest = newest
        self._lock = threading.Lock()
        self._announced: str | None = None
        self._diverged: str | None = None

    @property
    def diverged(self) -> str | None:
        """Why this server's set is not the one last announced (None: it is, or none was)."""
        return self._diverged

    @property
    def announced(self) -> str | None:
        return self._announced

    def reload_here(self) -> PolicySetInfo:
        """An operator's `policy reload`: load, record, serve, then tell the other servers."""
        # One lock from load to announcement: an announcement of another server read
        # meanwhile is judged after this one's, in feed order, not cleared by it.
        with self._lock:
            info = self._reload()
            # Announced after it serves here: a failed announcement leaves this server right
            # and the others as they were, and the caller hears of it (it may be sent again).
            self._announce(info.hash)
            self._announced = info.hash
            self._set_diverged(None)
        return info

    def started(self, announced: PolicyAnnouncement | None) -> None:
        """At start, with the newest announcement the feed holds: the set just loaded from
        this server's policy_dir is compared, not reloaded."""
        with self._lock:
            self._started(announced)

    def _started(self, announced: PolicyAnnouncement | None) -> None:
        if announced is None:
            return
        self._announced = announced.policy_set_hash
        if announced.policy_set_hash != self._engine.policy_set_hash:
            self._set_diverged(
                self._differs(self._engine.policy_set_hash, announced.policy_set_hash)
            )

    def restored(
        self, newest: PolicyAnnouncement | None, backup_before: float | None = None
    ) -> None:
        """The datastore was restored from a backup (this start was told so, or the feed went
        back under the follower): the announcements written after the copy are lost, and its
        newest (`newest`) may name a set no server serves any more. Compared with it, every
        server reported its set diverged, "loaded by another server", until someone ran a
        `policy reload`. The fleet's set as this server knows it is announced again instead:
        the one it last followed, or at a start the one its directory loads. A server whose
        set differs from that still says so (its follower judges the announcement).

        `backup_before` (at a start): when the checkpoint the restored datastore lacks was
        signed, before the restore. An announcement made after it was made on the restored
        datastore: another server's start announced its set again, or an operator reloaded
        one. Announcing this server's directory over it left the last server started the
        fleet's, a host with a stale directory included: it served its old set with nothing
        diverged, and every other server reported the difference. It is compared instead."""
        with self._lock:
            if backup_before is not None and newest is not None and newest.at > backup_before:
                self._started(newest)
                return
            known = self._announced
            if known is None and newest is None:
                return  # nothing was announced, before the restore or since this start
            fleet_set = known if known is not None else self._engine.policy_set_hash
            if newest is not None and newest.policy_set_hash == fleet_set:
                self._announced = fleet_set
                return
            _log.warning(
                "the restored datastore's newest policy announcement (%s) is not the fleet's "
                "set as this server knows it (%s): announcing that one again",
                None if newest is None else newest.policy_set_hash,
                fleet_set,
            )
            serving = self._engine.policy_set_hash
            try:
                self._announce(fleet_set)
            except Exception as exc:
                # Judged as any start is, on what the datastore holds.
                _log.error("announcing the policy set again failed: %s", exc)
                if newest is not None and newest.policy_set_hash != serving:
                    self._set_diverged(self._differs(serving, newest.policy_set_hash))
                return
            self._announced = fleet_set
            self._set_diverged(None if serving == fleet_set else self._differs(serving, fleet_set))

    @staticmethod
    def _differs(serving: str, announced: str) -> str:
        return (
            f"this server's policy_dir loads set {serving}, "
            f"not {announced} loaded by another server"
        )

    def on_announced(self, announced: PolicyAnnouncement) -> None:
        """The follower read an announcement (this server's own included)."""
        with self._lock:
            if self._superseded(announced):
                # A newer one is in the feed (the follower hands it over next), or the feed
                # was restored under it (the follower's full reload hands the restored one).
                return
            policy_set_hash = announced.policy_set_hash
            self._announced = policy_set_hash
            if self._engine.policy_set_hash == policy_set_hash:
                self._set_diverged(None)
                return
            try:
                info = self._reload(announced=policy_set_hash)
            except AuditError:
                # Not loaded: the ledger's outage is reported on its own; the next
                # announcement (or a `policy reload`) tries again.
                self._set_diverged("the policy reload announced could not be recorded")
                return
            except Exception as exc:
                _log.error("policy reload announced by another server failed: %s", exc)
                self._set_diverged("this server's policy_dir failed to load; the old set serves")
                return
            if info.hash == policy_set_hash:
                _log.info("policy reloaded as another server announced", extra={"hash": info.hash})
                self._set_diverged(None)
            elif not self._superseded(announced):
                self._set_diverged(self._differs(info.hash, policy_set_hash))
            # Else another was announced meanwhile: this server's directory may hold its set
            # already, and reporting this one's difference would be false. The newer one's
            # turn judges (with no reload when its set is the one serving).

    def _superseded(self, announced: PolicyAnnouncement) -> bool:
        """Whether the datastore's newest announcement is another than `announced`. Unread
        (the datastore failing): judged as before, on what the follower read."""
        try:
            newest = self._newest()
        except Exception as exc:
            _log.warning("reading the newest policy announcement failed: %s", exc)
            return False
        return newest is not None and newest != announced

    def _set_diverged(self, reason: str | None) -> None:
        if reason is not None and reason != self._diverged:
            _log.warning("policy set differs from the fleet's: %s", reason)
        self._diverged = reason

    def _reload(self, announced: str | None = None) -> PolicySetInfo:
        """`announced`: the hash another server announced, when that is why this reload runs
        (recorded: the log tells an operator's reload from the fleet's, and what was asked for
        beside what serves)."""
        why = {} if announced is None else {"announced_hash": announced}

        def record(serving: PolicySetInfo, info: PolicySetInfo) -> None:
            self._audit.append(
                "policy_reload",
                decision="allow",
                policy_ids=info.policy_ids,
                policy_set_hash=info.hash,
                extra={"previous_hash": serving.hash, "files": list(info.files), **why},
            )

        try:
            # Recorded before it serves: a reload the ledger could not take was answered
            # UNAVAILABLE while its set decided every task from then on, off the record.
            return self._engine.reload(record)
        except AuditError:
            raise  # not loaded: the old set serves, and the ledger's outage says why
        except Exception as exc:
            self._audit.append(
                "policy_reload",
                decision="deny",
                reason=str(exc)[:1000],
                policy_set_hash=self._engine.policy_set_hash,  # the set that serves on
                extra=why,
            )
            raise
