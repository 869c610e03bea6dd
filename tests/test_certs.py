"""`driftwarden certs`: real openssl, real verification, and a real mTLS handshake over loopback."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from driftwarden.core.errors import CertError, HostSupportError, PeerIdentityError, UsageError
from driftwarden.core.tls import (
    PeerIdentity,
    certificate_identity,
    identity_from_auth_context,
    parse_rfc2253,
)
from driftwarden.ops.certs import (
    CertBundle,
    collector_sans,
    init_certs,
    load_bundle,
    parse_collector_names,
)

NODES = ["node-a", "node-b.example"]
SERVICE_NAME = "driftwarden-collector.driftwarden.svc"  # what deploy/daemonset.yaml dials
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


def _san(cert: Path) -> str:
    done = openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName")
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[1].strip()


@pytest.fixture(scope="module")
def named_bundle(tmp_path_factory) -> CertBundle:
    return init_certs(tmp_path_factory.mktemp("pki") / "named", ["node-a"], days=30,
                      collector_names=[SERVICE_NAME, "10.96.0.10", "[fd00::a]", "localhost"])


def test_collector_names_extend_the_collector_san(named_bundle: CertBundle) -> None:
    assert _san(named_bundle.collector.cert) == (
        "DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, "
        f"DNS:{SERVICE_NAME}, IP Address:10.96.0.10, IP Address:FD00:0:0:0:0:0:0:A")
    assert _san(named_bundle.agents["node-a"].cert) == "DNS:node-a"  # agents are unchanged
    done = openssl("verify", "-CAfile", named_bundle.ca_cert, "-purpose", "sslserver",
                   named_bundle.collector.cert)
    assert done.returncode == 0, done.stderr


def test_collector_sans_and_parse_collector_names() -> None:
    assert collector_sans() == ("DNS:localhost", "IP:127.0.0.1", "IP:::1")
    # loopback names are always in; repeats and other spellings of one address count once
    assert collector_sans(["a.example", "A.example.", "::1", "0:0::1", "127.0.0.1",
                           "10.0.0.1", "[fd00::1]", "fd00:0::1"]) == (
        "DNS:localhost", "IP:127.0.0.1", "IP:::1", "DNS:a.example", "IP:10.0.0.1", "IP:fd00::1")
    assert parse_collector_names(f" {SERVICE_NAME} ,, 10.0.0.1,") == [SERVICE_NAME, "10.0.0.1"]
    with pytest.raises(TypeError, match="use parse_collector_names"):
        collector_sans("a.example")


_NOT_DNS = ("is not a DNS name: use dot-separated labels of 1-63 letters, digits or '-' (not "
            "starting or ending with '-'), 253 characters at most")


@pytest.mark.parametrize(("text", "message"), [
    (" , ", "--collector-names ' , ': no names; give a comma list of DNS names or IP addresses "
            "(e.g. driftwarden-collector.driftwarden.svc)"),
    ("ok.svc,bad name", f"--collector-names 'ok.svc,bad name': 'bad name' {_NOT_DNS}"),
    (f"{SERVICE_NAME}:50051", f"--collector-names '{SERVICE_NAME}:50051': "
                              f"'{SERVICE_NAME}:50051' is neither an IP address nor a DNS name; "
                              f"give names without a port (e.g. {SERVICE_NAME}, not ...:50051)"),
    ("https://c.example", "--collector-names 'https://c.example': 'https://c.example' is not a "
                          "host name; give the bare name, without scheme or path (e.g. "
                          f"{SERVICE_NAME})"),
    ("10.0.0.256", "--collector-names '10.0.0.256': '10.0.0.256' is not an IP address, and a "
                   "DNS name cannot end in a numeric label"),
    ("*.svc", f"--collector-names '*.svc': '*.svc' {_NOT_DNS}"),
    ("-c.svc", f"--collector-names '-c.svc': '-c.svc' {_NOT_DNS}"),
    ("a..svc", f"--collector-names 'a..svc': 'a..svc' {_NOT_DNS}"),
    ("x" * 64 + ".svc", f"--collector-names '{'x' * 64}.svc': '{'x' * 64}.svc' {_NOT_DNS}"),
    ("fe80::1%eth0", "--collector-names 'fe80::1%eth0': 'fe80::1%eth0' has a zone (%...): a "
                     "certificate names an address without one"),
])
def test_bad_collector_names(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_collector_names(text)
    assert str(err.value) == message
    names = [n for n in text.split(",") if n.strip()]
    if names:  # the API call fails the same way, before anything is made
        with pytest.raises(UsageError) as err:
            init_certs(tmp_path / "certs", ["a"], collector_names=names)
        assert str(err.value) == message
    assert not (tmp_path / "certs").exists()


def test_collector_name_length_limits() -> None:
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters: allowed
    assert collector_sans([longest])[-1] == f"DNS:{longest}"
    with pytest.raises(UsageError) as err:
        collector_sans([longest + "b"])
    assert str(err.value) == f"--collector-names '{longest}b': '{longest}b' {_NOT_DNS}"


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
    with _who_server(bundle) as port:
        yield port


@contextlib.contextmanager
def _who_server(bundle: CertBundle) -> Iterator[int]:
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


@pytest.mark.parametrize("name", [SERVICE_NAME, "10.96.0.10", "localhost"])
def test_mtls_client_accepts_a_collector_name_from_collector_names(
        named_bundle: CertBundle, name: str) -> None:
    # A client that dials the Service name (checked against the certificate as the target
    # name) accepts the collector only because --collector-names put it in the SAN.
    with _who_server(named_bundle) as port:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", _client_credentials(named_bundle, named_bundle.agents["node-a"]),
            (*NO_PROXY, ("grpc.ssl_target_name_override", name)))
        assert _call(channel) == b"node-a|agent|driftwarden"


@pytest.mark.parametrize(("pki", "name"), [
    ("bundle", SERVICE_NAME),  # made without --collector-names: loopback names only
    ("named_bundle", "other.driftwarden.svc"),  # a name its --collector-names did not list
])
def test_mtls_client_rejects_a_collector_name_not_in_its_certificate(
        request: pytest.FixtureRequest, pki: str, name: str) -> None:
    made: CertBundle = request.getfixturevalue(pki)
    with _who_server(made) as port:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", _client_credentials(made, made.agents["node-a"]),
            (*NO_PROXY, ("grpc.ssl_target_name_override", name)))
        with pytest.raises(grpc.RpcError) as err:
            _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
