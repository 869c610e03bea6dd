"""driftwarden.v1: the generated code matches the .proto files, and the API keeps its shape."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto" / "v1"
PROTO_NAMES = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


def generated_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for pattern in GENERATED for p in directory.glob(pattern)}


def test_committed_generated_code_is_what_the_protos_generate(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr
    fresh = generated_files(tmp_path)
    committed = generated_files(PROTO_DIR)
    assert len(fresh) == 3 * len(PROTO_NAMES)
    stale = sorted(name for name in fresh.keys() | committed.keys()
                   if fresh.get(name) != committed.get(name))
    assert not stale, f"generated code out of date: {stale}; run scripts/gen-proto.sh"


def file_descriptors():
    return [importlib.import_module(f"driftwarden.proto.v1.{name}_pb2").DESCRIPTOR
            for name in PROTO_NAMES]


def all_messages(descriptors):
    def walk(message):
        yield message
        for nested in message.nested_types:
            yield from walk(nested)
    for fd in descriptors:
        for message in fd.message_types_by_name.values():
            yield from walk(message)


def all_enums(descriptors):
    for fd in descriptors:
        yield from fd.enum_types_by_name.values()
    for message in all_messages(descriptors):
        yield from message.enum_types


def test_every_file_is_in_package_driftwarden_v1_at_its_path():
    assert PROTO_NAMES == ["actions", "agent", "alerts", "baselines", "common"]
    for fd, name in zip(file_descriptors(), PROTO_NAMES, strict=True):
        assert fd.package == "driftwarden.v1"
        assert fd.name == f"driftwarden/proto/v1/{name}.proto"  # its import path


def test_every_enum_zero_value_is_unspecified():
    enums = list(all_enums(file_descriptors()))
    assert {e.name for e in enums} == {"AlertKind", "Severity", "Mode", "ActionType",
                                       "ActionStatus"}
    for enum in enums:
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_")
        assert enum.values_by_number[0].name == f"{prefix}_UNSPECIFIED", enum.full_name
        assert all(v.name.startswith(f"{prefix}_") for v in enum.values), enum.full_name


def test_times_are_timestamps_and_named_as_times():
    fields = [f for m in all_messages(file_descriptors()) for f in m.fields]
    named = {f.full_name for f in fields
             if f.name in ("time", "since", "until", "first_seen", "last_seen", "last_heartbeat")
             or f.name.endswith("_at")}
    typed = {f.full_name for f in fields if f.message_type is Timestamp.DESCRIPTOR}
    assert "driftwarden.v1.Alert.time" in named
    assert named == typed


# service -> method -> (input, output, client streaming, server streaming)
SERVICES = {
    "AgentChannel": {"Connect": ("AgentMessage", "CollectorCommand", True, True)},
    "Alerts": {"Subscribe": ("SubscribeRequest", "AlertEvent", False, True),
               "List": ("ListAlertsRequest", "ListAlertsResponse", False, False)},
    "Actions": {"Request": ("ActionRequest", "ActionResponse", False, False),
                "List": ("ListActionsRequest", "ListActionsResponse", False, False)},
    "Agents": {"List": ("ListAgentsRequest", "ListAgentsResponse", False, False)},
    "Baselines": {
        "List": ("ListBaselinesRequest", "ListBaselinesResponse", False, False),
        "Get": ("GetBaselineRequest", "GetBaselineResponse", False, False),
        "SetMode": ("SetBaselineModeRequest", "SetBaselineModeResponse", False, False),
        "Diff": ("DiffBaselinesRequest", "DiffBaselinesResponse", False, False),
        "Accept": ("AcceptAlertRequest", "AcceptAlertResponse", False, False),
        "Reset": ("ResetBaselineRequest", "ResetBaselineResponse", False, False),
        "Export": ("ExportBaselineRequest", "ExportBaselineResponse", False, False),
        "Push": ("PushBaselineRequest", "PushBaselineResponse", False, False),
    },
}


def test_services_and_methods():
    services = {s.name: s for fd in file_descriptors() for s in fd.services_by_name.values()}
    assert set(services) == set(SERVICES)
    for name, methods in SERVICES.items():
        service = services[name]
        assert service.full_name == f"driftwarden.v1.{name}"
        got = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming,
                        m.server_streaming) for m in service.methods}
        assert got == methods, name


def test_unary_methods_have_their_own_request_and_response():
    seen = set()
    for fd in file_descriptors():
        for service in fd.services_by_name.values():
            for m in service.methods:
                if m.client_streaming or m.server_streaming:
                    continue
                assert m.input_type.name.endswith("Request"), m.full_name
                assert m.output_type.name.endswith("Response"), m.full_name
                assert not {m.input_type.name, m.output_type.name} & seen, m.full_name
                seen |= {m.input_type.name, m.output_type.name}


@pytest.mark.parametrize("module, names", [
    ("agent_pb2_grpc", ["AgentChannelStub", "AgentChannelServicer",
                        "add_AgentChannelServicer_to_server", "AgentsStub", "AgentsServicer",
                        "add_AgentsServicer_to_server"]),
    ("alerts_pb2_grpc", ["AlertsStub", "AlertsServicer", "add_AlertsServicer_to_server"]),
    ("actions_pb2_grpc", ["ActionsStub", "ActionsServicer", "add_ActionsServicer_to_server"]),
    ("baselines_pb2_grpc", ["BaselinesStub", "BaselinesServicer",
                            "add_BaselinesServicer_to_server"]),
])
def test_grpc_modules_import_from_the_installed_package(module, names):
    mod = importlib.import_module(f"driftwarden.proto.v1.{module}")
    assert Path(mod.__file__).resolve().parent == PROTO_DIR
    assert all(hasattr(mod, n) for n in names)
