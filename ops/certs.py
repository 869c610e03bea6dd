"""Certificates for mutual TLS between agents, the collector and operators
(`driftwarden certs init`): the operator's tool that makes them.

:func:`init_certs` makes, with the ``openssl`` command (no Python crypto dependency), a private
CA and the certificates every party presents. Keys are EC P-256, certificates SHA-256, files::

    DIR/ca.crt ca.key                  the CA (keep ca.key off the nodes)
    DIR/collector.crt collector.key    server: SAN DNS:localhost, IP:127.0.0.1, IP:::1
                                       (+ the collector names given, see below)
    DIR/operator.crt operator.key      client: CN=operator, OU=operator
    DIR/operator.token                 a random bearer token for operator calls
    DIR/agents/<node>.crt <node>.key   client: CN=<node>, OU=agent, SAN DNS:<node>

The collector certificate always names the loopback addresses; ``collector_names`` (the CLI's
``--collector-names LIST``) adds the DNS names and IP addresses agents and operators dial beyond
loopback, e.g. ``driftwarden-collector.driftwarden.svc`` for the Kubernetes Service in
``deploy/collector.yaml``: a TLS client checks the name it dialled against this list.
:func:`parse_collector_names` checks the flag's text, :func:`collector_sans` makes the list.

Subjects are ``CN=<name>,OU=<role>,O=driftwarden`` (the roles and the parsing of subjects, which
the collector uses to tell who calls, are :mod:`driftwarden.core.tls`). Only certificates issued
by this CA are accepted by the collector, so the OU is as trustworthy as the CA key. Keys and
the token are 0600, the directory 0700, certificates 0644.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from driftwarden.core.errors import CertError, HostSupportError, UsageError
from driftwarden.core.tls import (
    OPENSSL_TIMEOUT,
    ORGANIZATION,
    ROLE_AGENT,
    ROLE_CA,
    ROLE_COLLECTOR,
    ROLE_OPERATOR,
    validate_node_names,
)

CA_COMMON_NAME = "driftwarden-ca"
COLLECTOR_COMMON_NAME = "driftwarden-collector"
OPERATOR_COMMON_NAME = "operator"
COLLECTOR_SANS = ("DNS:localhost", "IP:127.0.0.1", "IP:::1")
AGENTS_DIR = "agents"
# A DNS name for a SAN (RFC 1123): dot-separated labels of 1-63 letters, digits and '-', not
# starting or ending with '-'; 253 characters at most.
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_DNS_NAME_MAX = 253
COLLECTOR_NAMES_FLAG = "--collector-names"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """``(private key PEM, certificate PEM)``: the pair gRPC's ssl credentials take."""
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class CertBundle:
    directory: Path
    ca_cert: Path
    ca_key: Path
    collector: KeyPair
    operator: KeyPair
    operator_token: Path
    agents: Mapping[str, KeyPair]  # node name -> its client certificate (read-only)

    def agent(self, node: str) -> KeyPair:
        try:
            return self.agents[node]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            raise UsageError(f"no agent certificate for node {node!r} in {self.directory} "
                             f"(known: {known}); run `driftwarden certs init` with --nodes "
                             f"including it") from None


def _bundle(directory: Path, nodes: Iterable[str]) -> CertBundle:
    agents = {n: KeyPair(directory / AGENTS_DIR / f"{n}.crt", directory / AGENTS_DIR / f"{n}.key")
              for n in sorted(nodes)}
    return CertBundle(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        collector=KeyPair(directory / "collector.crt", directory / "collector.key"),
        operator=KeyPair(directory / "operator.crt", directory / "operator.key"),
        operator_token=directory / "operator.token",
        agents=types.MappingProxyType(agents),
    )


def _collector_san(name: str, flag_value: str) -> str:
    """``"10.0.0.5"`` -> ``"IP:10.0.0.5"``, ``"collector.example"`` -> ``"DNS:..."``."""
    def bad(why: str) -> UsageError:
        return UsageError(f"{COLLECTOR_NAMES_FLAG} {flag_value!r}: {name!r} {why}")

    text = name.strip()
    if text.startswith("[") and text.endswith("]"):  # [fd00::1], as in host:port notation
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise bad("has a zone (%...): a certificate names an address without one")
        return f"IP:{address.compressed}"
    if not text:
        raise bad("is empty; give a comma list of DNS names or IP addresses")
    if "://" in text or "/" in text:
        raise bad("is not a host name; give the bare name, without scheme or path "
                  "(e.g. driftwarden-collector.driftwarden.svc)")
    if ":" in text:
        raise bad("is neither an IP address nor a DNS name; give names without a port "
                  "(e.g. driftwarden-collector.driftwarden.svc, not ...:50051)")
    dns = text.removesuffix(".")  # a fully qualified "name." is the same name
    labels = dns.split(".")
    if len(dns) > _DNS_NAME_MAX or not all(_DNS_LABEL.match(label) for label in labels):
        raise bad("is not a DNS name: use dot-separated labels of 1-63 letters, digits or '-' "
                  "(not starting or ending with '-'), 253 characters at most")
    if labels[-1].isdigit():  # 10.0.0.256 is a mistyped address, not a host name
        raise bad("is not an IP address, and a DNS name cannot end in a numeric label")
    return f"DNS:{dns}"


