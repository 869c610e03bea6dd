import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_TYPE_UNSPECIFIED: _ClassVar[ActionType]
    ACTION_TYPE_PAUSE: _ClassVar[ActionType]
    ACTION_TYPE_RESUME: _ClassVar[ActionType]
    ACTION_TYPE_KILL: _ClassVar[ActionType]
    ACTION_TYPE_QUARANTINE: _ClassVar[ActionType]
    ACTION_TYPE_RELEASE: _ClassVar[ActionType]

class ActionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_STATUS_UNSPECIFIED: _ClassVar[ActionStatus]
    ACTION_STATUS_DONE: _ClassVar[ActionStatus]
    ACTION_STATUS_ALREADY: _ClassVar[ActionStatus]
    ACTION_STATUS_CONTAINER_GONE: _ClassVar[ActionStatus]
    ACTION_STATUS_FAILED: _ClassVar[ActionStatus]
    ACTION_STATUS_REFUSED: _ClassVar[ActionStatus]
    ACTION_STATUS_PENDING: _ClassVar[ActionStatus]
    ACTION_STATUS_SKIPPED: _ClassVar[ActionStatus]
ACTION_TYPE_UNSPECIFIED: ActionType
ACTION_TYPE_PAUSE: ActionType
ACTION_TYPE_RESUME: ActionType
ACTION_TYPE_KILL: ActionType
ACTION_TYPE_QUARANTINE: ActionType
ACTION_TYPE_RELEASE: ActionType
ACTION_STATUS_UNSPECIFIED: ActionStatus
ACTION_STATUS_DONE: ActionStatus
ACTION_STATUS_ALREADY: ActionStatus
ACTION_STATUS_CONTAINER_GONE: ActionStatus
ACTION_STATUS_FAILED: ActionStatus
ACTION_STATUS_REFUSED: ActionStatus
ACTION_STATUS_PENDING: ActionStatus
ACTION_STATUS_SKIPPED: ActionStatus

class ActionRequest(_message.Message):
    __slots__ = ("container", "type", "reason", "with_pause", "requested_by", "node")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WITH_PAUSE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    container: str
    type: ActionType
    reason: str
    with_pause: bool
    requested_by: str
    node: str
    def __init__(self, container: _Optional[str] = ..., type: _Optional[_Union[ActionType, str]] = ..., reason: _Optional[str] = ..., with_pause: _Optional[bool] = ..., requested_by: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class ActionResponse(_message.Message):
    __slots__ = ("action_id", "status", "message", "container_id", "node")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    status: ActionStatus
    message: str
    container_id: str
    node: str
    def __init__(self, action_id: _Optional[str] = ..., status: _Optional[_Union[ActionStatus, str]] = ..., message: _Optional[str] = ..., container_id: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("action_id", "type", "status", "message", "container_id", "container_name", "node", "reason", "requested_by", "with_pause", "alert_id", "requested_at", "finished_at")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    WITH_PAUSE_FIELD_NUMBER: _ClassVar[int]
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    type: ActionType
    status: ActionStatus
    message: str
    container_id: str
    container_name: str
    node: str
    reason: str
    requested_by: str
    with_pause: bool
    alert_id: str
    requested_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    def __init__(self, action_id: _Optional[str] = ..., type: _Optional[_Union[ActionType, str]] = ..., status: _Optional[_Union[ActionStatus, str]] = ..., message: _Optional[str] = ..., container_id: _Optional[str] = ..., container_name: _Optional[str] = ..., node: _Optional[str] = ..., reason: _Optional[str] = ..., requested_by: _Optional[str] = ..., with_pause: _Optional[bool] = ..., alert_id: _Optional[str] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListActionsRequest(_message.Message):
    __slots__ = ("nodes", "containers", "types", "since", "until", "page_size", "page_token")
    NODES_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    containers: _containers.RepeatedScalarFieldContainer[str]
    types: _containers.RepeatedScalarFieldContainer[ActionType]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, nodes: _Optional[_Iterable[str]] = ..., containers: _Optional[_Iterable[str]] = ..., types: _Optional[_Iterable[_Union[ActionType, str]]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListActionsResponse(_message.Message):
    __slots__ = ("actions", "next_page_token")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    next_page_token: str
    def __init__(self, actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
