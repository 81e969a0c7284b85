"""Profiles decide which concepts may ever be served. In the Blip profile the allowlist is
this constant and nothing else: no setting, flag, file or request can widen it. It is
applied where vectors are loaded, so a blocked concept's file is never even opened.
"""

import re
from enum import StrEnum
from pathlib import Path

from .errors import InvalidArgument, PermissionDenied
from .record import ConceptState
from .store import load_store, stored_concepts
from .vector import ConceptVector

BLIP_ALLOWLIST: frozenset[str] = frozenset(
    {"warmth", "empathy", "enthusiasm", "playfulness", "happy", "sad", "kind", "calm"}
)
# Concept names are plain lower-case ASCII: look-alike letters, whitespace, case variants
# and paths ("../hostile") are refused before any lookup, never normalised into a match.
_NAME = re.compile(r"[a-z][a-z_]{0,31}")


class Profile(StrEnum):
    BLIP = "blip"  # a seven-year-old is listening
    PERSONAL = "personal"  # every validated concept


def check_concept_name(name: str, profile: Profile) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"concept name {name!r} is not a plain lower-case name like 'happy'")
    if profile is Profile.BLIP and name not in BLIP_ALLOWLIST:
        raise PermissionDenied(f"concept {name!r} is not allowed in the Blip profile")
    return name


def alpha_ceiling(state: ConceptState, profile: Profile) -> float:
    """The largest |alpha| this profile serves for a servable concept: its validated max_alpha,
    and in the Blip profile no more than its child-safe alpha (callers refuse a concept
    without one before asking)."""
    if state.max_alpha is None:
        raise ValueError(f"concept {state.concept!r} has no validated max_alpha: it is not servable")
    ceiling = float(state.max_alpha)
    if profile is Profile.BLIP:
        if state.child_safe_alpha is None:
            raise ValueError(f"concept {state.concept!r} has no child-safe alpha: the Blip profile does not serve it")
        ceiling = min(ceiling, float(state.child_safe_alpha))
    return ceiling


def served_alpha(state: ConceptState, profile: Profile) -> float | None:
    """The alpha this profile serves by default: the best one whose effect passes the gate inside
    the profile's bounds; None when no such alpha exists and the profile does not serve it."""
    if not state.servable:
        return None
    return state.child_recommended_alpha if profile is Profile.BLIP else state.recommended_alpha


def profile_concepts(profile: Profile, model_dir: Path) -> list[str]:
    """The concepts whose files this profile may open."""
    if profile is Profile.BLIP:
        return sorted(BLIP_ALLOWLIST)
    return stored_concepts(model_dir)


def load_profile_vectors(
    profile: Profile, model_dir: Path, *, fingerprint: str, hidden_size: int, layers: tuple[int, ...]
) -> tuple[dict[str, ConceptVector], dict[str, str]]:
    names = profile_concepts(profile, model_dir)
    vectors, refused = load_store(model_dir, names, fingerprint=fingerprint, hidden_size=hidden_size, layers=layers)
    if profile is Profile.BLIP:
        # Belt and braces: a vector whose own metadata names a blocked concept never passes.
        for name in [n for n, cv in vectors.items() if cv.concept not in BLIP_ALLOWLIST]:
            refused[name] = f"vector holds blocked concept {vectors.pop(name).concept!r}"
    return vectors, refused
