"""What the agent's two calls that mint JWT-SVIDs (the Workload API's FetchJWTSVID, the Tasks
service's MintTaskJWT) check and answer alike: the audience asked for, and a mint's failure
as the status that says whose fault it was."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from agent_attestor.errors import BadRequestError, MintRefusedError, NoIdentityError
from svid._limits import audience_problem
from svid._log_throttle import KeyedThrottles

# Under the Workload API's name, as "could not mint" has always been said (operators' filters).
log = logging.getLogger("agent_attestor.workload_api")

# Seconds between "could not mint" lines of one kind of failure: each workload's miss while the
# server is away failed alike, and its line (~600 bytes) was written for every one, 100 a
# second per uid (its mint budget) for as long as a workload asked.
MINT_FAILURE_LOG_INTERVAL = 30.0


async def checked_audience(context: grpc.aio.ServicerContext, asked: Sequence[str]) -> list[str]:
    """The audience `asked` for, empty names left out; aborts INVALID_ARGUMENT when none is
    left or it is past the limits (svid._limits)."""
    audience = list(asked)
    if "" in audience:
        audience = [a for a in audience if a]
    if not audience:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
    too_big = audience_problem(audience)
    if too_big:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, too_big)
    return audience


async def abort_mint_failure(
    context: grpc.aio.ServicerContext, exc: Exception, failures: KeyedThrottles
) -> None:
    """Abort a call whose JWT-SVID mint raised `exc`, with the status that says whose fault it
    was; a failure of the server's is logged (once an interval a kind, in `failures`) and
    told the caller only as UNAVAILABLE."""
    if isinstance(exc, MintRefusedError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, NoIdentityError):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, BadRequestError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    times = failures.due((type(exc), code))
    if times:
        log.warning("could not mint a JWT-SVID", extra={"error": str(exc)[:300], "times": times})
    await context.abort(grpc.StatusCode.UNAVAILABLE, "could not mint a JWT-SVID")
