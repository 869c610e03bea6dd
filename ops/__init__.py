"""Operator tools: clients of the collector's gRPC API (the CLI's alerts, action, agents and certs
commands, and their table views). They never import the agent or the collector."""
