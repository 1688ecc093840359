"""Task-scoped just-in-time identities: begin/end, per-mint decisions, revocation, CRLs."""

from server.tasks.model import Credential, Task, TaskState
from server.tasks.service import TaskService, TaskSettings
from server.tasks.store import TaskStore

__all__ = ["Credential", "Task", "TaskService", "TaskSettings", "TaskState", "TaskStore"]
