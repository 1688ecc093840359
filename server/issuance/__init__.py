"""The issuance spine: entitlement, the task decision, the CA signers, then the ledger.

Transport (server.node_api) calls `Issuer`; the task layer plugs in through `TaskDecisions`;
recording goes through `Ledger`. app.py wires the three together.
"""

from server.issuance.issuer import Issuer, IssuerSettings, JwtOutcome, X509Outcome
from server.issuance.ledger import Credential, Ledger, LedgerUnavailableError
from server.issuance.task_port import NoTasks, TaskDecisions, TaskGrant, TaskJwtGrant

__all__ = [
    "Credential",
    "Issuer",
    "IssuerSettings",
    "JwtOutcome",
    "Ledger",
    "LedgerUnavailableError",
    "NoTasks",
    "TaskDecisions",
    "TaskGrant",
    "TaskJwtGrant",
    "X509Outcome",
]
