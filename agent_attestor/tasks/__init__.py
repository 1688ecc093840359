"""The agent's task layer: the Tasks and Revocations services on the Workload API socket."""
