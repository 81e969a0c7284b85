from protos.steering.v1 import tagger_pb2 as _tagger_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_LENGTH: _ClassVar[StopReason]
    STOP_REASON_STOP_SEQUENCE: _ClassVar[StopReason]
    STOP_REASON_END_OF_TEXT: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_DEADLINE: _ClassVar[StopReason]
    STOP_REASON_GUARD: _ClassVar[StopReason]

class GateDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_DECISION_UNSPECIFIED: _ClassVar[GateDecision]
    GATE_DECISION_STEER: _ClassVar[GateDecision]
    GATE_DECISION_SKIP: _ClassVar[GateDecision]
    GATE_DECISION_DISABLED: _ClassVar[GateDecision]
    GATE_DECISION_NO_STEERING: _ClassVar[GateDecision]
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_LENGTH: StopReason
STOP_REASON_STOP_SEQUENCE: StopReason
STOP_REASON_END_OF_TEXT: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_DEADLINE: StopReason
STOP_REASON_GUARD: StopReason
GATE_DECISION_UNSPECIFIED: GateDecision
GATE_DECISION_STEER: GateDecision
GATE_DECISION_SKIP: GateDecision
GATE_DECISION_DISABLED: GateDecision
GATE_DECISION_NO_STEERING: GateDecision

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GateSettings(_message.Message):
    __slots__ = ("disabled", "threshold", "enabled")
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    disabled: bool
    threshold: float
    enabled: bool
    def __init__(self, disabled: _Optional[bool] = ..., threshold: _Optional[float] = ..., enabled: _Optional[bool] = ...) -> None: ...

class KlSettings(_message.Message):
    __slots__ = ("enabled", "window", "threshold", "alpha_step", "every")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ALPHA_STEP_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    window: int
    threshold: float
    alpha_step: float
    every: int
    def __init__(self, enabled: _Optional[bool] = ..., window: _Optional[int] = ..., threshold: _Optional[float] = ..., alpha_step: _Optional[float] = ..., every: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "concept", "tag", "alpha", "sampling", "max_tokens", "stop", "gate", "kl")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: Conversation
    concept: str
    tag: _tagger_pb2.Emotion
    alpha: float
    sampling: Sampling
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    gate: GateSettings
    kl: KlSettings
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[Conversation, _Mapping]] = ..., concept: _Optional[str] = ..., tag: _Optional[_Union[_tagger_pb2.Emotion, str]] = ..., alpha: _Optional[float] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., gate: _Optional[_Union[GateSettings, _Mapping]] = ..., kl: _Optional[_Union[KlSettings, _Mapping]] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("model", "concept", "alpha", "layers", "prompt_tokens", "config", "mode")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    model: str
    concept: str
    alpha: float
    layers: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    config: SteeringConfig
    mode: str
    def __init__(self, model: _Optional[str] = ..., concept: _Optional[str] = ..., alpha: _Optional[float] = ..., layers: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., config: _Optional[_Union[SteeringConfig, _Mapping]] = ..., mode: _Optional[str] = ...) -> None: ...

class SteeringConfig(_message.Message):
    __slots__ = ("layers", "scale", "positions", "preserve_norm", "name")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PRESERVE_NORM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    scale: str
    positions: str
    preserve_norm: bool
    name: str
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., scale: _Optional[str] = ..., positions: _Optional[str] = ..., preserve_norm: _Optional[bool] = ..., name: _Optional[str] = ...) -> None: ...

class GateEvent(_message.Message):
    __slots__ = ("decision", "token", "probability", "top3")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOP3_FIELD_NUMBER: _ClassVar[int]
    decision: GateDecision
    token: str
    probability: float
    top3: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, decision: _Optional[_Union[GateDecision, str]] = ..., token: _Optional[str] = ..., probability: _Optional[float] = ..., top3: _Optional[_Iterable[str]] = ...) -> None: ...

class KlSample(_message.Message):
    __slots__ = ("token_index", "kl", "running_mean", "alpha")
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    token_index: int
    kl: float
    running_mean: float
    alpha: float
    def __init__(self, token_index: _Optional[int] = ..., kl: _Optional[float] = ..., running_mean: _Optional[float] = ..., alpha: _Optional[float] = ...) -> None: ...

