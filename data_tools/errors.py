"""User-facing errors of ``data_tools``.

Every problem a user can fix (a missing file, a truncated download, a folder with
two DICOM series, a label map with unexpected values) raises :class:`DataError`,
a :class:`ValueError`, whose message reads ``"<what>: <problem>; <fix>"``::

    scan.nii.gz: truncated gzip stream (file is incomplete); re-export or re-download the file

A missing path raises :class:`MissingDataError`, which is both a
:class:`DataError` and a :class:`FileNotFoundError`, so ``except DataError``
catches every user error and ``except FileNotFoundError`` still works.
Internal invariants use ``assert``; they are bugs, not user errors.
"""

from __future__ import annotations

import os

__all__ = ["DataError", "MissingDataError"]


class DataError(ValueError):
    """A problem with the user's data, naming the thing, the problem and the fix.

    Parameters
    ----------
    where : str or os.PathLike
        The file, folder or argument the problem is about (shown first).
    problem : str
        What is wrong, with the offending value.
    fix : str
        What the user can do about it.

    Examples
    --------
    >>> str(DataError("scan.nii.gz", "truncated gzip stream", "re-download the file"))
    'scan.nii.gz: truncated gzip stream; re-download the file'
    """

    def __init__(self, where: str | os.PathLike, problem: str, fix: str):
        self.where = os.fspath(where)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.where}: {problem}; {fix}")

    def __reduce__(self):  # keep pickling (multiprocessing) working
        return (type(self), (self.where, self.problem, self.fix))


class MissingDataError(DataError, FileNotFoundError):
    """A path that does not exist (a :class:`DataError` and a :class:`FileNotFoundError`)."""
