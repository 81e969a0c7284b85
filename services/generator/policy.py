"""The Blip policy: tag -> concept, checked against the profile at start-up."""

import tomllib
from dataclasses import dataclass
from pathlib import Path

from steering.errors import ConfigError, InvalidArgument, PermissionDenied
from steering.profiles import Profile, check_concept_name
from steering.vocabulary import TAGS

DEFAULT_POLICY = Path(__file__).with_name("policy.toml")


@dataclass(frozen=True)
class Policy:
    concepts: dict[str, str | None]  # tag -> concept, None = no steering
    system_prompt: str

    def concept_for(self, tag: str) -> str | None:
        return self.concepts.get(tag)


def load_policy(path: Path, profile: Profile) -> Policy:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"policy file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy file {path} is not valid TOML: {exc}") from None
    tags = data.get("tags", {})
    unknown = sorted(set(tags) - set(TAGS))
    if unknown:
        raise ConfigError(f"policy {path}: unknown tag(s) {', '.join(unknown)}; tags are {', '.join(TAGS)}")
    concepts: dict[str, str | None] = {}
    for tag in TAGS:
        concept = tags.get(tag) or None
        if concept is not None:
            try:
                check_concept_name(concept, profile)
            except (InvalidArgument, PermissionDenied) as exc:
                raise ConfigError(f"policy {path} maps tag {tag!r} to a concept the {profile} profile refuses: {exc}") from None
        concepts[tag] = concept
    return Policy(concepts=concepts, system_prompt=str(data.get("system_prompt", "")))
