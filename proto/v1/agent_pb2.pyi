import datetime

from driftwarden.proto.v1 import actions_pb2 as _actions_pb2
from driftwarden.proto.v1 import baselines_pb2 as _baselines_pb2
from driftwarden.proto.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentMessage(_message.Message):
    __slots__ = ("seq", "hello", "alert_batch", "heartbeat", "action_result", "baseline_increment", "baseline_request")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ALERT_BATCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ACTION_RESULT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_INCREMENT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hello: Hello
    alert_batch: AlertBatch
    heartbeat: Heartbeat
    action_result: ActionResult
    baseline_increment: _baselines_pb2.BaselineIncrement
    baseline_request: _baselines_pb2.BaselineRequest
    def __init__(self, seq: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., alert_batch: _Optional[_Union[AlertBatch, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., action_result: _Optional[_Union[ActionResult, _Mapping]] = ..., baseline_increment: _Optional[_Union[_baselines_pb2.BaselineIncrement, _Mapping]] = ..., baseline_request: _Optional[_Union[_baselines_pb2.BaselineRequest, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node", "agent_version", "mode", "hostname", "started_at", "baselines")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_version: str
    mode: _common_pb2.Mode
    hostname: str
    started_at: _timestamp_pb2.Timestamp
    baselines: _containers.RepeatedCompositeFieldContainer[_baselines_pb2.BaselineVersion]
    def __init__(self, node: _Optional[str] = ..., agent_version: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ..., hostname: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., baselines: _Optional[_Iterable[_Union[_baselines_pb2.BaselineVersion, _Mapping]]] = ...) -> None: ...

class AlertBatch(_message.Message):
    __slots__ = ("alerts", "spool_seqs")
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_SEQS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Alert]
    spool_seqs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, alerts: _Optional[_Iterable[_Union[_common_pb2.Alert, _Mapping]]] = ..., spool_seqs: _Optional[_Iterable[int]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at", "counters", "containers_watched", "spool_depth", "containers")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_WATCHED_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    sent_at: _timestamp_pb2.Timestamp
    counters: _containers.RepeatedCompositeFieldContainer[_common_pb2.KindCounters]
    containers_watched: int
    spool_depth: int
    containers: _containers.RepeatedCompositeFieldContainer[_common_pb2.Container]
    def __init__(self, sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., counters: _Optional[_Iterable[_Union[_common_pb2.KindCounters, _Mapping]]] = ..., containers_watched: _Optional[int] = ..., spool_depth: _Optional[int] = ..., containers: _Optional[_Iterable[_Union[_common_pb2.Container, _Mapping]]] = ...) -> None: ...

class ActionResult(_message.Message):
    __slots__ = ("action_id", "status", "message", "finished_at")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    status: _actions_pb2.ActionStatus
    message: str
    finished_at: _timestamp_pb2.Timestamp
    def __init__(self, action_id: _Optional[str] = ..., status: _Optional[_Union[_actions_pb2.ActionStatus, str]] = ..., message: _Optional[str] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CollectorCommand(_message.Message):
    __slots__ = ("ack", "action", "notice", "baseline")
    ACK_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    action: ActionCommand
    notice: Notice
    baseline: _baselines_pb2.BaselineUpdate
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., action: _Optional[_Union[ActionCommand, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., baseline: _Optional[_Union[_baselines_pb2.BaselineUpdate, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("alert_ids", "spool_seqs")
    ALERT_IDS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_SEQS_FIELD_NUMBER: _ClassVar[int]
    alert_ids: _containers.RepeatedScalarFieldContainer[str]
    spool_seqs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, alert_ids: _Optional[_Iterable[str]] = ..., spool_seqs: _Optional[_Iterable[int]] = ...) -> None: ...

class ActionCommand(_message.Message):
    __slots__ = ("action_id", "container_id", "type", "reason", "requested_by", "with_pause")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    WITH_PAUSE_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    container_id: str
    type: _actions_pb2.ActionType
    reason: str
    requested_by: str
    with_pause: bool
    def __init__(self, action_id: _Optional[str] = ..., container_id: _Optional[str] = ..., type: _Optional[_Union[_actions_pb2.ActionType, str]] = ..., reason: _Optional[str] = ..., requested_by: _Optional[str] = ..., with_pause: _Optional[bool] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Agent(_message.Message):
    __slots__ = ("node", "agent_version", "mode", "connected", "connected_at", "last_heartbeat", "counters", "containers_watched", "spool_depth", "peer", "hostname", "baselines")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_WATCHED_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_version: str
    mode: _common_pb2.Mode
    connected: bool
    connected_at: _timestamp_pb2.Timestamp
    last_heartbeat: _timestamp_pb2.Timestamp
    counters: _containers.RepeatedCompositeFieldContainer[_common_pb2.KindCounters]
    containers_watched: int
    spool_depth: int
    peer: str
    hostname: str
    baselines: _containers.RepeatedCompositeFieldContainer[_baselines_pb2.BaselineVersion]
    def __init__(self, node: _Optional[str] = ..., agent_version: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ..., connected: _Optional[bool] = ..., connected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., counters: _Optional[_Iterable[_Union[_common_pb2.KindCounters, _Mapping]]] = ..., containers_watched: _Optional[int] = ..., spool_depth: _Optional[int] = ..., peer: _Optional[str] = ..., hostname: _Optional[str] = ..., baselines: _Optional[_Iterable[_Union[_baselines_pb2.BaselineVersion, _Mapping]]] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...