class Reinjection(_message.Message):
    __slots__ = ("token_index", "running_mean", "alpha_before", "alpha_after")
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_AFTER_FIELD_NUMBER: _ClassVar[int]
    token_index: int
    running_mean: float
    alpha_before: float
    alpha_after: float
    def __init__(self, token_index: _Optional[int] = ..., running_mean: _Optional[float] = ..., alpha_before: _Optional[float] = ..., alpha_after: _Optional[float] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason", "prompt_tokens", "completion_tokens", "seconds", "time_to_first_token_ms")
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    reason: StopReason
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    time_to_first_token_ms: float
    def __init__(self, reason: _Optional[_Union[StopReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class GuardEvent(_message.Message):
    __slots__ = ("reason", "themes", "action", "withheld_chars")
    REASON_FIELD_NUMBER: _ClassVar[int]
    THEMES_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_CHARS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    themes: _containers.RepeatedScalarFieldContainer[str]
    action: str
    withheld_chars: int
    def __init__(self, reason: _Optional[str] = ..., themes: _Optional[_Iterable[str]] = ..., action: _Optional[str] = ..., withheld_chars: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("started", "text", "gate", "kl", "reinjection", "finished", "notice", "guard")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    REINJECTION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    started: Started
    text: str
    gate: GateEvent
    kl: KlSample
    reinjection: Reinjection
    finished: Finished
    notice: Notice
    guard: GuardEvent
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., text: _Optional[str] = ..., gate: _Optional[_Union[GateEvent, _Mapping]] = ..., kl: _Optional[_Union[KlSample, _Mapping]] = ..., reinjection: _Optional[_Union[Reinjection, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., guard: _Optional[_Union[GuardEvent, _Mapping]] = ...) -> None: ...

class ChatTurn(_message.Message):
    __slots__ = ("text", "model", "max_tokens", "sampling", "gate", "kl")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    max_tokens: int
    sampling: Sampling
    gate: GateSettings
    kl: KlSettings
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., gate: _Optional[_Union[GateSettings, _Mapping]] = ..., kl: _Optional[_Union[KlSettings, _Mapping]] = ...) -> None: ...

class ChatEvent(_message.Message):
    __slots__ = ("tag", "concept", "reply")
    TAG_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    tag: _tagger_pb2.TagResponse
    concept: str
    reply: GenerateEvent
    def __init__(self, tag: _Optional[_Union[_tagger_pb2.TagResponse, _Mapping]] = ..., concept: _Optional[str] = ..., reply: _Optional[_Union[GenerateEvent, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConceptInfo(_message.Message):
    __slots__ = ("name", "status", "servable", "recommended_alpha", "max_alpha", "reason", "child_safe_alpha", "alpha_ceiling", "recommended_d", "recommended_d_low", "recommended_d_high", "replies", "ceiling_d", "config", "chat_mode", "chat_alpha", "chat_d", "chat_d_low", "chat_d_high", "chat_replies")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SERVABLE_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_ALPHA_FIELD_NUMBER: _ClassVar[int]
    MAX_ALPHA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHILD_SAFE_ALPHA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_CEILING_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_D_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_D_LOW_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_D_HIGH_FIELD_NUMBER: _ClassVar[int]
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    CEILING_D_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CHAT_MODE_FIELD_NUMBER: _ClassVar[int]
    CHAT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    CHAT_D_FIELD_NUMBER: _ClassVar[int]
    CHAT_D_LOW_FIELD_NUMBER: _ClassVar[int]
    CHAT_D_HIGH_FIELD_NUMBER: _ClassVar[int]
    CHAT_REPLIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    servable: bool
    recommended_alpha: float
    max_alpha: float
    reason: str
    child_safe_alpha: float
    alpha_ceiling: float
    recommended_d: float
    recommended_d_low: float
    recommended_d_high: float
    replies: int
    ceiling_d: float
    config: SteeringConfig
    chat_mode: str
    chat_alpha: float
    chat_d: float
    chat_d_low: float
    chat_d_high: float
    chat_replies: int
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., servable: _Optional[bool] = ..., recommended_alpha: _Optional[float] = ..., max_alpha: _Optional[float] = ..., reason: _Optional[str] = ..., child_safe_alpha: _Optional[float] = ..., alpha_ceiling: _Optional[float] = ..., recommended_d: _Optional[float] = ..., recommended_d_low: _Optional[float] = ..., recommended_d_high: _Optional[float] = ..., replies: _Optional[int] = ..., ceiling_d: _Optional[float] = ..., config: _Optional[_Union[SteeringConfig, _Mapping]] = ..., chat_mode: _Optional[str] = ..., chat_alpha: _Optional[float] = ..., chat_d: _Optional[float] = ..., chat_d_low: _Optional[float] = ..., chat_d_high: _Optional[float] = ..., chat_replies: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "loaded", "steerable", "reason", "concepts", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    STEERABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    loaded: bool
    steerable: bool
    reason: str
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptInfo]
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., loaded: _Optional[bool] = ..., steerable: _Optional[bool] = ..., reason: _Optional[str] = ..., concepts: _Optional[_Iterable[_Union[ConceptInfo, _Mapping]]] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "profile")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    profile: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., profile: _Optional[str] = ...) -> None: ...
