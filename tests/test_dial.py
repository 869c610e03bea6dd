"""core/dial.py, the one way the agent and the operator tools reach the collector: a real gRPC
server on 127.0.0.1 sees the bearer token, mutual TLS from TlsFiles, and the HTTP proxy
variables of the environment are not followed (a listener on the proxy's port records every
connection)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from driftwarden.core.dial import dial
from driftwarden.core.errors import CertError, UsageError
from driftwarden.core.tls import TlsFiles, identity_from_auth_context
from driftwarden.core.wire import MAX_MESSAGE_BYTES
from driftwarden.ops.certs import CertBundle, init_certs

SERVICE = "driftwarden.test.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY",
                   "HTTP_PROXY")


class Recorder:
    """What the server saw of each call: its metadata and the peer's certificate CN."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def _record(self, context: grpc.ServicerContext) -> None:
        auth = context.auth_context()
        cn = (identity_from_auth_context(auth).common_name if auth.get("x509_subject")
              else None)
        self.calls.append({"metadata": dict(context.invocation_metadata()), "cn": cn})

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record(context)
        return b"echo:" + request

    def stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record(context)
        for request in requests:
            yield b"echo:" + request


@contextlib.contextmanager
def serve(credentials: grpc.ServerCredentials | None = None) -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(recorder.unary),
        "Stream": grpc.stream_stream_rpc_method_handler(recorder.stream)}),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.stop(grace=None).wait()


