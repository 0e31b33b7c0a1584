"""``workbench`` command line: a thin layer over the package.

Bad input ends with exit status 2 and one line on stderr naming the problem and
the fix; output folders are written to a temporary sibling and renamed at the
end, so nothing partial is left behind.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


class UsageError(ValueError):
    """A bad command-line value (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-devices", type=_positive_int, default=8,
                   help="simulated CPU devices when no accelerator is present (default 8)")
    p.add_argument("--model", default="small", help="model preset: small | paper (default small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Spatially partitioned 3D U-Nets on full-resolution volumes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job: partitioned inference vs the reference")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--resolution", type=_positive_int, default=64, help="phantom side (default 64)")
    demo.add_argument("--mesh", default="2x2x2", help="ZxYxX or data=D,z=Z,y=Y,x=X (default 2x2x2)")
    demo.add_argument("--overwrite", action="store_true", help="replace files in an existing --out")
    _add_common(demo)

    infer = sub.add_parser("infer", help="partitioned inference on a volume")
    infer.add_argument("input", help="a .npy/.npz/NIfTI/DICOM/TIFF/zarr path, phantom:N or mni")
    infer.add_argument("--mesh", required=True, help="ZxYxX, data=D,z=Z,y=Y,x=X or auto")
    infer.add_argument("--backend", default="explicit", help="explicit | gspmd | reference")
    infer.add_argument("--halo", default="exact",
                       help="exact | zero | reflect | replicate | overlap | WIDTH (default exact)")
    infer.add_argument("--reference", action="store_true",
                       help="also run the single-device reference and report the difference")
    infer.add_argument("--out", required=True, help="output folder")
    infer.add_argument("--overwrite", action="store_true", help="replace files in an existing --out")
    infer.add_argument("--save-logits", action="store_true", help="also write logits.npy")
    _add_common(infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .devices import configure_cpu_devices

    try:
        configure_cpu_devices(args.cpu_devices)
        if args.command == "demo":
            from .commands import demo

            return demo(args)
        if args.command == "infer":
            from .commands import infer

            return infer(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"workbench: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted; nothing was written", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2
