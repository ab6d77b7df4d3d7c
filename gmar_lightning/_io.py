"""Atomic file writes: a reader never sees a half-written file, and a crash never truncates an existing one.

Examples:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "run" / "notes.txt", "epoch 3")
    >>> (folder / "run" / "notes.txt").read_text()
    'epoch 3'
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_csv", "atomic_write_text", "csv_text"]


def _read_umask() -> int:
    # `os.umask` can only be read by setting it, so read it once at import rather than on every write.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Missing parent directories are created. The file gets the usual permissions (``0o666`` minus the umask)
    rather than the private ``0o600`` of temporary files.

    Args:
        path: Destination file.
        data: The complete new contents.

    Examples:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "blob.bin"
        >>> atomic_write_bytes(target, b"\\x00\\x01")
        >>> target.read_bytes()
        b'\\x00\\x01'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_path: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(delete=False, dir=target.parent, prefix=f".{target.name}.") as handle:
            temp_path = Path(handle.name)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_path, _FILE_MODE)
        os.replace(temp_path, target)
    except BaseException:
        if temp_path is not None:
            temp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically; see `atomic_write_bytes`.

    Examples:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.json"
        >>> atomic_write_text(target, '{"x": 1}')
        >>> target.read_text()
        '{"x": 1}'
    """
    atomic_write_bytes(path, text.encode(encoding))


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    """CSV text of ``rows`` with ``\\n`` line ends (the one CSV dialect every file of the package uses).

    Examples:
        >>> csv_text([("tag", "value"), ("gmar/a,b", 0.5)])
        'tag,value\\n"gmar/a,b",0.5\\n'
    """
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def atomic_write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a header and rows as CSV to ``path`` atomically; see `atomic_write_bytes`."""
    atomic_write_text(path, csv_text([header, *rows]))