class ProxyTrap:
    """A listener standing where the proxy variables point: counts connections, answers none."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="proxy-trap", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def proxy(monkeypatch) -> Iterator[ProxyTrap]:
    trap = ProxyTrap()
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, f"http://127.0.0.1:{trap.port}")
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield trap
    trap.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CertBundle:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (apt-get install openssl)")
    return init_certs(tmp_path_factory.mktemp("dial") / "certs", ["node-a"], days=2)


def server_credentials(bundle: CertBundle) -> grpc.ServerCredentials:
    return TlsFiles(ca=bundle.ca_cert, cert=bundle.collector.cert, key=bundle.collector.key,
                    ca_flag="--tls-client-ca").server_credentials()


# -- token ---------------------------------------------------------------------------------------


def test_the_token_arrives_on_unary_and_stream_calls_and_nothing_without_one() -> None:
    with serve() as (address, seen):
        with dial(address, token="s3cret-token") as channel:
            assert channel.unary_unary(UNARY)(b"a", timeout=10) == b"echo:a"
            replies = channel.stream_stream(STREAM)(iter([b"x", b"y"]), timeout=10)
            assert list(replies) == [b"echo:x", b"echo:y"]
        with dial(address) as channel:
            assert channel.unary_unary(UNARY)(b"b", timeout=10) == b"echo:b"
    assert [call["metadata"].get("authorization") for call in seen.calls] == [
        "Bearer s3cret-token", "Bearer s3cret-token", None]


def test_messages_up_to_the_wire_limit_pass_and_larger_ones_are_refused() -> None:
    # gRPC's default receive limit is 4 MiB: dial raises both ends of the channel to the wire's
    big = b"x" * (MAX_MESSAGE_BYTES - 64)
    with serve() as (address, _), dial(address) as channel:
        assert len(channel.unary_unary(UNARY)(big, timeout=30)) == len(big) + 5
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(UNARY)(big + b"x" * 128, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- TLS -----------------------------------------------------------------------------------------


def test_mutual_tls_presents_the_certificate_of_the_files(bundle: CertBundle) -> None:
    agent = bundle.agent("node-a")
    with serve(server_credentials(bundle)) as (address, seen):
        tls = TlsFiles(ca=bundle.ca_cert, cert=agent.cert, key=agent.key)
        with dial(address, tls=tls, token="t") as channel:
            assert channel.unary_unary(UNARY)(b"m", timeout=10) == b"echo:m"
        # the CA alone: TLS without a client certificate, which this server refuses
        with (dial(address, tls=TlsFiles(ca=bundle.ca_cert)) as channel,
              pytest.raises(grpc.RpcError) as info):
            channel.unary_unary(UNARY)(b"n", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # plaintext to a TLS server
        with dial(address) as channel, pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(UNARY)(b"o", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [(call["cn"], call["metadata"].get("authorization")) for call in seen.calls] == [
        ("node-a", "Bearer t")]


def test_tls_files_are_read_at_each_dial(bundle: CertBundle, tmp_path: Path) -> None:
    agent = bundle.agent("node-a")
    key = tmp_path / "agent.key"
    tls = TlsFiles(ca=bundle.ca_cert, cert=agent.cert, key=key)
    with pytest.raises(CertError) as info:
        dial("127.0.0.1:1", tls=tls)
    assert str(info.value) == (f"--tls-key {key}: cannot read it (No such file or directory); "
                               f"run `driftwarden certs init DIR` to make certificates")
    key.write_bytes(agent.key.read_bytes())  # the file appears (a renewal): the next dial works
    with serve(server_credentials(bundle)) as (address, seen), dial(address, tls=tls) as channel:
        assert channel.unary_unary(UNARY)(b"p", timeout=10) == b"echo:p"
    assert [call["cn"] for call in seen.calls] == ["node-a"]


def test_tls_flag_sets(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    text = str(pem)
    assert TlsFiles.from_flags(ca=None) is None
    assert TlsFiles.from_flags(ca=text) == TlsFiles(ca=pem)
    assert TlsFiles.from_flags(ca=text, cert=text, key=text, pair_required=True) == TlsFiles(
        ca=pem, cert=pem, key=pem)
    cases = [
        ({"ca": text}, True, "--tls-ca given without --tls-cert, --tls-key: TLS needs all "
         "three (`driftwarden certs init DIR` makes them)"),
        ({"key": text}, False, "--tls-key given without --tls-ca, --tls-cert: a client "
         "certificate needs --tls-cert, --tls-key and --tls-ca (`driftwarden certs init DIR` "
         "makes them)"),
        ({"ca": str(tmp_path)}, False, f"--tls-ca {tmp_path}: cannot read it (Is a directory); "
         f"run `driftwarden certs init DIR` to make certificates"),
    ]
    for flags, pair_required, message in cases:
        with pytest.raises(UsageError) as info:
            TlsFiles.from_flags(**flags, pair_required=pair_required)
        assert str(info.value) == message
    (tmp_path / "token").write_text("not pem\n")
    with pytest.raises(UsageError) as info:
        TlsFiles.from_flags(ca=text, cert=text, key=str(tmp_path / "token"),
                            ca_flag="--tls-client-ca", pair_required=True)
    assert str(info.value) == (f"--tls-key {tmp_path / 'token'}: not a PEM file; run "
                               f"`driftwarden certs init DIR` to make certificates")
    with pytest.raises(UsageError, match=r"^--tls-cert and --tls-key go together"):
        TlsFiles(ca=pem, cert=pem)


# -- proxies -------------------------------------------------------------------------------------


def test_without_the_option_grpc_would_take_the_proxy(proxy: ProxyTrap) -> None:
    # the control: a plain gRPC channel follows the variables, so the trap does catch it
    with (serve() as (address, seen), grpc.insecure_channel(address) as channel,
          pytest.raises(grpc.RpcError)):
        channel.unary_unary(UNARY)(b"q", timeout=5)
    assert proxy.connections >= 1
    assert seen.calls == []


def test_dial_ignores_the_proxy_variables(proxy: ProxyTrap, bundle: CertBundle) -> None:
    agent = bundle.agent("node-a")
    with serve() as (address, seen), dial(address, token="t") as channel:
        assert channel.unary_unary(UNARY)(b"r", timeout=10) == b"echo:r"
    with serve(server_credentials(bundle)) as (address, tls_seen):
        tls = TlsFiles(ca=bundle.ca_cert, cert=agent.cert, key=agent.key)
        with dial(address, tls=tls) as channel:
            replies = channel.stream_stream(STREAM)(iter([b"s"]), timeout=10)
            assert list(replies) == [b"echo:s"]
    assert proxy.connections == 0
    assert (len(seen.calls), len(tls_seen.calls)) == (1, 1)
