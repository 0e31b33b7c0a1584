"""The one user-error type of the workbench.

A :class:`UserError` is bad input: a mesh that does not fit the devices, an unknown halo
mode, a folder that already holds a run. Its message names the problem and the fix in
one line. Front ends show it as that line (the CLI: exit status 2, no traceback; the
notebook panel: one red line). Anything else is a bug and keeps its traceback.

``data_tools.DataError`` is the data layer's user error (a file, a format); both are
``ValueError`` subclasses, and :data:`USER_ERRORS` lists them for ``except`` clauses.
"""

from __future__ import annotations

from data_tools.errors import DataError

__all__ = ["UserError", "OutputExistsError", "NotAFolderError", "InputNotFoundError", "USER_ERRORS", "one_line"]


class UserError(ValueError):
    """Bad input; the message names the problem and the fix."""


class OutputExistsError(UserError, FileExistsError):
    """An output folder already holds files (choose another or pass --overwrite)."""


class NotAFolderError(UserError, NotADirectoryError):
    """A path that must be a folder is a file."""


class InputNotFoundError(UserError, FileNotFoundError):
    """An input (checkpoint, folder, file) does not exist."""


USER_ERRORS = (UserError, DataError)


def one_line(err: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
