"""The emotion vocabulary both services share: the tags the tagger gives a child's turn, which
the Blip policy maps to concepts, and how many earlier turns the tagger reads. The tagger's
protobuf enum spells the same names (`EMOTION_HAPPY`, ...); a test keeps the two in step."""

EMOTIONS = ("happy", "sad", "anxious", "excited", "calm", "empathetic")
NONE = "none"  # no emotion stands out, or the tagger is not sure enough
TAGS = (*EMOTIONS, NONE)

# The tagger's classifier reads at most this many earlier child turns; Chat sends it that many.
CONTEXT_TURNS = 3
