"""The emotion vocabulary both services share: the tags the tagger gives a child's turn, which
the Blip policy maps to concepts, and how many earlier turns the tagger reads. The tagger's
protobuf enum spells the same names (`EMOTION_HAPPY`, ...); a test keeps the two in step."""

from enum import StrEnum

EMOTIONS = ("happy", "sad", "anxious", "excited", "calm", "empathetic")
NONE = "none"  # no emotion stands out, or the tagger is not sure enough
TAGS = (*EMOTIONS, NONE)

# The tagger's classifier reads at most this many earlier child turns; Chat sends it that many.
CONTEXT_TURNS = 3


class Mode(StrEnum):
    """How a reply reaches its concept's register. Validation measures the three ways for each
    Blip concept, and the Blip policy serves the one its record shows works best."""

    NONE = ""  # no concept: the reply is neither instructed nor steered
    STEER = "steer"  # steering vectors only
    PROMPT = "prompt"  # a one-sentence register instruction added to the system prompt, unsteered
    BOTH = "both"  # the instruction and steering together


def instructed(system_prompt: str, instruction: str) -> str:
    """Blip's system prompt with a concept's register instruction after it (prompt and both
    modes), as validation measured it and Chat serves it."""
    return f"{system_prompt} {instruction}".strip()


# The ways a concept's reply can be made, as the perceptibility judge and listeners compare them.
REPLY_MODES: tuple[str, ...] = tuple(m.value for m in Mode if m is not Mode.NONE)
