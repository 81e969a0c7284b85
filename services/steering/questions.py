"""The question a listener (`steer listen`) or a judge model (`steer perceive`) is asked about
two replies to the same child turn, one steered and one not."""

# Comparatives a seven-year-old's parent would say; a concept not listed gets "more <concept>".
COMPARATIVE: dict[str, str] = {
    "calm": "calmer",
    "happy": "happier",
    "sad": "sadder",
    "warmth": "warmer",
    "empathy": "more understanding",
    "kind": "kinder",
    "enthusiasm": "more enthusiastic",
    "playfulness": "more playful",
}


def question(concept: str) -> str:
    return f"Which reply sounds {COMPARATIVE.get(concept, f'more {concept}')}?"
