"""Atomic writes: build the output under a temporary sibling name, then rename it.

A reader never sees a half-written file or folder, and a failure (an exception, a full
disk, Ctrl-C) leaves nothing behind: the temporary is removed and the error re-raised.

This is the one atomic-write helper of the project: every writer in ``data_tools`` uses
:func:`atomic_output`, and the ``workbench`` package imports it from here.

A temporary's name carries its writer: ``.tmp-RANDOM~HOST~PID-NAME``, HOST being the host
name and, on Linux, the writer's PID namespace. A process killed outright (SIGKILL, power
loss) leaves its temporary behind; the next output staged at the same ``NAME`` removes
the temporaries whose writer is on this host and no longer runs (:func:`sweep_stale`),
never those of a live process, of another host or container, or of unknown owner.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "TEMP_PREFIX",
    "atomic_output",
    "temp_sibling",
    "sweep_stale",
    "writer_host",
    "write_text_atomic",
    "write_bytes_atomic",
]

TEMP_PREFIX = ".tmp-"
# A temporary named by temp_sibling without a tag: random part, writer's host, writer's pid.
_OWNED = re.compile(r"\.tmp-[0-9a-f]{8}~(?P<host>[A-Za-z0-9.-]+)~(?P<pid>[0-9]+)-(?P<name>.+)", re.S)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def writer_host() -> str:
    """This process's host as temporaries name it: the host name (letters, digits, ``.-``)
    and, on Linux, the PID namespace (two containers with one host name differ)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:48] or "host"
    with contextlib.suppress(OSError):
        host += "." + re.sub(r"[^0-9]", "", os.readlink("/proc/self/ns/pid"))
    return host


def temp_sibling(path: Path, tag: str = "") -> Path:
    """A fresh hidden name in ``path``'s folder that keeps ``path``'s suffixes and names
    its writer (host, pid).

    ``out/scan.nii.gz`` -> ``out/.tmp-3fa9c1d2~node1.4026531836~4242-scan.nii.gz`` (nibabel
    still sees ``.nii.gz``).
    """
    return path.with_name(f"{TEMP_PREFIX}{tag}{secrets.token_hex(4)}~{writer_host()}~{os.getpid()}-{path.name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process, alive
        return True
    return True


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` (siblings :func:`temp_sibling` named for it) whose
    writer ran on this host and is dead; return them. POSIX only (elsewhere nothing is
    removed). Not touched: a live writer's, another host's or container's, this process's,
    an ``old-`` one (a previous output moved aside), and names of another form."""
    path = Path(path)
    if os.name != "posix" or not path.parent.is_dir():
        return []
    host, removed = writer_host(), []
    with os.scandir(path.parent) as entries:
        for entry in entries:
            m = _OWNED.fullmatch(entry.name) if entry.name.startswith(TEMP_PREFIX) else None
            if m is None or m["name"] != path.name or m["host"] != host:
                continue
            pid = int(m["pid"])
            if pid != os.getpid() and not _alive(pid):
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
    return removed


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
    sweep_stale(path)
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
