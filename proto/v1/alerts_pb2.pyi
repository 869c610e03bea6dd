import datetime

from driftwarden.proto.v1 import actions_pb2 as _actions_pb2
from driftwarden.proto.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AlertFilter(_message.Message):
    __slots__ = ("kinds", "min_severity", "nodes", "namespaces", "images", "containers", "exclude_images", "exclude_namespaces", "exclude_containers")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    MIN_SEVERITY_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[_common_pb2.AlertKind]
    min_severity: _common_pb2.Severity
    nodes: _containers.RepeatedScalarFieldContainer[str]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedScalarFieldContainer[str]
    containers: _containers.RepeatedScalarFieldContainer[str]
    exclude_images: _containers.RepeatedScalarFieldContainer[str]
    exclude_namespaces: _containers.RepeatedScalarFieldContainer[str]
    exclude_containers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kinds: _Optional[_Iterable[_Union[_common_pb2.AlertKind, str]]] = ..., min_severity: _Optional[_Union[_common_pb2.Severity, str]] = ..., nodes: _Optional[_Iterable[str]] = ..., namespaces: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[str]] = ..., containers: _Optional[_Iterable[str]] = ..., exclude_images: _Optional[_Iterable[str]] = ..., exclude_namespaces: _Optional[_Iterable[str]] = ..., exclude_containers: _Optional[_Iterable[str]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("filter", "include_notices", "include_actions", "resume_after", "max_batch")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_NOTICES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    filter: AlertFilter
    include_notices: bool
    include_actions: bool
    resume_after: str
    max_batch: int
    def __init__(self, filter: _Optional[_Union[AlertFilter, _Mapping]] = ..., include_notices: _Optional[bool] = ..., include_actions: _Optional[bool] = ..., resume_after: _Optional[str] = ..., max_batch: _Optional[int] = ...) -> None: ...

class AlertGroup(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[_common_pb2.Alert, _Mapping]]] = ...) -> None: ...

class StreamNotice(_message.Message):
    __slots__ = ("dropped", "text", "time")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    text: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, dropped: _Optional[int] = ..., text: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("alert", "notice", "action", "batch", "resume_token")
    ALERT_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    alert: _common_pb2.Alert
    notice: StreamNotice
    action: _actions_pb2.Action
    batch: AlertGroup
    resume_token: str
    def __init__(self, alert: _Optional[_Union[_common_pb2.Alert, _Mapping]] = ..., notice: _Optional[_Union[StreamNotice, _Mapping]] = ..., action: _Optional[_Union[_actions_pb2.Action, _Mapping]] = ..., batch: _Optional[_Union[AlertGroup, _Mapping]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("filter", "since", "until", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: AlertFilter
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[AlertFilter, _Mapping]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts", "next_page_token")
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Alert]
    next_page_token: str
    def __init__(self, alerts: _Optional[_Iterable[_Union[_common_pb2.Alert, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
