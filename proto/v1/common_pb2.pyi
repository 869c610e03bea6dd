import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AlertKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_KIND_UNSPECIFIED: _ClassVar[AlertKind]
    ALERT_KIND_DRIFT: _ClassVar[AlertKind]
    ALERT_KIND_NOVEL: _ClassVar[AlertKind]
    ALERT_KIND_ANOMALY: _ClassVar[AlertKind]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_LOW: _ClassVar[Severity]
    SEVERITY_MEDIUM: _ClassVar[Severity]
    SEVERITY_HIGH: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_LEARN: _ClassVar[Mode]
    MODE_MONITOR: _ClassVar[Mode]
    MODE_PROTECT: _ClassVar[Mode]
ALERT_KIND_UNSPECIFIED: AlertKind
ALERT_KIND_DRIFT: AlertKind
ALERT_KIND_NOVEL: AlertKind
ALERT_KIND_ANOMALY: AlertKind
SEVERITY_UNSPECIFIED: Severity
SEVERITY_LOW: Severity
SEVERITY_MEDIUM: Severity
SEVERITY_HIGH: Severity
SEVERITY_CRITICAL: Severity
MODE_UNSPECIFIED: Mode
MODE_LEARN: Mode
MODE_MONITOR: Mode
MODE_PROTECT: Mode

class Image(_message.Message):
    __slots__ = ("id", "name", "digest")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    digest: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class Container(_message.Message):
    __slots__ = ("id", "name", "image", "pod", "namespace", "node", "labels", "pod_uid", "workload")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    image: Image
    pod: str
    namespace: str
    node: str
    labels: _containers.ScalarMap[str, str]
    pod_uid: str
    workload: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., pod: _Optional[str] = ..., namespace: _Optional[str] = ..., node: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., pod_uid: _Optional[str] = ..., workload: _Optional[str] = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ("pid", "ppid", "exe", "argv", "uid", "comm")
    PID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    pid: int
    ppid: int
    exe: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    uid: int
    comm: str
    def __init__(self, pid: _Optional[int] = ..., ppid: _Optional[int] = ..., exe: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., uid: _Optional[int] = ..., comm: _Optional[str] = ...) -> None: ...

class Detail(_message.Message):
    __slots__ = ("key", "value_json")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    key: str
    value_json: str
    def __init__(self, key: _Optional[str] = ..., value_json: _Optional[str] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "text", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: str
    text: str
    details: _containers.RepeatedCompositeFieldContainer[Detail]
    def __init__(self, code: _Optional[str] = ..., text: _Optional[str] = ..., details: _Optional[_Iterable[_Union[Detail, _Mapping]]] = ...) -> None: ...

class EventHeader(_message.Message):
    __slots__ = ("time", "ts_ns", "cgroup_id", "pid", "tid", "ppid", "uid", "gid", "comm", "suppressed_before", "runtime_setup")
    TIME_FIELD_NUMBER: _ClassVar[int]
    TS_NS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_SETUP_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    ts_ns: int
    cgroup_id: int
    pid: int
    tid: int
    ppid: int
    uid: int
    gid: int
    comm: str
    suppressed_before: int
    runtime_setup: bool
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ts_ns: _Optional[int] = ..., cgroup_id: _Optional[int] = ..., pid: _Optional[int] = ..., tid: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., comm: _Optional[str] = ..., suppressed_before: _Optional[int] = ..., runtime_setup: _Optional[bool] = ...) -> None: ...

class ExecEvent(_message.Message):
    __slots__ = ("header", "filename", "path", "path_resolved", "exe", "argv", "argv_truncated", "result", "error")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ARGV_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    header: EventHeader
    filename: str
    path: str
    path_resolved: bool
    exe: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    argv_truncated: bool
    result: int
    error: str
    def __init__(self, header: _Optional[_Union[EventHeader, _Mapping]] = ..., filename: _Optional[str] = ..., path: _Optional[str] = ..., path_resolved: _Optional[bool] = ..., exe: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., argv_truncated: _Optional[bool] = ..., result: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ConnectEvent(_message.Message):
    __slots__ = ("header", "family", "protocol", "address", "port", "result", "errno", "fd")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    header: EventHeader
    family: str
    protocol: str
    address: str
    port: int
    result: str
    errno: str
    fd: int
    def __init__(self, header: _Optional[_Union[EventHeader, _Mapping]] = ..., family: _Optional[str] = ..., protocol: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., result: _Optional[str] = ..., errno: _Optional[str] = ..., fd: _Optional[int] = ...) -> None: ...

class FileWriteEvent(_message.Message):
    __slots__ = ("header", "op", "path", "path_as_given", "path_resolved", "dirfd", "result", "error", "truncated", "path2", "path2_as_given", "path2_resolved", "dirfd2", "flags", "mode")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_AS_GIVEN_FIELD_NUMBER: _ClassVar[int]
    PATH_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    DIRFD_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    PATH2_FIELD_NUMBER: _ClassVar[int]
    PATH2_AS_GIVEN_FIELD_NUMBER: _ClassVar[int]
    PATH2_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    DIRFD2_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    header: EventHeader
    op: str
    path: str
    path_as_given: str
    path_resolved: bool
    dirfd: int
    result: int
    error: str
    truncated: bool
    path2: str
    path2_as_given: str
    path2_resolved: bool
    dirfd2: int
    flags: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    def __init__(self, header: _Optional[_Union[EventHeader, _Mapping]] = ..., op: _Optional[str] = ..., path: _Optional[str] = ..., path_as_given: _Optional[str] = ..., path_resolved: _Optional[bool] = ..., dirfd: _Optional[int] = ..., result: _Optional[int] = ..., error: _Optional[str] = ..., truncated: _Optional[bool] = ..., path2: _Optional[str] = ..., path2_as_given: _Optional[str] = ..., path2_resolved: _Optional[bool] = ..., dirfd2: _Optional[int] = ..., flags: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("id", "time", "kind", "severity", "score", "reasons", "container", "process", "exec", "connect", "file_write", "baseline_version", "baseline_mode", "count", "first_seen", "last_seen", "events_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    EXEC_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    FILE_WRITE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_MODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    EVENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    time: _timestamp_pb2.Timestamp
    kind: AlertKind
    severity: Severity
    score: float
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    container: Container
    process: Process
    exec: ExecEvent
    connect: ConnectEvent
    file_write: FileWriteEvent
    baseline_version: int
    baseline_mode: Mode
    count: int
    first_seen: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    events_json: str
    def __init__(self, id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[AlertKind, str]] = ..., severity: _Optional[_Union[Severity, str]] = ..., score: _Optional[float] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., container: _Optional[_Union[Container, _Mapping]] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., exec: _Optional[_Union[ExecEvent, _Mapping]] = ..., connect: _Optional[_Union[ConnectEvent, _Mapping]] = ..., file_write: _Optional[_Union[FileWriteEvent, _Mapping]] = ..., baseline_version: _Optional[int] = ..., baseline_mode: _Optional[_Union[Mode, str]] = ..., count: _Optional[int] = ..., first_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., events_json: _Optional[str] = ...) -> None: ...

class KindCounters(_message.Message):
    __slots__ = ("kind", "emitted", "suppressed", "dropped", "over_budget", "known")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMITTED_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    OVER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    kind: str
    emitted: int
    suppressed: int
    dropped: int
    over_budget: int
    known: int
    def __init__(self, kind: _Optional[str] = ..., emitted: _Optional[int] = ..., suppressed: _Optional[int] = ..., dropped: _Optional[int] = ..., over_budget: _Optional[int] = ..., known: _Optional[int] = ...) -> None: ...
