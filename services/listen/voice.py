"""Blip's voice for the listening test: espeak-ng renders a reply to a WAV file once, cached
under the cache directory by the sha256 of voice and text, written atomically."""

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from steering.atomic import atomic_path
from steering.errors import Unavailable

RENDER_TIMEOUT_S = 60.0


class VoiceMissing(Unavailable):
    """espeak-ng is not installed, or it failed: the page shows the text alone."""


@dataclass(frozen=True)
class Voice:
    cache_dir: Path
    command: str = "espeak-ng"
    voice: str = "en-us"

    def path(self, text: str) -> Path:
        key = hashlib.sha256(f"{self.voice}\0{text}".encode("utf-8")).hexdigest()
        return Path(self.cache_dir) / f"{key}.wav"

    def render(self, text: str) -> Path:
        """The WAV file for `text`, rendered now unless it is cached; VoiceMissing if it cannot be."""
        target = self.path(text)
        if target.exists():
            return target
        with atomic_path(target) as tmp:
            # The text goes in on stdin, never through a shell or as an option espeak could parse.
            try:
                res = subprocess.run([self.command, "-v", self.voice, "-w", str(tmp), "--stdin"], input=text.encode("utf-8"),
                                     capture_output=True, timeout=RENDER_TIMEOUT_S, check=False)
            except FileNotFoundError:
                raise VoiceMissing(f"the voice is missing: {self.command} is not installed "
                                   "(apt-get install espeak-ng); read the replies instead") from None
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise VoiceMissing(f"the voice is missing: {self.command} failed ({exc})") from None
            if res.returncode != 0:
                detail = res.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {res.returncode}"]
                raise VoiceMissing(f"the voice is missing: {self.command} failed ({detail[0]})")
            head = tmp.read_bytes()[:12]
            if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                raise VoiceMissing(f"the voice is missing: {self.command} wrote no WAV file")
        return target
