from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    INFO: _ClassVar[Severity]
    WARNING: _ClassVar[Severity]
    CRITICAL: _ClassVar[Severity]
SEVERITY_UNSPECIFIED: Severity
INFO: Severity
WARNING: Severity
CRITICAL: Severity

class SubscribeRequest(_message.Message):
    __slots__ = ("client_id", "include_jpeg", "jpeg_quality", "jpeg_max_side", "include_anatomy", "reports_progress")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_JPEG_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    JPEG_MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ANATOMY_FIELD_NUMBER: _ClassVar[int]
    REPORTS_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    include_jpeg: bool
    jpeg_quality: int
    jpeg_max_side: int
    include_anatomy: bool
    reports_progress: bool
    def __init__(self, client_id: _Optional[str] = ..., include_jpeg: bool = ..., jpeg_quality: _Optional[int] = ..., jpeg_max_side: _Optional[int] = ..., include_anatomy: bool = ..., reports_progress: bool = ...) -> None: ...

class Overlay(_message.Message):
    __slots__ = ("sequence", "media_ms", "capture_unix_ms", "capture_to_publish_ms", "frame_width", "frame_height", "visibility", "phase", "anatomy", "active_alerts", "models", "ai_paused", "paused_reason", "composited_jpeg", "classifications", "model_set", "withheld", "stream_position")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TO_PUBLISH_MS_FIELD_NUMBER: _ClassVar[int]
    FRAME_WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAME_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ANATOMY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ALERTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    AI_PAUSED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPOSITED_JPEG_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SET_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    media_ms: float
    capture_unix_ms: int
    capture_to_publish_ms: float
    frame_width: int
    frame_height: int
    visibility: VisibilityState
    phase: PhaseState
    anatomy: _containers.RepeatedCompositeFieldContainer[AnatomyRegion]
    active_alerts: _containers.RepeatedCompositeFieldContainer[ActiveAlert]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    ai_paused: bool
    paused_reason: str
    composited_jpeg: bytes
    classifications: _containers.RepeatedCompositeFieldContainer[Classification]
    model_set: str
    withheld: _containers.RepeatedCompositeFieldContainer[Withheld]
    stream_position: int
    def __init__(self, sequence: _Optional[int] = ..., media_ms: _Optional[float] = ..., capture_unix_ms: _Optional[int] = ..., capture_to_publish_ms: _Optional[float] = ..., frame_width: _Optional[int] = ..., frame_height: _Optional[int] = ..., visibility: _Optional[_Union[VisibilityState, _Mapping]] = ..., phase: _Optional[_Union[PhaseState, _Mapping]] = ..., anatomy: _Optional[_Iterable[_Union[AnatomyRegion, _Mapping]]] = ..., active_alerts: _Optional[_Iterable[_Union[ActiveAlert, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., ai_paused: bool = ..., paused_reason: _Optional[str] = ..., composited_jpeg: _Optional[bytes] = ..., classifications: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model_set: _Optional[str] = ..., withheld: _Optional[_Iterable[_Union[Withheld, _Mapping]]] = ..., stream_position: _Optional[int] = ...) -> None: ...

class Withheld(_message.Message):
    __slots__ = ("output", "reason")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    output: str
    reason: str
    def __init__(self, output: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("model", "name", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    name: str
    labels: _containers.RepeatedCompositeFieldContainer[LabelProbability]
    def __init__(self, model: _Optional[str] = ..., name: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[LabelProbability, _Mapping]]] = ...) -> None: ...

class LabelProbability(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class VisibilityState(_message.Message):
    __slots__ = ("out_of_body", "low_visibility", "p_out_of_body", "p_low_visibility")
    OUT_OF_BODY_FIELD_NUMBER: _ClassVar[int]
    LOW_VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    P_OUT_OF_BODY_FIELD_NUMBER: _ClassVar[int]
    P_LOW_VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    out_of_body: bool
    low_visibility: bool
    p_out_of_body: float
    p_low_visibility: float
    def __init__(self, out_of_body: bool = ..., low_visibility: bool = ..., p_out_of_body: _Optional[float] = ..., p_low_visibility: _Optional[float] = ...) -> None: ...

class PhaseState(_message.Message):
    __slots__ = ("id", "name", "probabilities", "confidence", "time_in_phase_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_IN_PHASE_S_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    confidence: float
    time_in_phase_s: float
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., confidence: _Optional[float] = ..., time_in_phase_s: _Optional[float] = ...) -> None: ...

class AnatomyRegion(_message.Message):
    __slots__ = ("class_id", "name", "confidence", "area_fraction", "polygons", "model")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    POLYGONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    name: str
    confidence: float
    area_fraction: float
    polygons: _containers.RepeatedCompositeFieldContainer[Polygon]
    model: str
    def __init__(self, class_id: _Optional[int] = ..., name: _Optional[str] = ..., confidence: _Optional[float] = ..., area_fraction: _Optional[float] = ..., polygons: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("xy",)
    XY_FIELD_NUMBER: _ClassVar[int]
    xy: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, xy: _Optional[_Iterable[int]] = ...) -> None: ...

class ActiveAlert(_message.Message):
    __slots__ = ("alert_id", "rule", "severity", "message", "acknowledged")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    rule: str
    severity: Severity
    message: str
    acknowledged: bool
    def __init__(self, alert_id: _Optional[str] = ..., rule: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., message: _Optional[str] = ..., acknowledged: bool = ...) -> None: ...

class AlertSubscribeRequest(_message.Message):
    __slots__ = ("client_id", "after_sequence", "agent_instance")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    after_sequence: int
    agent_instance: str
    def __init__(self, client_id: _Optional[str] = ..., after_sequence: _Optional[int] = ..., agent_instance: _Optional[str] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("sequence", "alert_id", "rule", "severity", "kind", "message", "evidence", "frame_sequence", "frame_media_ms", "event_unix_ms", "acknowledged_by", "models", "agent_instance")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[AlertEvent.Kind]
        RAISED: _ClassVar[AlertEvent.Kind]
        UPDATED: _ClassVar[AlertEvent.Kind]
        CLEARED: _ClassVar[AlertEvent.Kind]
        ACKNOWLEDGED: _ClassVar[AlertEvent.Kind]
        REANNOUNCED: _ClassVar[AlertEvent.Kind]
        HISTORY_TRUNCATED: _ClassVar[AlertEvent.Kind]
        INSTANCE_CHANGED: _ClassVar[AlertEvent.Kind]
    KIND_UNSPECIFIED: AlertEvent.Kind
    RAISED: AlertEvent.Kind
    UPDATED: AlertEvent.Kind
    CLEARED: AlertEvent.Kind
    ACKNOWLEDGED: AlertEvent.Kind
    REANNOUNCED: AlertEvent.Kind
    HISTORY_TRUNCATED: AlertEvent.Kind
    INSTANCE_CHANGED: AlertEvent.Kind
    class EvidenceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    FRAME_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FRAME_MEDIA_MS_FIELD_NUMBER: _ClassVar[int]
    EVENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_BY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    alert_id: str
    rule: str
    severity: Severity
    kind: AlertEvent.Kind
    message: str
    evidence: _containers.ScalarMap[str, str]
    frame_sequence: int
    frame_media_ms: float
    event_unix_ms: int
    acknowledged_by: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    agent_instance: str
    def __init__(self, sequence: _Optional[int] = ..., alert_id: _Optional[str] = ..., rule: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., kind: _Optional[_Union[AlertEvent.Kind, str]] = ..., message: _Optional[str] = ..., evidence: _Optional[_Mapping[str, str]] = ..., frame_sequence: _Optional[int] = ..., frame_media_ms: _Optional[float] = ..., event_unix_ms: _Optional[int] = ..., acknowledged_by: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., agent_instance: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Status(_message.Message):
    __slots__ = ("state", "source", "case_id", "frames_per_second", "capture_to_publish", "frames_processed", "frames_dropped", "models", "uptime_s", "subscribers", "agent_version", "last_error", "preprocessing", "audit_warning")
    class PipelineState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PIPELINE_STATE_UNSPECIFIED: _ClassVar[Status.PipelineState]
        IDLE: _ClassVar[Status.PipelineState]
        STARTING: _ClassVar[Status.PipelineState]
        RUNNING: _ClassVar[Status.PipelineState]
        STALLED: _ClassVar[Status.PipelineState]
        SOURCE_LOST: _ClassVar[Status.PipelineState]
        STOPPING: _ClassVar[Status.PipelineState]
        FAILED: _ClassVar[Status.PipelineState]
    PIPELINE_STATE_UNSPECIFIED: Status.PipelineState
    IDLE: Status.PipelineState
    STARTING: Status.PipelineState
    RUNNING: Status.PipelineState
    STALLED: Status.PipelineState
    SOURCE_LOST: Status.PipelineState
    STOPPING: Status.PipelineState
    FAILED: Status.PipelineState
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TO_PUBLISH_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    AUDIT_WARNING_FIELD_NUMBER: _ClassVar[int]
    state: Status.PipelineState
    source: str
    case_id: str
    frames_per_second: float
    capture_to_publish: LatencyPercentiles
    frames_processed: int
    frames_dropped: int
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    uptime_s: float
    subscribers: int
    agent_version: str
    last_error: str
    preprocessing: str
    audit_warning: str
    def __init__(self, state: _Optional[_Union[Status.PipelineState, str]] = ..., source: _Optional[str] = ..., case_id: _Optional[str] = ..., frames_per_second: _Optional[float] = ..., capture_to_publish: _Optional[_Union[LatencyPercentiles, _Mapping]] = ..., frames_processed: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., uptime_s: _Optional[float] = ..., subscribers: _Optional[int] = ..., agent_version: _Optional[str] = ..., last_error: _Optional[str] = ..., preprocessing: _Optional[str] = ..., audit_warning: _Optional[str] = ...) -> None: ...

class LatencyPercentiles(_message.Message):
    __slots__ = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "count")
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    count: int
    def __init__(self, p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., max_ms: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("task", "name", "version", "sha256", "backend")
    TASK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    task: str
    name: str
    version: str
    sha256: str
    backend: str
    def __init__(self, task: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class StartCaseRequest(_message.Message):
    __slots__ = ("source", "case_id", "paced")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PACED_FIELD_NUMBER: _ClassVar[int]
    source: str
    case_id: str
    paced: bool
    def __init__(self, source: _Optional[str] = ..., case_id: _Optional[str] = ..., paced: bool = ...) -> None: ...

class StopCaseRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class CaseInfo(_message.Message):
    __slots__ = ("case_id", "source", "started_unix_ms", "stopped_unix_ms", "state")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    source: str
    started_unix_ms: int
    stopped_unix_ms: int
    state: Status.PipelineState
    def __init__(self, case_id: _Optional[str] = ..., source: _Optional[str] = ..., started_unix_ms: _Optional[int] = ..., stopped_unix_ms: _Optional[int] = ..., state: _Optional[_Union[Status.PipelineState, str]] = ...) -> None: ...

class AcknowledgeRequest(_message.Message):
    __slots__ = ("alert_id", "client_id")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    client_id: str
    def __init__(self, alert_id: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class AcknowledgeResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: AlertEvent
    def __init__(self, event: _Optional[_Union[AlertEvent, _Mapping]] = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ("client_id", "stream_position")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_POSITION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    stream_position: int
    def __init__(self, client_id: _Optional[str] = ..., stream_position: _Optional[int] = ...) -> None: ...

class ProgressAck(_message.Message):
    __slots__ = ("behind_s", "limit_s")
    BEHIND_S_FIELD_NUMBER: _ClassVar[int]
    LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    behind_s: float
    limit_s: float
    def __init__(self, behind_s: _Optional[float] = ..., limit_s: _Optional[float] = ...) -> None: ...
