"""Atomic writes and the no-overwrite guard."""

import os
import stat

import pytest

from torchbragg.io.atomic_io import atomic_write_bytes, atomic_write_text, exclusive_path


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_bytes_creates_and_replaces(tmp_path):
    target = tmp_path / "out.bin"
    assert atomic_write_bytes(target, b"\x00\x01first") == target
    assert target.read_bytes() == b"\x00\x01first"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []


def test_write_text_is_verbatim(tmp_path):
    target = tmp_path / "report.txt"
    atomic_write_text(str(target), "a\r\nb\nc\u00e9")
    assert target.read_bytes() == "a\r\nb\nc\u00e9".encode("utf-8")


def test_file_mode_follows_umask(tmp_path):
    target = tmp_path / "mode.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_no_overwrite_refuses_and_keeps_original(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "original", overwrite=False)
    with pytest.raises(FileExistsError) as info:
        atomic_write_text(target, "clobber", overwrite=False)
    assert str(target) in str(info.value)
    assert target.read_text() == "original"
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_original_and_no_temp(tmp_path):
    target = tmp_path / "keep.bin"
    atomic_write_bytes(target, b"good")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, 12345)  # not bytes-like
    assert target.read_bytes() == b"good"
    assert _leftovers(tmp_path) == []


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "nope" / "x.bin", b"x")


def test_exclusive_path(tmp_path):
    fresh = tmp_path / "new.txt"
    assert exclusive_path(str(fresh)) == fresh
    fresh.write_text("x")
    with pytest.raises(FileExistsError, match="new.txt"):
        exclusive_path(fresh)
    # a dangling symlink also counts as "something is there"
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(FileExistsError):
        exclusive_path(link)
