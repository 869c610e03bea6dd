"""Who is calling the collector, and may they: the roles of tokens and client certificates.

With a token configured, operator calls need ``authorization: Bearer <token>``
(UNAUTHENTICATED otherwise); with TLS an operator certificate (OU=operator) is enough. Agent
certificates (OU=agent) may only call AgentChannel.Connect, and other identities may not call
it (PERMISSION_DENIED); with TLS an agent's node is its certificate's CN. Without TLS, Connect
trusts ``hello.node`` and operator calls need only the token, if one is set (loopback dev mode).
"""

from __future__ import annotations

import hmac

import grpc
from driftwarden.core.errors import PeerIdentityError, RpcAbort
from driftwarden.core.tls import ROLE_AGENT, ROLE_OPERATOR, identity_from_auth_context


class Authorizer:
    """Who is calling, and may they (module docstring). Stateless after construction."""

    def __init__(self, token: str | None, tls: bool) -> None:
        self._token = token.encode() if token else None
        self.tls = tls

    def _certificate(self, context: grpc.ServicerContext):
        if not self.tls:
            return None
        try:
            return identity_from_auth_context(context.auth_context())
        except PeerIdentityError:
            return None

    def _bearer_ok(self, context: grpc.ServicerContext) -> bool:
        if self._token is None:
            return False
        for key, value in context.invocation_metadata() or ():
            if key.lower() != "authorization":
                continue
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode(), self._token):
                return True
        return False

    def operator(self, context: grpc.ServicerContext) -> str:
        """The operator's name for the audit trail ("operator" for the token, else the
        certificate's CN); raises RpcAbort when the caller may not make operator calls."""
        identity = self._certificate(context)
        if identity is not None and identity.role == ROLE_AGENT:
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED,
                           f"agent certificate {identity.common_name!r} may only call "
                           "AgentChannel.Connect; use an operator certificate or token")
        if identity is not None and identity.role == ROLE_OPERATOR:
            return identity.common_name
        if self._token is not None:
            if self._bearer_ok(context):
                return "operator"
            raise RpcAbort(grpc.StatusCode.UNAUTHENTICATED,
                           "missing or wrong operator token: send metadata "
                           "'authorization: Bearer <token>' with the collector's token")
        if self.tls:
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED,
                           "operator calls need an operator certificate (OU=operator)")
        return "operator"  # loopback dev mode: no TLS, no token

    def agent_node(self, context: grpc.ServicerContext) -> str | None:
        """The node an agent certificate names (None without TLS: hello.node is trusted);
        raises RpcAbort for anyone but an agent."""
        if not self.tls:
            return None
        identity = self._certificate(context)
        if identity is None or identity.role != ROLE_AGENT:
            who = "no client certificate" if identity is None else (
                f"certificate {identity.common_name!r} (OU={identity.role})")
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED,
                           f"only agent certificates (OU=agent) may call AgentChannel.Connect, "
                           f"not {who}")
        return identity.common_name


__all__ = ["Authorizer"]
