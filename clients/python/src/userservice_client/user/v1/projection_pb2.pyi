import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_STATE_UNSPECIFIED: _ClassVar[GroupState]
    GROUP_STATE_STABLE: _ClassVar[GroupState]
    GROUP_STATE_REBALANCING: _ClassVar[GroupState]
    GROUP_STATE_EMPTY: _ClassVar[GroupState]
    GROUP_STATE_DEAD: _ClassVar[GroupState]

class PartitionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARTITION_STATUS_UNSPECIFIED: _ClassVar[PartitionStatus]
    PARTITION_STATUS_OK: _ClassVar[PartitionStatus]
    PARTITION_STATUS_LAGGING: _ClassVar[PartitionStatus]
    PARTITION_STATUS_STALLED: _ClassVar[PartitionStatus]
    PARTITION_STATUS_STOPPED: _ClassVar[PartitionStatus]
    PARTITION_STATUS_REBUILDING: _ClassVar[PartitionStatus]
GROUP_STATE_UNSPECIFIED: GroupState
GROUP_STATE_STABLE: GroupState
GROUP_STATE_REBALANCING: GroupState
GROUP_STATE_EMPTY: GroupState
GROUP_STATE_DEAD: GroupState
PARTITION_STATUS_UNSPECIFIED: PartitionStatus
PARTITION_STATUS_OK: PartitionStatus
PARTITION_STATUS_LAGGING: PartitionStatus
PARTITION_STATUS_STALLED: PartitionStatus
PARTITION_STATUS_STOPPED: PartitionStatus
PARTITION_STATUS_REBUILDING: PartitionStatus

class GetProgressRequest(_message.Message):
    __slots__ = ("group", "topic", "partitions")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    group: str
    topic: str
    partitions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group: _Optional[str] = ..., topic: _Optional[str] = ..., partitions: _Optional[_Iterable[int]] = ...) -> None: ...

class GetProgressResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: ProgressSnapshot
    def __init__(self, snapshot: _Optional[_Union[ProgressSnapshot, _Mapping]] = ...) -> None: ...

class WatchProgressRequest(_message.Message):
    __slots__ = ("group", "topic", "partitions", "interval")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    group: str
    topic: str
    partitions: _containers.RepeatedScalarFieldContainer[int]
    interval: _duration_pb2.Duration
    def __init__(self, group: _Optional[str] = ..., topic: _Optional[str] = ..., partitions: _Optional[_Iterable[int]] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WatchProgressResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: ProgressSnapshot
    def __init__(self, snapshot: _Optional[_Union[ProgressSnapshot, _Mapping]] = ...) -> None: ...

class ProgressSnapshot(_message.Message):
    __slots__ = ("time", "group", "topic", "state", "members", "partitions", "totals")
    TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    group: str
    topic: str
    state: GroupState
    members: _containers.RepeatedCompositeFieldContainer[GroupMember]
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionProgress]
    totals: GroupTotals
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group: _Optional[str] = ..., topic: _Optional[str] = ..., state: _Optional[_Union[GroupState, str]] = ..., members: _Optional[_Iterable[_Union[GroupMember, _Mapping]]] = ..., partitions: _Optional[_Iterable[_Union[PartitionProgress, _Mapping]]] = ..., totals: _Optional[_Union[GroupTotals, _Mapping]] = ...) -> None: ...

class GroupMember(_message.Message):
    __slots__ = ("member_id", "client_id", "host", "partitions")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    client_id: str
    host: str
    partitions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, member_id: _Optional[str] = ..., client_id: _Optional[str] = ..., host: _Optional[str] = ..., partitions: _Optional[_Iterable[int]] = ...) -> None: ...

class PartitionOwner(_message.Message):
    __slots__ = ("member_id", "client_id", "host")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    client_id: str
    host: str
    def __init__(self, member_id: _Optional[str] = ..., client_id: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class PartitionProgress(_message.Message):
    __slots__ = ("partition", "committed_offset", "applied_offset", "log_start_offset", "log_end_offset", "lag", "lag_seconds", "consume_rate", "owner", "status", "last_commit_time", "read_model_offset", "rebuild_target_offset", "unused")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    APPLIED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LOG_START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LOG_END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONSUME_RATE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    READ_MODEL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REBUILD_TARGET_OFFSET_FIELD_NUMBER: _ClassVar[int]
    UNUSED_FIELD_NUMBER: _ClassVar[int]
    partition: int
    committed_offset: int
    applied_offset: int
    log_start_offset: int
    log_end_offset: int
    lag: int
    lag_seconds: float
    consume_rate: float
    owner: PartitionOwner
    status: PartitionStatus
    last_commit_time: _timestamp_pb2.Timestamp
    read_model_offset: int
    rebuild_target_offset: int
    unused: bool
    def __init__(self, partition: _Optional[int] = ..., committed_offset: _Optional[int] = ..., applied_offset: _Optional[int] = ..., log_start_offset: _Optional[int] = ..., log_end_offset: _Optional[int] = ..., lag: _Optional[int] = ..., lag_seconds: _Optional[float] = ..., consume_rate: _Optional[float] = ..., owner: _Optional[_Union[PartitionOwner, _Mapping]] = ..., status: _Optional[_Union[PartitionStatus, str]] = ..., last_commit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., read_model_offset: _Optional[int] = ..., rebuild_target_offset: _Optional[int] = ..., unused: _Optional[bool] = ...) -> None: ...

class GroupTotals(_message.Message):
    __slots__ = ("total_lag", "max_lag", "max_lag_seconds", "total_lag_seconds")
    TOTAL_LAG_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    total_lag: int
    max_lag: int
    max_lag_seconds: float
    total_lag_seconds: float
    def __init__(self, total_lag: _Optional[int] = ..., max_lag: _Optional[int] = ..., max_lag_seconds: _Optional[float] = ..., total_lag_seconds: _Optional[float] = ...) -> None: ...
