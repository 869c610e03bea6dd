"""Mutual TLS as every role uses it: the files a process is given, and who a peer is.

Files: :class:`TlsFiles` is the one type for the ``--tls-*`` flags of the agent, the collector
and the operator commands: the CA that signed the other side's certificate (``--tls-ca``; the
collector's ``--tls-client-ca``) and, for mutual TLS, this side's certificate and key
(``--tls-cert``, ``--tls-key``). :meth:`TlsFiles.from_flags` checks a flag set (the agent and
the collector need all three, an operator may give the CA alone) and reads the files once so a
bad one is reported at start, naming its flag. Files are read again for each connection (a
renewed certificate is picked up on the next dial).

Identities: subjects are ``CN=<name>,OU=<role>,O=driftwarden`` (RFC 2253 order): the OU says
what a peer may do (:data:`ROLE_AGENT`, :data:`ROLE_OPERATOR`, :data:`ROLE_COLLECTOR`). gRPC's
``context.auth_context()`` carries the verified peer certificate's subject as ``x509_subject``
(RFC 2253, printed by OpenSSL); :func:`identity_from_auth_context` turns it into a
:class:`PeerIdentity`; :func:`certificate_identity` does the same for a PEM file. A node name is
its agent certificate's CN, so :func:`validate_node_names` is the rule both for the agent's
``--node`` and for ``driftwarden certs init --nodes`` (which makes the certificates:
:mod:`driftwarden.ops.certs`).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from driftwarden.core.errors import CertError, PeerIdentityError, UsageError

ORGANIZATION = "driftwarden"
ROLE_CA = "ca"
ROLE_AGENT = "agent"
ROLE_OPERATOR = "operator"
ROLE_COLLECTOR = "collector"
CA_FLAG = "--tls-ca"
CERT_FLAG = "--tls-cert"
KEY_FLAG = "--tls-key"
OPENSSL_TIMEOUT = 60.0
# A node name is a CN (at most 64 characters) and a DNS SAN: letters, digits, '-', '.'.
_NODE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$")
_MAKE_THEM = "run `driftwarden certs init DIR` to make certificates"

PathText = str | os.PathLike[str]


# -- files ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsPem:
    """The PEM bytes of a :class:`TlsFiles`."""

    ca: bytes
    cert: bytes | None
    key: bytes | None


@dataclass(frozen=True)
class TlsFiles:
    """The CA that signed the other side's certificate and, for mutual TLS, this side's
    certificate and key. ``ca_flag`` is the flag that named the CA (in errors)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    ca_flag: str = CA_FLAG

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise UsageError(f"{CERT_FLAG} and {KEY_FLAG} go together (a certificate and its "
                             f"private key)")

    @classmethod
    def from_flags(cls, *, ca: PathText | None = None, cert: PathText | None = None,
                   key: PathText | None = None, ca_flag: str = CA_FLAG,
                   pair_required: bool = False) -> TlsFiles | None:
        """The files a command's ``--tls-*`` flags name, read once; None when none is given.

        ``pair_required``: this side must present a certificate (the agent, the collector);
        otherwise the CA alone is TLS without a client certificate (an operator with a token).
        UsageError naming the flags for an incomplete set, or the flag of a file that cannot be
        read or is not PEM.
        """
        values = {ca_flag: ca, CERT_FLAG: cert, KEY_FLAG: key}
        given = [flag for flag, value in values.items() if value]
        if not given:
            return None
        needed = list(values) if pair_required or cert or key else [ca_flag]
        missing = [flag for flag in needed if flag not in given]
        if missing:
            why = ("TLS needs all three" if pair_required else
                   f"a client certificate needs {CERT_FLAG}, {KEY_FLAG} and {ca_flag}")
            raise UsageError(f"{', '.join(given)} given without {', '.join(missing)}: {why} "
                             f"(`driftwarden certs init DIR` makes them)")
        files = cls(ca=Path(ca or ""), cert=Path(cert) if cert else None,
                    key=Path(key) if key else None, ca_flag=ca_flag)
        try:
            files.read()
        except CertError as exc:
            raise UsageError(str(exc)) from None
        return files

    @property
    def has_pair(self) -> bool:
        """This side presents a certificate (mutual TLS)."""
        return self.cert is not None

    def read(self) -> TlsPem:
        """The PEM bytes; CertError naming the flag and file that cannot be read or is not
        PEM (read at each dial, a renewed certificate is used at once)."""
        return TlsPem(ca=_read_pem(self.ca_flag, self.ca),
                      cert=_read_pem(CERT_FLAG, self.cert) if self.cert else None,
                      key=_read_pem(KEY_FLAG, self.key) if self.key else None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials: trust ``ca``, present the pair when there is one."""
        pem = self.read()
        return grpc.ssl_channel_credentials(root_certificates=pem.ca, private_key=pem.key,
                                            certificate_chain=pem.cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials: present the pair, require a client certificate signed by
        ``ca``."""
        pem = self.read()
        if pem.cert is None or pem.key is None:
            raise UsageError(f"a TLS server needs {CERT_FLAG} and {KEY_FLAG}")
        return grpc.ssl_server_credentials([(pem.key, pem.cert)], root_certificates=pem.ca,
                                           require_client_auth=True)


def _read_pem(flag: str, path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertError(f"{flag} {path}: cannot read it ({exc.strerror or exc}); "
                        f"{_MAKE_THEM}") from None
    if b"-----BEGIN " not in data:
        raise CertError(f"{flag} {path}: not a PEM file; {_MAKE_THEM}")
    return data


# -- identities ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    common_name: str
    role: str | None  # the OU: agent | operator | collector (None when the cert has no OU)
    organization: str | None
    subject: str  # the RFC 2253 subject it was parsed from


def validate_node_names(nodes: Sequence[str]) -> list[str]:
    """The names, each usable as an agent certificate's CN and DNS SAN, none twice; else
    UsageError naming the bad one."""
    out: list[str] = []
    for node in nodes:
        if not _NODE_NAME.match(node):
            raise UsageError(f"node name {node!r} is not usable in a certificate: use 1-64 "
                             f"letters, digits, '-' or '.', starting and ending with a letter or "
                             f"digit")
        if node in out:
            raise UsageError(f"node name {node!r} is given twice")
        out.append(node)
    return out


def parse_rfc2253(subject: str) -> list[tuple[str, str]]:
    """``"CN=a\\,b,OU=agent+O=x"`` -> ``[("CN", "a,b"), ("OU", "agent"), ("O", "x")]``.

    Handles backslash escapes (``\\,`` and ``\\XX`` hex bytes, UTF-8) and multi-valued RDNs
    (``+``); a ``#hex`` value (an unknown attribute dumped as DER) is returned as written.
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(subject)
    while i < n:
        eq = subject.find("=", i)
        if eq < 0:
            raise PeerIdentityError(f"certificate subject {subject!r} is not RFC 2253 "
                                    f"(an attribute without '=')")
        name = subject[i:eq].strip()
        value = bytearray()
        i = eq + 1
        while i < n and subject[i] not in ",+;":
            ch = subject[i]
            if ch == "\\" and i + 1 < n:
                pair = subject[i + 1:i + 3]
                if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                    value.append(int(pair, 16))
                    i += 3
                    continue
                value += subject[i + 1].encode()
                i += 2
                continue
            value += ch.encode()
            i += 1
        out.append((name, value.decode("utf-8", "replace")))
        i += 1  # past the separator
    return out


def identity_from_subject(subject: str) -> PeerIdentity:
    attributes = parse_rfc2253(subject)

    def first(name: str) -> str | None:
        return next((v for k, v in attributes if k.upper() == name), None)

    common_name = first("CN")
    if not common_name:
        raise PeerIdentityError(f"certificate subject {subject!r} has no common name (CN)")
    return PeerIdentity(common_name=common_name, role=first("OU"),
                        organization=first("O"), subject=subject)


def identity_from_auth_context(auth: Mapping[str, Sequence[bytes]]) -> PeerIdentity:
    """The verified client certificate's identity from gRPC's ``context.auth_context()``.

    Raises :class:`PeerIdentityError` when the call carries no certificate (no TLS, or TLS
    without a client certificate).
    """
    subjects = auth.get("x509_subject") or []
    if subjects:
        return identity_from_subject(subjects[0].decode("utf-8", "replace"))
    names = auth.get("x509_common_name") or []
    if names:  # older gRPC cores: only the CN is known
        cn = names[0].decode("utf-8", "replace")
        return PeerIdentity(common_name=cn, role=None, organization=None, subject=f"CN={cn}")
    security = b",".join(auth.get("transport_security_type") or []).decode() or "none"
    raise PeerIdentityError(f"the peer presented no client certificate (transport security: "
                            f"{security}); connect with mutual TLS")


def certificate_identity(pem: bytes | str, openssl: str = "openssl") -> PeerIdentity:
    """The identity in a PEM certificate (for tools and tests; servers use the auth context)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        done = subprocess.run([openssl, "x509", "-noout", "-subject", "-nameopt", "RFC2253"],
                              input=data, capture_output=True, timeout=OPENSSL_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CertError(f"running {openssl} x509 failed: {exc}") from exc
    if done.returncode != 0:
        raise CertError("not a PEM certificate: "
                        + (done.stderr.decode(errors="replace").strip().splitlines()
                           or ["openssl x509 failed"])[-1])
    line = done.stdout.decode("utf-8", "replace").strip()
    return identity_from_subject(line.removeprefix("subject=").strip())


__all__ = [
    "ORGANIZATION",
    "ROLE_AGENT",
    "ROLE_CA",
    "ROLE_COLLECTOR",
    "ROLE_OPERATOR",
    "PeerIdentity",
    "TlsFiles",
    "TlsPem",
    "certificate_identity",
    "identity_from_auth_context",
    "identity_from_subject",
    "parse_rfc2253",
    "validate_node_names",
]
