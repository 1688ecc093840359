"""Task identities for agent runtimes: begin a task over the agent's socket, use its tokens, end it.

    from svid.tasks import TaskClient, TaskDeniedError

    with TaskClient() as client:                  # address from SPIFFE_ENDPOINT_SOCKET
        try:
            task = client.begin(
                actions=["read"], resources=["docs-api"],
                tools={"mcp-tickets": ["read_ticket"]},
                on_behalf_of="user:alice", goal="summarise the Q3 reports", ttl=900,
            )
        except TaskDeniedError as denied:
            print("refused:", denied.reason)      # the policy decision's reason
            raise
        with task:                                # ends the task on exit, on an error too
            print(task.decision, task.actions, task.tools, task.ttl)
            headers = {"Authorization": f"Bearer {task.jwt('docs-api')}"}  # cached, refreshed
            with task.subtask(resources=["docs-api"], actions=["read"]) as sub:
                ...                               # narrows the task; its tokens carry parent_txn
            with task.elevate(actions=["fetch_secret"], resources=["vault:x"], ttl=30) as step:
                ...                               # a short elevated step with its own decision

On asyncio, ``AsyncTaskClient`` does the same (``async with client.begin(...) as task``,
``await task.jwt(...)``).

A task the server ends behind the runtime's back (``svid-server task revoke``, its TTL, its
parent's end) is ended in the runtime as soon as the agent pushes the revocation of its
credentials (each client watches the agent's revocation stream): ``task.ended`` turns True, its
cached tokens are dropped, and ``task.jwt`` raises ``TaskEndedError`` saying how it ended.

On the receiving side, ``svid.JwtVerifier`` verifies the token and ``verified.task`` gives its
``TaskClaims``; ``claims.grants_tool("read_ticket", audience="mcp-tickets")`` answers whether it
may call that tool, and ``tool_scope(name)`` is the scope to name in an ``insufficient_scope``
answer. The claims are specified in docs/claims.md.
"""

from svid._task_claims import (
    TaskClaims,
    TaskClaimsError,
    task_claims,
    tool_scope,
    tools_from_scope,
)
from svid._task_errors import (
    TaskDeniedError,
    TaskEndedError,
    TaskError,
    TaskNotFoundError,
    TaskRequestError,
)
from svid._task_model import TaskInfo
from svid._tasks_async import AsyncTask, AsyncTaskClient, Beginning
from svid._tasks_sync import Task, TaskClient

__all__ = [
    "AsyncTask",
    "AsyncTaskClient",
    "Beginning",
    "Task",
    "TaskClaims",
    "TaskClaimsError",
    "TaskClient",
    "TaskDeniedError",
    "TaskEndedError",
    "TaskError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskRequestError",
    "task_claims",
    "tool_scope",
    "tools_from_scope",
]
