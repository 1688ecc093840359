"""SPIFFE IDs and trust domains, parsed by the grammar of the SPIFFE-ID standard.

Every rejection names its cause so an operator can fix the input without reading code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from svid._errors import SpiffeIdError
from svid._limits import utf8_size

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = _TD_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Fast acceptance of the valid inputs (nearly all of them, at a fifth of a Python scan's cost);
# only a refused one is scanned again by the checks below to name its first broken rule. Should
# a pattern ever refuse a valid input the scan still accepts it; that they accept nothing
# invalid is held by the go-spiffe oracle test.
_VALID_TD = re.compile(rf"[a-z0-9._-]{{1,{MAX_TRUST_DOMAIN_BYTES}}}")
_VALID_PATH = re.compile(r"(?:/(?!\.\.?(?:/|\Z))[a-zA-Z0-9._-]+)*")


# Where an input breaks several rules, the error names the first one met reading left to right,
# as go-spiffe's spiffeid.FromString does: empty, scheme, then one pass over the trust domain and
# the path. A character rule is met where the character stands; a segment's empty/dot rule at the
# '/' that ends it (or at the end); a length rule at the first byte past the limit. Every
# character before the one being read is a valid ASCII one, so a character index is also a byte
# offset there.


def _check_trust_domain(name: str, whole: str) -> None:
    if _VALID_TD.fullmatch(name):
        return
    if not name:
        raise SpiffeIdError(f"trust domain is missing in {whole!r}")
    for i, ch in enumerate(name):
        if i == MAX_TRUST_DOMAIN_BYTES:
            raise SpiffeIdError(
                f"trust domain is too long: {utf8_size(name)} bytes, at most "
                f"{MAX_TRUST_DOMAIN_BYTES} allowed"
            )
        if ch not in _TD_CHARS:
            raise SpiffeIdError(
                f"trust domain character {ch!r} is not allowed in {whole!r}: only a-z, 0-9, "
                "'.', '-' and '_' (no uppercase, userinfo, port or percent-encoding)"
            )


def _too_long(whole: str) -> SpiffeIdError:
    size = utf8_size(whole)  # a lone surrogate has a size too; it is refused as a character
    return SpiffeIdError(f"SPIFFE ID is too long: {size} bytes, at most {MAX_ID_BYTES}")


def _check_segment_end(segment: str, whole: str, *, last: bool) -> None:
    """The rules met at the end of a segment, ``segment`` without its leading '/'."""
    if not segment:
        cause = "a trailing slash" if last else "an empty segment"
        raise SpiffeIdError(f"path has {cause} in {whole!r}")
    if segment in (".", ".."):
        raise SpiffeIdError(f"path has a dot segment {segment!r} in {whole!r}")


def _bad_path_char(ch: str, whole: str) -> SpiffeIdError:
    return SpiffeIdError(
        f"path character {ch!r} is not allowed in {whole!r}: only a-z, A-Z, "
        "0-9, '.', '-' and '_' (no percent-encoding, query or fragment)"
    )


def _check_path(path: str, whole: str, offset: int) -> None:
    """Check ``path``, which starts at byte ``offset`` of the ID ``whole``, left to right."""
    room = MAX_ID_BYTES - offset
    if len(path) <= room and _VALID_PATH.fullmatch(path):
        return  # the empty path too; all ASCII, so as many bytes as characters
    if path[0] != "/":
        raise SpiffeIdError(f"path must start with '/': {path!r}")
    start = 1
    for i, ch in enumerate(path[:room]):
        if ch == "/":
            if i:
                _check_segment_end(path[start:i], whole, last=False)
            start = i + 1
        elif ch not in _PATH_CHARS:
            raise _bad_path_char(ch, whole)
    if len(path) > room:
        raise _too_long(whole)
    _check_segment_end(path[start:], whole, last=True)


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name, self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept ``example.org`` or ``spiffe://example.org`` (a path is refused)."""
        if not text:
            raise SpiffeIdError("trust domain is empty")
        # Like go-spiffe, ":/" (not "://") marks an ID: "spiffe:/x" is a bad scheme, not a bad
        # trust-domain character.
        if ":/" in text:
            sid = SpiffeId.parse(text)
            if sid.path:
                raise SpiffeIdError(f"a trust domain has no path: {text!r}")
            return sid.trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own ID, ``spiffe://<name>``: the key of bundle maps."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID. ``str()`` is the canonical form; equal IDs hash equal."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        prefix = f"{SCHEME_PREFIX}{self.trust_domain.name}"
        _check_path(self.path, prefix + self.path, len(prefix))

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not text:
            raise SpiffeIdError("SPIFFE ID is empty")
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError(f"scheme must be 'spiffe://' (lowercase): {text!r}")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        _check_trust_domain(name, text)
        # The trust domain's limit (255) is met long before the ID's (2048): its own check
        # covers that part of the length, and the path's check the rest.
        return cls(TrustDomain(name), path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build ``spiffe://td/seg1/seg2``; each segment is checked like a parsed one."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        path = "".join(f"/{seg}" for seg in segments)
        whole = f"{SCHEME_PREFIX}{td.name}{path}"
        # Segment by segment, in order, as go-spiffe's JoinPathSegments: a '/' inside one is a
        # bad character of that segment, met where it stands.
        for seg in segments:
            if not seg:
                raise SpiffeIdError(f"path has an empty segment in {whole!r}")
            if seg in (".", ".."):
                raise SpiffeIdError(f"path has a dot segment {seg!r} in {whole!r}")
            for ch in seg:
                if ch == "/":
                    raise SpiffeIdError(f"a path segment may not contain '/': {seg!r}")
                if ch not in _PATH_CHARS:
                    raise _bad_path_char(ch, whole)
        return cls(td, path)

    def child(self, *segments: str) -> SpiffeId:
        """This ID with more path segments appended."""
        return SpiffeId.from_segments(self.trust_domain, *self.segments, *segments)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/")) if self.path else ()

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"
