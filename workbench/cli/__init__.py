"""``workbench`` command line: a thin layer over the package.

Each command lives in ``workbench/cli/<name>.py`` (``HELP``,
``add_arguments(parser)``, ``run(args)``). Bad input ends with exit status 2 and one
line on stderr naming the problem and the fix; output folders are written to a
temporary sibling and renamed at the end, so nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMANDS"]

# Order of `workbench --help`; a command whose module is not installed is left out.
COMMANDS = ("demo", "infer", "train", "plan", "bench", "view", "launch")


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _command_module(name)
        if module is None:
            continue
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = _command_module(args.command)
    try:
        from workbench.execute.distributed import initialize_from_env

        # One of several processes (``workbench launch`` or a cluster job): the launcher
        # sets the devices per process, so --cpu-devices does not apply.
        if not initialize_from_env() and hasattr(args, "cpu_devices"):
            from workbench.execute.devices import configure_cpu_devices

            configure_cpu_devices(args.cpu_devices)
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        text = str(err).strip()
        message = text.splitlines()[0] if text else type(err).__name__
        print(f"workbench: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted; no output folder was written", file=sys.stderr)
        return 130
