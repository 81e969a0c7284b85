from pathlib import Path

import pytest

from steering.atomic import atomic_path, write_dir_atomic, write_text_atomic


def test_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_dir_write_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "cache"

    def broken(d: Path) -> None:
        (d / "a").write_text("a")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomic(target, broken)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    write_dir_atomic(target, lambda d: (d / "a").write_text("a"))
    assert (target / "a").read_text() == "a"
