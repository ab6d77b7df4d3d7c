"""Atomic file writes and the one CSV writer, on the real file system."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import pytest

from gmar_lightning._io import atomic_write_bytes, atomic_write_csv, atomic_write_text


def test_atomic_writes_replace_files_with_normal_permissions_and_clean_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask  # not the 0o600 of temporary files
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.txt"]


def test_atomic_csv_round_trips_through_the_csv_module(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    rows = [["gmar/a,b", 0.5], ['quote "x"', 2]]
    atomic_write_csv(target, ["tag", "value"], rows)
    with open(target, newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [["tag", "value"], ["gmar/a,b", "0.5"], ['quote "x"', "2"]]
    assert b"\r" not in target.read_bytes()  # one dialect: \n line ends on every platform
    assert os.listdir(tmp_path) == ["table.csv"]
