"""Atomic file writes for the training package (a reader never sees half a file).

The one place the training package reaches the shared atomic-write helper
(``data_tools._atomic.atomic_output``; repoint here when it becomes public).
"""

from __future__ import annotations

import os
from pathlib import Path

from data_tools._atomic import atomic_output

__all__ = ["write_text_atomic", "write_bytes_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling renamed on success."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling renamed on success."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
