"""The agent's own SVID, kept: which one is in use, a renewed one held unused while the disk
refuses it, what waits to be saved (the SVID, the roots it came with) and the disk's refusals,
when each one arrived and the life it has left. Syncer holds one and calls it; getting an SVID
(attestation, renewal) and putting it on a connection are Syncer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.model import TrustBundle
from agent_attestor.rotation import ROTATE_AT
from svid._backoff import Retry
from svid._clock import Clock, ElapsedClock
from svid._der import certs_to_pem, parse_der_certs
from svid._errors import SvidParseError
from svid._held import run_held, to_its_end
from svid._log_throttle import LogThrottle

# The Sync's logger: what the agent says of its own SVID is said under the name operators (and
# their filters) have always read it under.
log = logging.getLogger("agent_attestor.sync")


# How far the server back-dates the SVIDs it issues (server/ca/signer.py BACKDATE_SECONDS): an
# agent SVID that just arrived has its life but this much left.
SERVER_BACKDATE = 10.0

# A renewed agent SVID the disk refuses waits, unused, while the one on disk has more than this
# share of its life left (adopt): the server drops the old one from the agent's record
# at the first call with the new one, and a restart before the new one is saved found only the
# old one on disk, refused as superseded (a join token spent: the agent out for good). Unused,
# the new one supersedes nothing, and the old one is taken until it lapses. Past this share the
# new one is used all the same: the old one, on disk or not, would be of no use for long.
HOLD_SHARE = 0.25


@dataclass(frozen=True)
class Arrival:
    """When an agent SVID reached this agent: its wall clock then, and its elapsed clock.
    `wall` None: loaded from disk, it came no one knows when, by `elapsed` at the latest."""

    wall: float | None
    elapsed: float


def left_at_arrival(life: float) -> float:
    """What an agent SVID of `life` seconds (NotBefore to NotAfter) has left when it arrives:
    its life but the server's back-dating. Never under half its life: an SVID living less than
    the back-dating (an issuer that does not back-date) would be renewed on arrival, again and
    again."""
    return max(life - SERVER_BACKDATE, life * ROTATE_AT)


def life_left(
    not_before: float, not_after: float, arrival: Arrival | None, now: float, elapsed: float
) -> float:
    """Seconds the agent SVID has left, at `now` on the wall clock and `elapsed` on the elapsed
    clock. On the elapsed clock from its arrival when it came from the server in this run
    (renewal_wait counts its renewal so): a wall clock ahead of the server's read a fresh SVID
    as about to lapse, one behind it read a lapsed SVID as valid. By NotAfter on the wall
    clock for an SVID loaded from disk, which came no one knows when."""
    if arrival is None or arrival.wall is None:
        return not_after - now
    return arrival.elapsed + left_at_arrival(not_after - not_before) - elapsed


class AgentSvidKeeper:
    """The agent SVID in use, the one on disk, a renewed one held, and their saves."""

    def __init__(
        self, store: AgentStore, clock: Clock, elapsed: ElapsedClock, *, log_interval: float
    ) -> None:
        self._store = store
        self._clock = clock
        # Intervals since an agent SVID arrived: no step of the wall clock moves them back.
        self._elapsed = elapsed
        self._log_interval = log_interval
        # The agent SVID in use (Syncer._install puts one on the connection).
        self.in_use: AgentSvid | None = None
        # The last agent SVID the server sent this run or the disk gave, and when (renewal_wait).
        self._arrived: tuple[AgentSvid, Arrival] | None = None
        # The agent SVID in use and its roots, when the disk refused them (persist): saved
        # again by save_loop, woken by _save_wanted. Roots () once nothing is left to save;
        # roots a Sync message brought and the disk refused (save_roots) wait here too.
        self._unsaved: AgentSvid | None = None
        self._unsaved_roots: tuple[bytes, ...] = ()
        self._unsaved_sequence = 0  # their bundle's sequence, saved beside them
        # The highest bundle sequence held (the state file's too): a save below it marks the
        # server's sequence gone back (AgentStore.sequence_floor).
        self._highest_sequence = 0
        self._unsaved_how = ""  # how the agent SVID waiting came ("attested", "renewed")
        # The agent SVID on disk, as far as this run knows (loaded or saved by it).
        self._on_disk: AgentSvid | None = None
        # A renewed agent SVID the disk refused, not used while the one on disk has life left
        # (adopt), with its arrival; _held_saved is set once a save writes it. Its roots are
        # not kept: set in the cache when it came, they may be older than the Sync's by its use.
        self._held: tuple[AgentSvid, Arrival] | None = None
        self._held_saved = asyncio.Event()
        self._svid_save_log = LogThrottle(log_interval, clock)
        self._svid_save_failed = False  # an agent SVID refused was said, its save not yet
        self._save_wanted = asyncio.Event()
        # One save of the agent SVID or roots at a time, each writing what waits when it
        # starts (in a thread): a save begun earlier never lands older files after a newer's.
        self._saving = asyncio.Lock()
        # A refused agent SVID the disk could not remove: never loaded again by this run.
        self._refused_chain: tuple[x509.Certificate, ...] = ()
        # A full disk refuses the bundle at every Sync message that carries one.
        self._bundle_save_log = LogThrottle(log_interval, clock)
        self._bundle_save_failures = 0  # since the last save that worked

    # ---- arrivals and life left -------------------------------------------------------------

    def arrival_now(self) -> Arrival:
        return Arrival(self._clock.now(), self._elapsed.monotonic())

    def arrived(self, svid: AgentSvid, arrival: Arrival) -> None:
        """`svid` came at `arrival`: its renewal is counted from there (renewal_wait)."""
        self._arrived = (svid, arrival)

    def note_arrival(self, svid: AgentSvid) -> None:
        """`svid` came from the server now: its renewal is counted from here too."""
        self.arrived(svid, self.arrival_now())

    def arrival(self, svid: AgentSvid) -> Arrival | None:
        """When `svid` came from the server, or was loaded from disk (its wall time None);
        None: neither is known (an SVID set aside and taken back). Kept across reconnects,
        each starting a renewal loop: counted from a loop's start, a connection that dropped
        every few minutes would put the renewal off until the SVID lapsed."""
        if self._arrived is not None and self._arrived[0] is svid:
            return self._arrived[1]
        return None

    def life_left(self, svid: AgentSvid) -> float:
        return life_left(
            svid.not_before,
            svid.not_after,
            self.arrival(svid),
            self._clock.now(),
            self._elapsed.monotonic(),
        )

    # ---- the disk ---------------------------------------------------------------------------

    def load_saved(self, now: float) -> AgentSvid | None:
        """The agent SVID on disk, valid past `now` and not one the server refused; noted as
        on disk and as arriving now at the latest."""
        stored = self._store.load_svid()
        if stored is not None and stored.chain == self._refused_chain:
            return None  # the server refused it, and would at every retry
        if stored is None or stored.not_after <= now + 1:
            return None
        log.info("loaded agent SVID from disk", extra={"agent_id": stored.spiffe_id})
        self._on_disk = stored
        # It came before now at the latest: its renewal is counted from here on the elapsed
        # clock too (renewal_wait), not from its validity alone on a skewed wall clock.
        self._arrived = (stored, Arrival(None, self._elapsed.monotonic()))
        return stored

    def roots_pem(self) -> bytes:
        """The newest roots, while the disk refuses them (those the SVID in use came with, or
        a Sync message's since: the disk's may be those a replaced CA left); else the disk's;
        b"" if there are none."""
        if self._unsaved_roots:
            return certs_to_pem(parse_der_certs(b"".join(self._unsaved_roots)))
        stored = self._store.load_bundle()
        return certs_to_pem(stored) if stored else b""

    async def persist(self, svid: AgentSvid, bundle: TrustBundle, how: str) -> None:
        """The agent SVID (`how` it came) and the roots that came with it, on disk for the next
        start. A disk that refuses them (full, read-only) must not lose them: the server has
        spent the join token or replaced the old SVID already. So they are used from memory
        (a renewed one held unused while the one on disk has life left: adopt), said once,
        and save_loop saves them once the disk takes them."""
        self._unsaved, self._unsaved_how = svid, how
        if bundle.x509_authorities:
            # None: roots a Sync message brought and the disk refused still wait (save_roots).
            self._held_roots(bundle)
        # A new SVID refused is news: said at once, not an interval after an older one's line.
        self._svid_save_log = LogThrottle(self._log_interval, self._clock)
        await self._save()

    async def save_roots(self, bundle: TrustBundle) -> None:
        """The roots a Sync message brought, saved as persist saves the agent SVID's (_save):
        from now they are the roots waiting to be saved, so a save by save_loop or a renewal
        after this one writes these, never older ones. A refusal is said, not raised."""
        if bundle.x509_authorities:
            self._held_roots(bundle)
            await self._save()

    def _held_roots(self, bundle: TrustBundle) -> None:
        """`bundle`'s roots are the ones to save (and verify the server with) from now."""
        self._unsaved_roots = bundle.x509_authorities
        self._unsaved_sequence = bundle.sequence
        self._highest_sequence = max(self._highest_sequence, bundle.sequence)

    def restore_roots(self, bundle: TrustBundle) -> bool:
        """At start, before any connection: `bundle` (the saved state's) is what the server is
        verified with, and saved by save_loop, where it is newer than bundle.der's by its
        sequence: a Sync message's bundle the disk refused was saved in the state file alone
        when the agent stopped before save_loop wrote it (killed, or its retries refused), and
        verifying with bundle.der's older roots trusted a root the server had dropped, or
        missed its new one after a rotation. Never older roots, so never a root the server
        removed: a bundle.der of a later sequence (the state file saves a second behind), or
        of an unknown one (an agent before sequences were kept), is kept. True: `bundle` used."""
        if not bundle.x509_authorities:
            return False
        # Held, used or not: a save below it (a restored or rebuilt datastore) marks a floor.
        self._highest_sequence = max(self._highest_sequence, bundle.sequence)
        try:
            # Rows are taken as written (state_store.py): a damaged one must not become the
            # roots every connect parses, and fails on, for good.
            parse_der_certs(b"".join(bundle.x509_authorities))
        except SvidParseError:
            return False
        on_disk = self._store.load_bundle()
        if on_disk is not None:
            held = {c.public_bytes(Encoding.DER) for c in on_disk}
            if held == set(bundle.x509_authorities):
                return False
            file_sequence = self._store.bundle_sequence()
            if file_sequence is None or file_sequence >= bundle.sequence:
                return False
            # The server's sequence went back (a restored or rebuilt datastore) since bundles
            # up to the floor: the state's may be of the lineage before (a rebuilt server's
            # x509pop agent killed, or its state file refused, in the second after it attested
            # anew), its higher sequence no newer, its roots the replaced CA's.
            floor = self._store.sequence_floor()
            if floor is not None and bundle.sequence <= floor:
                return False
        else:
            file_sequence = None
        self._held_roots(bundle)
        self._save_wanted.set()  # save_loop writes them (the disk may still refuse)
        log.warning(
            "the trust bundle file holds older roots than the saved agent state; verifying the "
            "server with the state's, and saving them",
            extra={
                "bundle_file": str(self._store.bundle_path),
                "file_sequence": -1 if file_sequence is None else file_sequence,
                "state_sequence": bundle.sequence,
            },
        )
        return True

    async def _save(self) -> None:
        """Save what waits (the agent SVID, its roots) now. Refused, it is said (throttled) and
        save_loop saves it again with backoff. Run to its end even when the caller is cancelled
        (a reconnect, a stop): the thread writes on regardless, and a refusal it met then went
        unsaid and unretried, the roots used from memory until some later save."""
        await to_its_end(self._save_or_say())

    async def _save_or_say(self) -> None:
        try:
            await self.save_unsaved()
        except OSError as exc:
            self._save_wanted.set()
            if self._unsaved is None:
                # The agent SVID is on disk, only its roots were refused: said as a bundle's
                # failure, so its later save is said too (_bundle_saved).
                self._bundle_refused(exc)
            else:
                self._svid_save_failed = True
                self._svid_refused(exc)

    def _svid_refused(self, exc: OSError) -> None:
        """Said at once for a new SVID (persist), then once an interval: a bundle save writes
        the SVID waiting first, and a full disk refuses it at every one."""
        count = self._svid_save_log.due()
        if not count:
            return
        if self._held is not None and self._held[0] is self._unsaved:
            log.error(
                "cannot save the renewed agent SVID; going on with the one saved before it "
                "until it is saved (or that one's life runs short), saving it again with backoff",
                extra=_refusal("svid_file", self._store.svid_path, count, exc),
            )
            return
        log.error(
            "cannot save the %s agent SVID; using it from memory and saving it again with "
            "backoff (a restart before it is saved cannot use it)",
            self._unsaved_how,
            extra=_refusal("svid_file", self._store.svid_path, count, exc),
        )

    async def save_unsaved(self) -> None:
        """Save what the disk refused before. OSError: refused again (what was saved before it
        is not saved twice).

        The writes in a thread: their fsyncs (key, chain, roots) on a slow disk stopped the
        Workload API, on this loop, for as long, at every renewal. What a save wrote is
        marked saved only if it is still what waits: a newer SVID or roots set meanwhile (a
        renewal, a Sync message) wait for their own save, after this one.

        To its end (to_its_end), marks included, even when its caller is cancelled (a stop):
        what its thread wrote was else left waiting, written again by settle, and never said
        saved."""
        await to_its_end(self._write_unsaved())

    async def _write_unsaved(self) -> None:
        async with self._saving:
            svid = self._unsaved
            if svid is not None:
                await run_held(None, self._store.save_svid, svid)
                self._on_disk = svid
                if self._held is not None and self._held[0] is svid:
                    self._held_saved.set()  # to be used now (wait_held)
                if self._unsaved is svid:
                    self._unsaved = None
                    self._svid_saved()  # whichever save it was, a refused SVID is mended
                self._store.forget_spending()
            roots, sequence = self._unsaved_roots, self._unsaved_sequence
            if roots:
                seen = self._highest_sequence
                await run_held(None, self._store.save_bundle, roots, sequence, seen)
                if self._unsaved_roots is roots:
                    self._unsaved_roots = ()
                    self._bundle_saved()  # whichever save it was, a refused bundle is mended

    async def save_loop(self, retry_first: float, retry_cap: float) -> None:
        """Save an agent SVID or trust bundle the disk refused, with backoff (`retry_first`
        seconds, doubling up to `retry_cap`), until it takes it. Quiet while it fails:
        persist and save_roots said so, and what they said holds until the line this writes."""
        retry = Retry(retry_first, retry_cap)
        while True:
            await self._save_wanted.wait()
            await asyncio.sleep(retry.failed())
            try:
                await self.save_unsaved()
            except OSError:
                continue  # an SVID saved before its roots were refused again is said saved
            self._save_wanted.clear()
            retry.succeeded()

    def _svid_saved(self) -> None:
        """Said once an agent SVID the disk refused is saved, by whichever save: the operator
        was told a restart cannot use it."""
        if not self._svid_save_failed:
            return
        self._svid_save_failed = False
        # A disk failing again later is said at once, not an interval after the last line.
        self._svid_save_log = LogThrottle(self._log_interval, self._clock)
        log.info(
            "saved the agent SVID the disk refused before",
            extra={"svid_file": str(self._store.svid_path)},
        )

    def _bundle_refused(self, exc: OSError) -> None:
        """Said at the first failure, then once an interval with how many there were."""
        self._bundle_save_failures += 1
        count = self._bundle_save_log.due()
        if count:
            log.error(
                "cannot save the trust bundle; a restart verifies the server with the one "
                "saved before",
                extra=_refusal("bundle_file", self._store.bundle_path, count, exc),
            )

    def _bundle_saved(self) -> None:
        if self._bundle_save_failures:
            log.info(
                "saved the trust bundle again after failed saves",
                extra={
                    "bundle_file": str(self._store.bundle_path),
                    "failures": self._bundle_save_failures,
                },
            )
            self._bundle_save_failures = 0
            # A disk failing again later is said at once, not an interval after the last line.
            self._bundle_save_log = LogThrottle(self._log_interval, self._clock)

    async def save_at_stop(self) -> None:
        """Try once more to save what the disk refused (save_loop saves it no more), and say
        what a refusal now leaves the next start with."""
        try:
            await self.save_unsaved()
        except OSError as exc:
            if self._unsaved is None:  # only roots were waiting: the agent SVID is on disk
                self._bundle_refused(exc)
                return
            if self._held is not None and self._held[0] is self._unsaved:
                log.warning(
                    "stopping with the renewed agent SVID unsaved: the next start uses the one "
                    "saved before it, which the server still takes (the renewed one was never "
                    "used), and renews it",
                    extra={"svid_file": str(self._store.svid_path), "error": str(exc)[:200]},
                )
                return
            log.error(
                "stopping with the agent SVID in use unsaved: the next start cannot use it, only "
                "one saved before it (which the server may no longer take), and may have to "
                "attest again (with a join token, a new one: the one given is spent)",
                extra={"svid_file": str(self._store.svid_path), "error": str(exc)[:200]},
            )

    # ---- a renewal held ---------------------------------------------------------------------

    async def adopt(self, svid: AgentSvid, bundle: TrustBundle, arrival: Arrival) -> bool:
        """Save the renewed `svid`. True: the disk refused it and it is held unused, the SVID
        in use being the one on disk with life left (holds): the server drops that one at the
        first call with the new one, and a restart before the disk took the new one found
        only a superseded SVID. Held, a restart loads the old one, which the server still
        takes, and renews it. False: it is to be used now (from memory if the disk refused
        it: the server has replaced the old one already, and it works only until it expires)."""
        in_use = self.in_use
        on_disk = in_use is not None and in_use is self._on_disk and self._unsaved is None
        if on_disk and self._hold_left() > 0:
            # Before the save, so that a refusal is said as what it is (_svid_refused).
            self._held = (svid, arrival)
            self._held_saved.clear()
        await self.persist(svid, bundle, "renewed")
        if self._held is not None and self._held[0] is svid and self.holds():
            return True
        self._held = None
        return False

    @property
    def holding(self) -> bool:
        """A renewed SVID is held (adopt), to be used once saved or once the one in use runs
        short (take_held)."""
        return self._held is not None

    def drop_held(self) -> None:
        """A renewal held came for the SVID an attestation replaces: put in use later, it would
        supersede the attested one with a stale one."""
        self._held = None

    def holds(self) -> bool:
        """The renewed SVID held (adopt) stays unused: still unsaved, and the one in use has
        more than HOLD_SHARE of its life left."""
        if self._held is None or self.in_use is None or self._unsaved is not self._held[0]:
            return False
        return self._hold_left() > 0

    def _hold_left(self) -> float:
        """Seconds the SVID in use may go on while a renewed one is held."""
        svid = self.in_use
        assert svid is not None
        return self.life_left(svid) - HOLD_SHARE * (svid.not_after - svid.not_before)

    async def wait_held(self, recheck: float) -> None:
        """Until the renewed SVID held is saved or the one in use runs short (reading the
        clocks every `recheck` seconds at most): the renewal loop waits here, not renewing
        again (each renewal a new certificate and a datastore write at the server, each one
        refused by the disk again)."""
        while self.holds():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._held_saved.wait(), max(0.0, min(self._hold_left(), recheck))
                )

    def take_held(self) -> tuple[AgentSvid, Arrival]:
        """The renewed SVID held and its arrival, no longer held: to be put in use now."""
        held, self._held = self._held, None
        assert held is not None
        if self._unsaved is held[0]:
            # Said: the operator was told the one saved before stays in use, which a restart
            # could use; from now a restart before the save cannot.
            log.error(
                "the agent SVID in use runs short and the disk still refuses the renewed one: "
                "using it from memory, saving it again with backoff (a restart before it is "
                "saved cannot use it)",
                extra={"svid_file": str(self._store.svid_path)},
            )
        return held

    # ---- a refusal --------------------------------------------------------------------------

    def disown(self) -> None:
        """The server refused the agent: nothing backs the SVID waiting to be saved now, and
        the next start must not find it."""
        self._unsaved = None

    async def forget(self) -> None:
        """Forget the refused SVID in use and what waits with it, and remove it from disk. Under
        the save's lock: a save in its thread (save_loop's) would write the refused SVID back
        after the removal. Nothing saves it after: it no longer waits."""
        async with self._saving:
            self._unsaved = None
            self._held = None  # nothing backs it either
            self._svid_save_failed = False  # nothing of it to be said saved
            self._remove_refused()
        self.in_use = None

    def _remove_refused(self) -> None:
        refused = self.in_use
        self._on_disk = None
        try:
            self._store.remove_svid()
        except OSError as exc:
            # Raised here, it ended the Sync loop with no word said.
            self._refused_chain = refused.chain if refused is not None else ()
            log.error(
                "cannot remove the refused agent SVID; this run does not use it again",
                extra={"svid_file": str(self._store.svid_path), "error": str(exc)[:200]},
            )


def _refusal(name: str, path: Path, count: int, exc: OSError) -> dict[str, object]:
    """A refused save's log fields: the file, how many refusals since last said, the error."""
    return {name: str(path), "failures": count, "error": str(exc)[:200]}