def collector_sans(collector_names: Sequence[str] = ()) -> tuple[str, ...]:
    """The collector certificate's subjectAltName entries: the loopback ones
    (:data:`COLLECTOR_SANS`), then each of `collector_names` (DNS names or IP addresses) once.

    UsageError naming ``--collector-names`` and the bad value for a name that is neither.
    """
    if isinstance(collector_names, str):
        raise TypeError("collector_names is a sequence of names; use parse_collector_names "
                        "for the flag's comma list")
    flag_value = ",".join(collector_names)
    out = list(COLLECTOR_SANS)
    for name in collector_names:
        san = _collector_san(name, flag_value)
        if san.lower() not in (s.lower() for s in out):
            out.append(san)
    return tuple(out)


def parse_collector_names(text: str) -> list[str]:
    """``--collector-names`` text (a comma list) -> the names; UsageError naming the flag
    when it holds no name or a name that is neither a DNS name nor an IP address."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{COLLECTOR_NAMES_FLAG} {text!r}: no names; give a comma list of DNS "
                         f"names or IP addresses (e.g. driftwarden-collector.driftwarden.svc)")
    for name in names:
        _collector_san(name, text)
    return names


def init_certs(directory: str | os.PathLike[str], nodes: Sequence[str], days: int = 365,
               openssl: str = "openssl", *, force: bool = False,
               collector_names: Sequence[str] = ()) -> CertBundle:
    """Make the CA, the collector's server certificate, one client certificate per node, the
    operator's client certificate and token in `directory` (layout in the module docstring).

    ``collector_names``: DNS names or IP addresses added to the collector certificate's
    subjectAltName (beyond loopback; see :func:`collector_sans`).

    Refuses a directory that is not empty unless ``force``; with ``force`` the files above are
    replaced and other agent certificates in ``agents/`` (signed by the old CA) are removed.
    """
    directory = Path(directory)
    nodes = validate_node_names(list(nodes))
    sans = collector_sans(collector_names)
    if not isinstance(days, int) or days < 1:
        raise UsageError(f"certificate validity must be a whole number of days >= 1, got {days!r}")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UsageError(f"{directory} is not empty; refusing to overwrite certificates there "
                         f"(use --force to replace them, or choose a new directory)")
    binary = shutil.which(openssl)
    if binary is None:
        raise HostSupportError(f"the {openssl!r} command is not found; install it "
                               f"(apt-get install openssl) or pass its path")

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        made = _bundle(staging, nodes)
        _make_all(_OpenSSL(binary, staging / ".work"), made, nodes, days, sans)
        shutil.rmtree(staging / ".work")
        return _install(staging, directory, nodes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_bundle(directory: str | os.PathLike[str]) -> CertBundle:
    """The bundle `init_certs` made in `directory`; a clear error when a file is missing."""
    directory = Path(directory)
    agents_dir = directory / AGENTS_DIR
    nodes = sorted(p.stem for p in agents_dir.glob("*.crt")) if agents_dir.is_dir() else []
    bundle = _bundle(directory, nodes)
    needed = [bundle.ca_cert, bundle.collector.cert, bundle.collector.key, bundle.operator.cert,
              bundle.operator.key, bundle.operator_token]
    needed += [p for pair in bundle.agents.values() for p in (pair.cert, pair.key)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise CertError(f"certificate bundle {directory} is incomplete (missing "
                        f"{', '.join(missing)}); run `driftwarden certs init {directory}`")
    return bundle


class _OpenSSL:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(mode=0o700)
        # Our own config: the host's openssl.cnf (or $OPENSSL_CONF) must not add extensions.
        self.config = self._write("openssl.cnf", "[req]\ndistinguished_name = dn\n[dn]\n")

    def _write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def run(self, *args: str | Path) -> str:
        argv = [self.binary, *map(str, args)]
        env = {**os.environ, "OPENSSL_CONF": str(self.config)}
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=env, umask=0o077,
                                  timeout=OPENSSL_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CertError(f"running {' '.join(argv[:2])} failed: {exc}") from exc
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise CertError(f"{' '.join(argv[:2])} failed (exit {done.returncode}): {detail}")
        return done.stdout

    def key(self, path: Path) -> None:
        self.run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", path)

    def ca(self, pair: KeyPair, days: int) -> None:
        self.key(pair.key)
        config = self._write("ca.cnf", "[req]\ndistinguished_name = dn\n[dn]\n[v3]\n"
                             "basicConstraints = critical,CA:TRUE,pathlen:0\n"
                             "keyUsage = critical,keyCertSign,cRLSign\n"
                             "subjectKeyIdentifier = hash\n")
        self.run("req", "-x509", "-new", "-config", config, "-extensions", "v3",
                 "-key", pair.key, "-sha256", "-days", str(days),
                 "-subj", _subject(CA_COMMON_NAME, ROLE_CA), "-set_serial", _serial(),
                 "-out", pair.cert)

    def leaf(self, pair: KeyPair, ca: KeyPair, common_name: str, role: str,
             extended_usage: str, sans: Sequence[str], days: int) -> None:
        self.key(pair.key)
        csr = self.workdir / f"{pair.key.stem}.{role}.csr"
        self.run("req", "-new", "-config", self.config, "-key", pair.key,
                 "-subj", _subject(common_name, role), "-out", csr)
        lines = ["basicConstraints = critical,CA:FALSE",
                 "keyUsage = critical,digitalSignature",
                 f"extendedKeyUsage = {extended_usage}",
                 "subjectKeyIdentifier = hash",
                 "authorityKeyIdentifier = keyid,issuer"]
        if sans:
            lines.append("subjectAltName = " + ",".join(sans))
        ext = self._write(f"{pair.key.stem}.{role}.ext", "\n".join(lines) + "\n")
        self.run("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key,
                 "-set_serial", _serial(), "-days", str(days), "-sha256", "-extfile", ext,
                 "-out", pair.cert)


def _subject(common_name: str, role: str) -> str:
    return f"/O={ORGANIZATION}/OU={role}/CN={common_name}"


def _serial() -> str:
    return "0x" + secrets.token_hex(16)  # random, positive, well under the 20-byte limit


def _make_all(ssl: _OpenSSL, made: CertBundle, nodes: Sequence[str], days: int,
              collector_sans: Sequence[str]) -> None:
    ca = KeyPair(made.ca_cert, made.ca_key)
    ssl.ca(ca, days)
    ssl.leaf(made.collector, ca, COLLECTOR_COMMON_NAME, ROLE_COLLECTOR, "serverAuth",
             collector_sans, days)
    ssl.leaf(made.operator, ca, OPERATOR_COMMON_NAME, ROLE_OPERATOR, "clientAuth", (), days)
    (made.directory / AGENTS_DIR).mkdir(mode=0o700)
    for node in nodes:
        ssl.leaf(made.agents[node], ca, node, ROLE_AGENT, "clientAuth", (f"DNS:{node}",), days)
    fd = os.open(made.operator_token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as token:
        token.write(secrets.token_urlsafe(32) + "\n")
    for path in made.directory.rglob("*"):
        if path.is_file():
            path.chmod(0o644 if path.suffix == ".crt" else 0o600)


def _install(staging: Path, directory: Path, nodes: Sequence[str]) -> CertBundle:
    """Move the made files into `directory` (renaming the whole staging dir when possible)."""
    try:
        directory.rmdir()  # only succeeds when it is empty
    except FileNotFoundError:
        pass
    except OSError:
        _replace_files(staging, directory)
        return _bundle(directory, nodes)
    staging.chmod(0o700)
    os.replace(staging, directory)
    return _bundle(directory, nodes)


def _replace_files(staging: Path, directory: Path) -> None:
    agents = directory / AGENTS_DIR
    if agents.is_dir():
        for stale in [*agents.glob("*.crt"), *agents.glob("*.key")]:
            stale.unlink()
    agents.mkdir(mode=0o700, exist_ok=True)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            os.replace(path, directory / path.relative_to(staging))


__all__ = [
    "CertBundle",
    "KeyPair",
    "collector_sans",
    "init_certs",
    "load_bundle",
    "parse_collector_names",
]
