"""The issuance spine: entitlement, the task decision, the CA signers, then the ledger.

Transport (server.node_api) calls `Issuer` (workload SVIDs) and `AgentAdmission` (agent
SVIDs); the task layer plugs in through `TaskDecisions`; recording goes through `Ledger`
(wrapped by `MeteredLedger`). app.py wires them together.
"""

from server.issuance.agents import AgentAdmission
from server.issuance.issuer import Issuer, IssuerSettings, JwtOutcome, JwtRequest, X509Outcome
from server.issuance.ledger import Credential, Ledger, LedgerUnavailableError
from server.issuance.metered import MeteredLedger
from server.issuance.task_port import TaskDecisions, TaskGrant, TaskJwtGrant

__all__ = [
    "AgentAdmission",
    "Credential",
    "Issuer",
    "IssuerSettings",
    "JwtOutcome",
    "JwtRequest",
    "Ledger",
    "LedgerUnavailableError",
    "MeteredLedger",
    "TaskDecisions",
    "TaskGrant",
    "TaskJwtGrant",
    "X509Outcome",
]
