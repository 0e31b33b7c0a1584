"""Atomic writes: build the output under a temporary sibling name, then rename it.

A reader never sees a half-written file or folder, and a failure (an exception, a full
disk, Ctrl-C) leaves nothing behind: the temporary is removed and the error re-raised.

This is the one atomic-write helper of the project: every writer in ``data_tools`` uses
:func:`atomic_output`, and the ``workbench`` package imports it from here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMP_PREFIX", "atomic_output", "temp_sibling", "write_text_atomic", "write_bytes_atomic"]

TEMP_PREFIX = ".tmp-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def temp_sibling(path: Path, tag: str = "") -> Path:
    """A fresh hidden name in ``path``'s folder that keeps ``path``'s suffixes.

    ``out/scan.nii.gz`` -> ``out/.tmp-3fa9c1d2-scan.nii.gz`` (nibabel still sees ``.nii.gz``).
    """
    return path.with_name(f"{TEMP_PREFIX}{tag}{secrets.token_hex(4)}-{path.name}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system cannot, and the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # no such call (macOS, old glibc, Windows)
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    Works for files and for folders (zarr stores). An existing folder at ``path`` is swapped
    with the new one in one step where the system allows (Linux), else moved aside, the new
    one renamed in and the old one deleted; either way a process killed at any moment
    leaves ``path`` holding the old output or the new one, and at worst a hidden
    ``.tmp-*`` sibling.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with atomic_output(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> sorted(p.name for p in d.iterdir())
    ['a.txt']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise AssertionError(f"writer produced nothing at {tmp}")
        if path.exists() and (path.is_dir() or tmp.is_dir()) and not path.is_symlink():
            if _exchange(tmp, path):
                _remove(tmp)  # now the previous output
                return
            old = temp_sibling(path, "old-")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the previous output back
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:  # clean up whatever the cause, then let it propagate
        _remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`); returns the path.

    Examples
    --------
    >>> import tempfile
    >>> p = write_text_atomic(Path(tempfile.mkdtemp()) / "h.json", "{}\\n")
    >>> p.read_text()
    '{}\\n'
    """
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`); returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
