from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Emotion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMOTION_UNSPECIFIED: _ClassVar[Emotion]
    EMOTION_NONE: _ClassVar[Emotion]
    EMOTION_HAPPY: _ClassVar[Emotion]
    EMOTION_SAD: _ClassVar[Emotion]
    EMOTION_ANXIOUS: _ClassVar[Emotion]
    EMOTION_EXCITED: _ClassVar[Emotion]
    EMOTION_CALM: _ClassVar[Emotion]
    EMOTION_EMPATHETIC: _ClassVar[Emotion]
EMOTION_UNSPECIFIED: Emotion
EMOTION_NONE: Emotion
EMOTION_HAPPY: Emotion
EMOTION_SAD: Emotion
EMOTION_ANXIOUS: Emotion
EMOTION_EXCITED: Emotion
EMOTION_CALM: Emotion
EMOTION_EMPATHETIC: Emotion

class TagRequest(_message.Message):
    __slots__ = ("text", "context")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    context: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., context: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: Emotion
    score: float
    def __init__(self, label: _Optional[_Union[Emotion, str]] = ..., score: _Optional[float] = ...) -> None: ...

class TagResponse(_message.Message):
    __slots__ = ("label", "confidence", "scores", "threshold")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    label: Emotion
    confidence: float
    scores: _containers.RepeatedCompositeFieldContainer[LabelScore]
    threshold: float
    def __init__(self, label: _Optional[_Union[Emotion, str]] = ..., confidence: _Optional[float] = ..., scores: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., threshold: _Optional[float] = ...) -> None: ...
