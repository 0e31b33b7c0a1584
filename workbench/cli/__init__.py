"""``workbench`` command line: a thin layer over the application layer.

Each command lives in ``workbench/cli/<name>.py`` (``HELP``, ``add_arguments(parser)``,
``run(args)``). A user error (:data:`workbench.errors.USER_ERRORS`: bad input, named with
its fix) ends with exit status 2 and one line on stderr; output folders are written to a
temporary sibling and renamed at the end, so nothing partial is left behind. Anything
else is a bug: one "internal error" line, exit status 1, and the traceback kept in a file
the line names (``--debug`` prints it instead). In a multi-process run, a collective that
fails because a peer process is gone (it died, or its connection dropped) is not a bug:
one line says so, the traceback goes to the file, and the process exits at once with
:data:`~workbench.execute.distributed.PEER_LOST_STATUS` (75).

Third-party log records and Python warnings (tifffile, orbax, absl, jax) never reach the
user's terminal between a command's output and its one error line: they are held while
the command runs and written into the internal-error file, or printed with ``--debug``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import traceback

__all__ = ["main", "build_parser", "COMMANDS"]

# Order of `workbench --help`; a command whose module is not installed is left out.
COMMANDS = ("demo", "infer", "train", "evaluate", "plan", "bench", "view", "launch")


def _command_module(name: str):
    try:
        return importlib.import_module(f"workbench.cli.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"workbench.cli.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Spatially partitioned 3D U-Nets on full-resolution volumes.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an internal error (also: WORKBENCH_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _command_module(name)
        if module is None:
            continue
        epilog = getattr(module, "EPILOG", None)  # a command's notes after its options (exit statuses)
        formatter = argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter
        command = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=epilog,
                                 formatter_class=formatter)  # fmt: skip
        module.add_arguments(command)
    return parser


_LOG_FORMAT = logging.Formatter("%(levelname)s %(name)s: %(message)s")


class _HeldLog(logging.Handler):
    """Log records (WARNING and above) and Python warnings of one command, kept for the
    internal-error file instead of printed."""

    def __init__(self, limit: int = 1000):
        super().__init__(logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=limit)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: a bad record never raises
            self.handleError(record)


@contextlib.contextmanager
def _third_party_output(debug: bool):
    """Route every log record and warning to one handler for the command's duration: printed
    on stderr with ``debug``, else held (:class:`_HeldLog`). Restored afterwards, since
    ``main`` also runs inside other programs (tests, notebooks)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logging.StreamHandler(sys.stderr) if debug else _HeldLog()
    handler.setFormatter(_LOG_FORMAT)
    root.handlers[:] = [handler]  # also replaces absl's handler, which writes to stderr
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _traceback_text(err: BaseException, held: logging.Handler | None) -> str:
    text = "".join(traceback.format_exception(err))
    if isinstance(held, _HeldLog) and held.lines:
        text = "log records and warnings before the error:\n" + "\n".join(held.lines) + "\n\n" + text
    return text


def _keep(text: str, prefix: str) -> str:
    """``text`` in a new file named after ``prefix`` (with the command line); its path."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"workbench {' '.join(sys.argv[1:])}\n\n{text}")
    return path


def _peer_lost(err: BaseException, line: str, debug: bool, held: logging.Handler | None) -> int:
    """A peer process of a multi-process run is gone: one line, the traceback in a file (or
    printed with --debug), and exit at once with PEER_LOST_STATUS: jax's exit handler would
    wait for the lost peer at the shutdown barrier, then abort."""
    from workbench.execute.distributed import PEER_LOST_STATUS

    text = _traceback_text(err, held)
    if debug:
        sys.stderr.write(text)
        where = "traceback above"
    else:
        where = f"traceback written to {_keep(text, 'workbench-peer-lost-')}"
    print(f"{line}; {where}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PEER_LOST_STATUS)


def _internal_error(err: BaseException, debug: bool, held: logging.Handler | None = None) -> int:
    """A bug: keep the traceback (printed with --debug, else in a file the message names),
    with the log records held while the command ran."""
    text = _traceback_text(err, held)
    if debug:
        sys.stderr.write(text)
        print(
            f"workbench: internal error: {type(err).__name__} (a bug, not your input; traceback above)", file=sys.stderr
        )
        return 1
    path = _keep(text, "workbench-internal-error-")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    print(
        f"workbench: internal error: {type(err).__name__}{': ' + first if first else ''} (a bug, not your "
        f"input); traceback written to {path}; rerun with --debug to print it",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("WORKBENCH_DEBUG", "") not in ("", "0")
    module = _command_module(args.command)
    with _third_party_output(debug) as held:
        return _run(module, args, debug, held)


def _run(module, args, debug: bool, held: logging.Handler) -> int:
    from workbench.errors import USER_ERRORS, one_line
    from workbench.execute.distributed import initialize_from_env, peer_lost_line

    try:
        # One of several processes (``workbench launch`` or a cluster job): the launcher
        # sets the devices per process, so --cpu-devices does not apply.
        if not initialize_from_env() and hasattr(args, "cpu_devices"):
            from workbench.execute.devices import configure_cpu_devices

            configure_cpu_devices(args.cpu_devices)
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        print(f"workbench: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the system refused a file operation the user asked for (permissions, space)
        if err.filename is None:
            return _internal_error(err, debug, held)
        print(
            f"workbench: error: {err.strerror or type(err).__name__}: {err.filename}; check the path, "
            "its permissions and the free space",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted; no output folder was written", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug (or a lost peer): reported with its traceback kept
        line = peer_lost_line(err)
        if line is not None:
            return _peer_lost(err, line, debug, held)
        return _internal_error(err, debug, held)
