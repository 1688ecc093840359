"""SPIFFE IDs and trust domains, parsed by the grammar of the SPIFFE-ID standard.

Every rejection names its cause so an operator can fix the input without reading code.
"""

from __future__ import annotations

from dataclasses import dataclass

from svid._errors import SpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = _TD_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_trust_domain(name: str, whole: str) -> None:
    if not name:
        raise SpiffeIdError(f"trust domain is missing in {whole!r}")
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(
            f"trust domain is too long: {len(name.encode())} bytes, at most "
            f"{MAX_TRUST_DOMAIN_BYTES} allowed"
        )
    for ch in name:
        if ch not in _TD_CHARS:
            raise SpiffeIdError(
                f"trust domain character {ch!r} is not allowed in {whole!r}: only a-z, 0-9, "
                "'.', '-' and '_' (no uppercase, userinfo, port or percent-encoding)"
            )


def _check_path(path: str, whole: str) -> None:
    if not path:
        return
    if path.endswith("/"):
        raise SpiffeIdError(f"path has a trailing slash in {whole!r}")
    for segment in path[1:].split("/"):
        if not segment:
            raise SpiffeIdError(f"path has an empty segment in {whole!r}")
        if segment in (".", ".."):
            raise SpiffeIdError(f"path has a dot segment {segment!r} in {whole!r}")
        for ch in segment:
            if ch not in _PATH_CHARS:
                raise SpiffeIdError(
                    f"path character {ch!r} is not allowed in {whole!r}: only a-z, A-Z, "
                    "0-9, '.', '-' and '_' (no percent-encoding, query or fragment)"
                )


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
        if "://" in text:
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
        _check_path(self.path, f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}")
        if self.path and not self.path.startswith("/"):
            raise SpiffeIdError(f"path must start with '/': {self.path!r}")
        size = len(SCHEME_PREFIX) + len(self.trust_domain.name.encode()) + len(self.path.encode())
        if size > MAX_ID_BYTES:
            raise SpiffeIdError(f"SPIFFE ID is too long: {size} bytes, at most {MAX_ID_BYTES}")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not text:
            raise SpiffeIdError("SPIFFE ID is empty")
        if len(text.encode()) > MAX_ID_BYTES:
            raise SpiffeIdError(
                f"SPIFFE ID is too long: {len(text.encode())} bytes, at most {MAX_ID_BYTES}"
            )
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError(f"scheme must be 'spiffe://' (lowercase): {text!r}")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        _check_trust_domain(name, text)
        _check_path(path, text)
        return cls(TrustDomain(name), path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build ``spiffe://td/seg1/seg2``; each segment is checked like a parsed one."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        for seg in segments:
            if "/" in seg:
                raise SpiffeIdError(f"a path segment may not contain '/': {seg!r}")
        path = "".join(f"/{seg}" for seg in segments)
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
