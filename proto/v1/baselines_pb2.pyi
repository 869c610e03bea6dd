import datetime

from driftwarden.proto.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BaselineItem(_message.Message):
    __slots__ = ("kind", "key")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    key: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., key: _Optional[_Iterable[str]] = ...) -> None: ...

class ContainerRef(_message.Message):
    __slots__ = ("container_id", "node", "name")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    node: str
    name: str
    def __init__(self, container_id: _Optional[str] = ..., node: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ItemEvidence(_message.Message):
    __slots__ = ("item", "containers")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    item: BaselineItem
    containers: _containers.RepeatedCompositeFieldContainer[ContainerRef]
    def __init__(self, item: _Optional[_Union[BaselineItem, _Mapping]] = ..., containers: _Optional[_Iterable[_Union[ContainerRef, _Mapping]]] = ...) -> None: ...

class FeatureWindow(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ModeChange(_message.Message):
    __slots__ = ("changed_at", "to", "reason", "by")
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    changed_at: _timestamp_pb2.Timestamp
    to: _common_pb2.Mode
    reason: str
    by: str
    def __init__(self, changed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., to: _Optional[_Union[_common_pb2.Mode, str]] = ..., reason: _Optional[str] = ..., by: _Optional[str] = ..., **kwargs) -> None: ...

class BaselineSummary(_message.Message):
    __slots__ = ("image_key", "image_name", "mode", "version", "items", "unconfirmed", "windows", "containers", "nodes", "updated_at", "learning_started_at", "stable", "carried_from")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNCONFIRMED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEARNING_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CARRIED_FROM_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    image_name: str
    mode: _common_pb2.Mode
    version: int
    items: int
    unconfirmed: int
    windows: int
    containers: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    updated_at: _timestamp_pb2.Timestamp
    learning_started_at: _timestamp_pb2.Timestamp
    stable: bool
    carried_from: str
    def __init__(self, image_key: _Optional[str] = ..., image_name: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ..., version: _Optional[int] = ..., items: _Optional[int] = ..., unconfirmed: _Optional[int] = ..., windows: _Optional[int] = ..., containers: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., learning_started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stable: _Optional[bool] = ..., carried_from: _Optional[str] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("summary", "items", "unconfirmed", "windows", "history", "layers", "carried_layers")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNCONFIRMED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CARRIED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    summary: BaselineSummary
    items: _containers.RepeatedCompositeFieldContainer[BaselineItem]
    unconfirmed: _containers.RepeatedCompositeFieldContainer[ItemEvidence]
    windows: _containers.RepeatedCompositeFieldContainer[FeatureWindow]
    history: _containers.RepeatedCompositeFieldContainer[ModeChange]
    layers: _containers.RepeatedScalarFieldContainer[str]
    carried_layers: int
    def __init__(self, summary: _Optional[_Union[BaselineSummary, _Mapping]] = ..., items: _Optional[_Iterable[_Union[BaselineItem, _Mapping]]] = ..., unconfirmed: _Optional[_Iterable[_Union[ItemEvidence, _Mapping]]] = ..., windows: _Optional[_Iterable[_Union[FeatureWindow, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[ModeChange, _Mapping]]] = ..., layers: _Optional[_Iterable[str]] = ..., carried_layers: _Optional[int] = ...) -> None: ...

class BaselineIncrement(_message.Message):
    __slots__ = ("image_key", "image_name", "based_on_version", "items", "windows", "containers", "layers")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    BASED_ON_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    image_name: str
    based_on_version: int
    items: _containers.RepeatedCompositeFieldContainer[ItemEvidence]
    windows: _containers.RepeatedCompositeFieldContainer[FeatureWindow]
    containers: _containers.RepeatedCompositeFieldContainer[ContainerRef]
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image_key: _Optional[str] = ..., image_name: _Optional[str] = ..., based_on_version: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ItemEvidence, _Mapping]]] = ..., windows: _Optional[_Iterable[_Union[FeatureWindow, _Mapping]]] = ..., containers: _Optional[_Iterable[_Union[ContainerRef, _Mapping]]] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class BaselineRequest(_message.Message):
    __slots__ = ("image_key", "image_name", "layers")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    image_name: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image_key: _Optional[str] = ..., image_name: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class BaselineUpdate(_message.Message):
    __slots__ = ("image_key", "found", "baseline")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    found: bool
    baseline: Baseline
    def __init__(self, image_key: _Optional[str] = ..., found: _Optional[bool] = ..., baseline: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...

class BaselineVersion(_message.Message):
    __slots__ = ("image_key", "version", "mode")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    version: int
    mode: _common_pb2.Mode
    def __init__(self, image_key: _Optional[str] = ..., version: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ...) -> None: ...

class ListBaselinesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBaselinesResponse(_message.Message):
    __slots__ = ("baselines",)
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    baselines: _containers.RepeatedCompositeFieldContainer[BaselineSummary]
    def __init__(self, baselines: _Optional[_Iterable[_Union[BaselineSummary, _Mapping]]] = ...) -> None: ...

class GetBaselineRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class GetBaselineResponse(_message.Message):
    __slots__ = ("baseline",)
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    baseline: Baseline
    def __init__(self, baseline: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...

class SetBaselineModeRequest(_message.Message):
    __slots__ = ("image", "mode", "reason")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    image: str
    mode: _common_pb2.Mode
    reason: str
    def __init__(self, image: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class SetBaselineModeResponse(_message.Message):
    __slots__ = ("baseline",)
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    baseline: BaselineSummary
    def __init__(self, baseline: _Optional[_Union[BaselineSummary, _Mapping]] = ...) -> None: ...

class DiffBaselinesRequest(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: str
    b: str
    def __init__(self, a: _Optional[str] = ..., b: _Optional[str] = ...) -> None: ...

class DiffBaselinesResponse(_message.Message):
    __slots__ = ("a", "b", "only_in_a", "only_in_b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    ONLY_IN_A_FIELD_NUMBER: _ClassVar[int]
    ONLY_IN_B_FIELD_NUMBER: _ClassVar[int]
    a: BaselineSummary
    b: BaselineSummary
    only_in_a: _containers.RepeatedCompositeFieldContainer[BaselineItem]
    only_in_b: _containers.RepeatedCompositeFieldContainer[BaselineItem]
    def __init__(self, a: _Optional[_Union[BaselineSummary, _Mapping]] = ..., b: _Optional[_Union[BaselineSummary, _Mapping]] = ..., only_in_a: _Optional[_Iterable[_Union[BaselineItem, _Mapping]]] = ..., only_in_b: _Optional[_Iterable[_Union[BaselineItem, _Mapping]]] = ...) -> None: ...

class AcceptAlertRequest(_message.Message):
    __slots__ = ("alert_id", "reason")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    reason: str
    def __init__(self, alert_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AcceptAlertResponse(_message.Message):
    __slots__ = ("baseline", "added")
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    baseline: BaselineSummary
    added: _containers.RepeatedCompositeFieldContainer[BaselineItem]
    def __init__(self, baseline: _Optional[_Union[BaselineSummary, _Mapping]] = ..., added: _Optional[_Iterable[_Union[BaselineItem, _Mapping]]] = ...) -> None: ...

class ResetBaselineRequest(_message.Message):
    __slots__ = ("image", "reason")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    image: str
    reason: str
    def __init__(self, image: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResetBaselineResponse(_message.Message):
    __slots__ = ("baseline",)
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    baseline: BaselineSummary
    def __init__(self, baseline: _Optional[_Union[BaselineSummary, _Mapping]] = ...) -> None: ...

class ExportBaselineRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class ExportBaselineResponse(_message.Message):
    __slots__ = ("file",)
    FILE_FIELD_NUMBER: _ClassVar[int]
    file: bytes
    def __init__(self, file: _Optional[bytes] = ...) -> None: ...

class PushBaselineRequest(_message.Message):
    __slots__ = ("file", "image_key", "mode", "reason")
    FILE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    file: bytes
    image_key: str
    mode: _common_pb2.Mode
    reason: str
    def __init__(self, file: _Optional[bytes] = ..., image_key: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.Mode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class PushBaselineResponse(_message.Message):
    __slots__ = ("baseline",)
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    baseline: BaselineSummary
    def __init__(self, baseline: _Optional[_Union[BaselineSummary, _Mapping]] = ...) -> None: ...
