"""The agent's exception tree, rooted in svid's SvidError."""

from __future__ import annotations

from svid._errors import SvidError


class AgentError(SvidError):
    """Root of every error the node agent raises."""


class ConfigError(AgentError, ValueError):
    """A configuration key is missing or has a bad value; the message names the key."""


class AttestationError(AgentError):
    """Node attestation with the server failed."""


class RenewalFailedError(AgentError):
    """The agent SVID's renewal failed for a reason that is not the server's decision about
    this agent (no answer within its deadline, the connection failed, an SVID that does not
    parse), or the SVID expired while its renewals failed. It ends the connection as a failure:
    the agent moves to another server while its SVID still lets it renew there. The renewal's
    own failure is its cause (failure_code reads the gRPC status through it)."""


class ServerSilentError(AgentError, ConnectionError):
    """The server of a live Sync stream sent nothing for longer than its heartbeats promise
    (server_link.ServerLink): stopped, its loop stuck, or behind a network that dropped the
    connection without a word. Keepalive would end the stream some 20 s on; this ends it as a
    failure at once, and the agent moves to another server (or reconnects to its only one)."""


class ServerNotVerifiedError(AttestationError):
    """The server's certificate did not verify against the roots the agent attested with: the
    TLS handshake failed, so nothing (no join token) reached the server."""


class ServerNotOursError(ServerNotVerifiedError):
    """The server verified under the agent's roots, but is not its trust domain's: its
    certificate carries another SPIFFE ID (another trust domain's server under the same upstream
    root), or the channel pinned to the CA of the server checked reached one that CA did not
    sign. Nothing was sent to it, nor taken from it."""


class ChannelNotVerifiedError(ServerNotVerifiedError):
    """The server the agent SVID's channel meets does not verify against the roots that SVID
    came with (the trust domain's CA replaced while the agent was away, or a stray server):
    nothing was sent to it."""


class AttestationRefusedError(AttestationError):
    """The server refused to attest the agent by what it was given (PERMISSION_DENIED), or the
    agent knows it would, or cannot attest yet: every retry fails alike until the operator
    mends it. `problem` and `remedy` are what the agent tells the operator; the message is what
    the server said, with no secret of the agent's."""

    problem = "the server refuses to attest this agent"
    remedy = "see what the server said (error) and its log"


class JoinTokenRefusedError(AttestationRefusedError):
    """The join token cannot attest the agent: the server refused it (never issued, expired or
    already used), or this agent spent it already. Only a new token helps; the message never
    holds the token."""

    problem = "the join token cannot attest this agent (never issued, expired, or already used)"
    remedy = (
        "issue a new one (svid-server token generate) and give it to the agent "
        "(--join-token-file FILE or $SVID_AGENT_JOIN_TOKEN)"
    )


class X509PopRefusedError(AttestationRefusedError):
    """The server refused the agent's x509pop certificate: not from a CA it trusts for x509pop,
    not proven with its key, or naming an agent that is banned (its ID is the certificate's)."""

    problem = (
        "the server refuses this agent's x509pop certificate (not issued by a CA the server "
        "trusts for x509pop, not matching x509pop_key, or the agent it names is banned)"
    )
    remedy = (
        "give the agent a certificate and its key that the server accepts (x509pop_cert, "
        "x509pop_key; a new certificate is a new agent ID, a banned one stays banned), or add "
        "the certificate's CA to the server's x509pop_ca_bundle"
    )


class X509PopAnswerRefusedError(X509PopRefusedError):
    """The server refused the agent's answer to its x509pop challenge. A server of this
    release says so when the key is not the certificate's; one of an earlier release (which
    checks a signature over the bare nonce, not svid._x509pop's form) says the same words to
    every agent of this one, however right its key."""

    problem = (
        "the server refuses this agent's answer to the x509pop challenge (x509pop_key is not "
        "the key of x509pop_cert, or the server is of an earlier release than this agent, "
        "which checks the answer in another form)"
    )
    remedy = (
        "give the agent the key of its certificate (x509pop_key, x509pop_cert), or the server "
        "is older than this agent: upgrade the servers first"
    )


class AttestationNotAcceptedError(AttestationRefusedError):
    """The server refused the attestation request itself (INVALID_ARGUMENT): most often it does
    not enable the agent's attestation type. No retry is answered otherwise until the server's
    or the agent's configuration changes."""

    problem = (
        "the server does not accept this agent's attestation (its attestation type is not "
        "enabled there, or the request is one it cannot read)"
    )
    remedy = (
        "enable the agent's way of attesting on the server (x509pop: x509pop_ca_bundle), or "
        "give the agent one the server enables (the server's answer, in error, lists them)"
    )


class StateNotWritableError(AttestationRefusedError):
    """The agent's data directory refuses writes (read-only, full): a join token is not sent
    until it takes them, since the SVID it buys could not be saved, and a restart would have
    neither. The message names the file and what the system said."""

    problem = (
        "the agent cannot write its data directory, where the SVID a join token buys is kept: "
        "the token is not sent until it can"
    )
    remedy = "make the directory writable or free space on its file system (see error)"


class CheckpointUnreadableError(AgentError):
    """The agent's copy of the server's audit checkpoints cannot be read (an I/O error, not a
    damaged file): it stays in place and the agent does not start. Set aside, the anchor that
    makes the server's audit log tamper-evident against a rewrite would be lost for a fault of
    the disk. The message names the file and what the system said."""


class DataFileUnreadableError(AgentError, OSError):
    """A file of the agent's data directory exists but cannot be read (a directory at its name,
    no permission, an I/O error): at start the agent does not run, as SPIRE's agent does not
    with a bundle it cannot load; retrying read the same refusal for ever. An OSError too, so a
    read failing later (the disk) is retried as a disk's failure is. The message names the file
    and what the system said."""


class AttestationLimitedError(AttestationError):
    """The server's attestation budget for the agent's host is spent (RESOURCE_EXHAUSTED): it
    refills with time, so a later attempt, or another server, may succeed."""


class ProcessGoneError(AgentError):
    """The calling process exited, or its pid now names another process."""


class NoIdentityError(AgentError):
    """The caller is entitled to no identity (or not to the one it asked for)."""


class MintRefusedError(AgentError):
    """A new JWT-SVID was not minted: the caller's uid is past its minting rate (mint_budget.py).
    Raised before the server is asked; tokens already held are still served."""


class NotReadyError(AgentError):
    """The agent has no SVIDs or bundle from the server yet."""


class BadRequestError(AgentError, ValueError):
    """The server refused a request as malformed (INVALID_ARGUMENT)."""
