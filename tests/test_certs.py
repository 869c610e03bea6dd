"""`driftwarden certs`: real openssl, real verification, and a real mTLS handshake over loopback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from driftwarden.certs import (
    CertBundle,
    CertError,
    PeerIdentity,
    PeerIdentityError,
    certificate_identity,
    identity_from_auth_context,
    init_certs,
    load_bundle,
    parse_rfc2253,
)
from driftwarden.errors import HostSupportError, UsageError

NODES = ["node-a", "node-b.example"]
SERVICE = "driftwarden.test.Who"
METHOD = f"/{SERVICE}/Who"
NO_PROXY = (("grpc.enable_http_proxy", 0),)  # loopback only, whatever the environment says


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          check=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CertBundle:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (apt-get install openssl)")
    return init_certs(tmp_path_factory.mktemp("pki") / "certs", NODES, days=30)


def test_layout_and_permissions(bundle: CertBundle) -> None:
    files = sorted(str(p.relative_to(bundle.directory)) for p in bundle.directory.rglob("*"))
    assert files == ["agents", "agents/node-a.crt", "agents/node-a.key",
                     "agents/node-b.example.crt", "agents/node-b.example.key", "ca.crt", "ca.key",
                     "collector.crt", "collector.key", "operator.crt", "operator.key",
                     "operator.token"]
    for key in (bundle.ca_key, bundle.collector.key, bundle.operator.key, bundle.operator_token,
                *(pair.key for pair in bundle.agents.values())):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert bundle.ca_cert.stat().st_mode & 0o777 == 0o644
    assert bundle.directory.stat().st_mode & 0o777 == 0o700
    assert sorted(bundle.agents) == NODES
    assert load_bundle(bundle.directory) == bundle


def test_certificates_verify_against_the_ca(bundle: CertBundle) -> None:
    leaves = [bundle.collector.cert, bundle.operator.cert,
              *(pair.cert for pair in bundle.agents.values())]
    done = openssl("verify", "-CAfile", bundle.ca_cert, *leaves)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{leaf}: OK" for leaf in leaves]
    server = openssl("verify", "-CAfile", bundle.ca_cert, "-purpose", "sslserver",
                     bundle.collector.cert)
    assert server.returncode == 0, server.stderr
    agent = openssl("verify", "-CAfile", bundle.ca_cert, "-purpose", "sslclient",
                    bundle.agents["node-a"].cert)
    assert agent.returncode == 0, agent.stderr


def test_subjects_sans_and_key_type(bundle: CertBundle) -> None:
    def field(cert: Path, *args: str) -> str:
        done = openssl("x509", "-in", cert, "-noout", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert field(bundle.collector.cert, "-ext", "subjectAltName").splitlines()[1].strip() == \
        "DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1"
    assert field(bundle.agents["node-a"].cert, "-ext", "subjectAltName").splitlines()[1].strip() \
        == "DNS:node-a"
    assert field(bundle.agents["node-a"].cert, "-subject", "-nameopt", "RFC2253").strip() == \
        "subject=CN=node-a,OU=agent,O=driftwarden"
    assert field(bundle.operator.cert, "-subject", "-nameopt", "RFC2253").strip() == \
        "subject=CN=operator,OU=operator,O=driftwarden"
    assert "ASN1 OID: prime256v1" in field(bundle.ca_cert, "-text")
    assert "CA:TRUE" in field(bundle.ca_cert, "-ext", "basicConstraints")
    token = bundle.operator_token.read_text()
    assert token.endswith("\n") and len(token.strip()) == 43  # token_urlsafe(32)


def test_certificate_identity(bundle: CertBundle) -> None:
    assert certificate_identity(bundle.agents["node-b.example"].cert.read_bytes()) == \
        PeerIdentity("node-b.example", "agent", "driftwarden",
                     "CN=node-b.example,OU=agent,O=driftwarden")
    assert certificate_identity(bundle.collector.cert.read_text()).role == "collector"
    with pytest.raises(CertError, match="not a PEM certificate"):
        certificate_identity(b"hello")


def test_refuses_to_overwrite_unless_forced(bundle: CertBundle, tmp_path: Path) -> None:
    target = tmp_path / "certs"
    first = init_certs(target, ["node-a", "node-old"], days=1)
    ca_before = first.ca_cert.read_bytes()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty; refusing to overwrite"):
        init_certs(target, ["node-a"], days=1)
    assert first.ca_cert.read_bytes() == ca_before
    second = init_certs(target, ["node-a"], days=1, force=True)
    assert second.ca_cert.read_bytes() != ca_before
    assert sorted(p.name for p in (target / "agents").iterdir()) == ["node-a.crt", "node-a.key"]
    assert (target / "notes.txt").read_text() == "mine"  # not ours: left alone
    assert second.agents["node-a"].key.stat().st_mode & 0o777 == 0o600
    done = openssl("verify", "-CAfile", second.ca_cert, second.agents["node-a"].cert)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs"]  # no staging left behind


def test_empty_existing_directory_is_used(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    made = init_certs(tmp_path / "certs", [], days=1)
    assert dict(made.agents) == {}
    assert made.ca_cert.is_file()


@pytest.mark.parametrize(("nodes", "days", "message"), [
    (["bad name"], 1, "node name 'bad name' is not usable"),
    (["a,b"], 1, "node name 'a,b' is not usable"),
    (["-x"], 1, "node name '-x' is not usable"),
    (["n" * 65], 1, "is not usable in a certificate"),
    (["a", "a"], 1, "node name 'a' is given twice"),
    (["a"], 0, "validity must be a whole number of days >= 1"),
])
def test_bad_arguments(tmp_path: Path, nodes: list[str], days: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        init_certs(tmp_path / "certs", nodes, days=days)
    assert not (tmp_path / "certs").exists()


def test_missing_openssl_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HostSupportError, match="'no-such-openssl' command is not found"):
        init_certs(tmp_path / "certs", ["a"], openssl="no-such-openssl")


def test_unknown_agent_and_incomplete_bundle(bundle: CertBundle, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no agent certificate for node 'node-z'"):
        bundle.agent("node-z")
    with pytest.raises(CertError, match="is incomplete"):
        load_bundle(tmp_path)


def test_rfc2253_parsing() -> None:
    assert parse_rfc2253("CN=node-a,OU=agent,O=driftwarden") == [
        ("CN", "node-a"), ("OU", "agent"), ("O", "driftwarden")]
    assert parse_rfc2253(r"CN=a\,b\+c\\d,OU=x+O=y") == [("CN", "a,b+c\\d"), ("OU", "x"),
                                                       ("O", "y")]
    assert parse_rfc2253(r"CN=caf\C3\A9") == [("CN", "café")]
    assert parse_rfc2253("1.2.3.4=#0403616263,CN=z") == [("1.2.3.4", "#0403616263"),
                                                         ("CN", "z")]
    with pytest.raises(PeerIdentityError, match="not RFC 2253"):
        parse_rfc2253("garbage")


def test_identity_from_auth_context_dicts() -> None:
    auth = {"transport_security_type": [b"ssl"], "x509_common_name": [b"node-a"],
            "x509_subject": [b"CN=node-a,OU=agent,O=driftwarden"]}
    assert identity_from_auth_context(auth) == PeerIdentity(
        "node-a", "agent", "driftwarden", "CN=node-a,OU=agent,O=driftwarden")
    assert identity_from_auth_context({"x509_common_name": [b"old"]}) == PeerIdentity(
        "old", None, None, "CN=old")
    with pytest.raises(PeerIdentityError, match=r"no client certificate \(transport security: "
                                                r"ssl\)"):
        identity_from_auth_context({"transport_security_type": [b"ssl"]})
    with pytest.raises(PeerIdentityError, match="has no common name"):
        identity_from_auth_context({"x509_subject": [b"OU=agent,O=driftwarden"]})


# -- a real mTLS handshake over loopback ---------------------------------------------------------


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    try:
        identity = identity_from_auth_context(context.auth_context())
    except PeerIdentityError as exc:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    return f"{identity.common_name}|{identity.role}|{identity.organization}".encode()


@pytest.fixture(scope="module")
def mtls_port(bundle: CertBundle) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(_who)}),))
    credentials = grpc.ssl_server_credentials(
        [bundle.collector.read()], root_certificates=bundle.ca_cert.read_bytes(),
        require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait()


def _call(channel: grpc.Channel) -> bytes:
    with channel:
        return channel.unary_unary(METHOD)(b"who am i", timeout=20)


def _client_credentials(bundle: CertBundle, pair=None, ca: bytes | None = None):
    key, cert = pair.read() if pair is not None else (None, None)
    return grpc.ssl_channel_credentials(
        root_certificates=ca or bundle.ca_cert.read_bytes(), private_key=key,
        certificate_chain=cert)


def test_mtls_agent_is_identified_by_its_certificate(bundle: CertBundle, mtls_port: int) -> None:
    for node in NODES:
        channel = grpc.secure_channel(f"127.0.0.1:{mtls_port}",
                                      _client_credentials(bundle, bundle.agents[node]), NO_PROXY)
        assert _call(channel) == f"{node}|agent|driftwarden".encode()
    operator = grpc.secure_channel(f"127.0.0.1:{mtls_port}",
                                   _client_credentials(bundle, bundle.operator), NO_PROXY)
    assert _call(operator) == b"operator|operator|driftwarden"


def test_mtls_server_name_localhost(bundle: CertBundle,
                                                      mtls_port: int) -> None:
    # The server listens on 127.0.0.1 only; "localhost" must still match the server cert's SAN.
    channel = grpc.secure_channel(
        f"127.0.0.1:{mtls_port}", _client_credentials(bundle, bundle.agents["node-a"]),
        (*NO_PROXY, ("grpc.ssl_target_name_override", "localhost")))
    assert _call(channel) == b"node-a|agent|driftwarden"


def test_mtls_client_without_certificate_fails(bundle: CertBundle, mtls_port: int) -> None:
    channel = grpc.secure_channel(f"127.0.0.1:{mtls_port}", _client_credentials(bundle),
                                  NO_PROXY)
    with pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_plaintext_client_fails(mtls_port: int) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{mtls_port}", NO_PROXY)
    with pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_certificate_from_another_ca_fails(bundle: CertBundle, mtls_port: int,
                                                tmp_path: Path) -> None:
    rogue = init_certs(tmp_path / "rogue", ["node-a"], days=1)
    # Trusts the real collector, but presents an agent cert the collector's CA never signed.
    channel = grpc.secure_channel(
        f"127.0.0.1:{mtls_port}",
        _client_credentials(bundle, rogue.agents["node-a"], ca=bundle.ca_cert.read_bytes()),
        NO_PROXY)
    with pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_rejects_a_server_from_another_ca(bundle: CertBundle, mtls_port: int,
                                                      tmp_path: Path) -> None:
    rogue = init_certs(tmp_path / "rogue", [], days=1)
    channel = grpc.secure_channel(
        f"127.0.0.1:{mtls_port}",
        _client_credentials(bundle, bundle.agents["node-a"], ca=rogue.ca_cert.read_bytes()),
        NO_PROXY)
    with pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
