"""``workbench infer INPUT --mesh ZxYxX --out DIR``: partitioned inference on a volume.

With ``--checkpoint`` naming an nnU-Net training folder (``…/Trainer__Plans__3d_fullres``)
and ``--fold K``, INPUT is the case's channel files (``CASE_0000.nii.gz CASE_0001.nii.gz``)
or its case id inside its images folder (``imagesTs/CASE``): :func:`workbench.app.nnunet.predict_nnunet`.

In one process the volume is read whole and the result folder written by that process.
As one of several (``workbench launch -- infer``, or ``WORKBENCH_DISTRIBUTED=auto``),
each process reads, runs and writes only its own shards (:mod:`workbench.app.sharded`):
the prediction in the input's format family as one process writes it (zarr above a size,
or with ``--output-format zarr``), the other arrays as zarr stores, and process 0 writes
``report.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.app.prediction_output import OUTPUT_FORMATS, ZARR_ABOVE_VOXELS
from workbench.cli.args import add_common, model_choice
from workbench.options import BACKENDS, COMM_OVERLAP, HALO_MODES

HELP = "partitioned inference on a volume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input",
        nargs="+",
        help="a .npy/.npz/NIfTI/DICOM/TIFF/zarr path, phantom:N or mni; with an nnU-Net --checkpoint: "
        "the case's channel files (CASE_0000.nii.gz CASE_0001.nii.gz …) or imagesTs/CASE",
    )
    p.add_argument("--mesh", required=True, help="ZxYxX, data=D,z=Z,y=Y,x=X or auto")
    p.add_argument("--backend", default="explicit", help=" | ".join(BACKENDS))
    p.add_argument("--halo", default="exact", help=f"{' | '.join(HALO_MODES)} | WIDTH (default exact)")
    p.add_argument(
        "--comm-overlap",
        default="auto",
        help=f"{' | '.join(COMM_OVERLAP)}: explicit backend, compute each convolution's interior while its "
        "halos travel (default auto: off until a GPU measurement shows the split pays; see README)",
    )
    p.add_argument(
        "--reference", action="store_true", help="also run the single-device reference and report the difference"
    )
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder holds several")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace files in an existing --out")
    p.add_argument(
        "--save-logits", action="store_true", help="also write logits.npy (logits.zarr in several processes)"
    )
    p.add_argument(
        "--output-format",
        default="auto",
        choices=OUTPUT_FORMATS,
        help="the prediction's file: auto (default) = the input's family (NIfTI in, NIfTI out; TIFF, NRRD, "
        f"MetaImage, zarr, .npy), written as zarr by several processes above {ZARR_ABOVE_VOXELS:,} voxels",
    )
    p.add_argument("--force", action="store_true", help="run even if the memory estimate says it will not fit")
    p.add_argument(
        "--mirror",
        action="store_true",
        help="with an nnU-Net training folder: nnU-Net's test-time mirroring (8 passes, all axes flipped)",
    )
    p.add_argument(
        "--compare-with",
        default=None,
        metavar="SEG",
        help="with an nnU-Net training folder: another segmentation of the case (e.g. nnUNetv2_predict's "
        "sliding-window CASE.nii.gz): Dice, differing voxels and where in report.json; it becomes the viewers' "
        "comparison (reference_prediction.npy) with disagreement.npy",
    )
    p.add_argument(
        "--fold", default=None, help="with an nnU-Net training folder as --checkpoint: the fold to use (default 0)"
    )
    add_common(p)


def run(args) -> int:
    """``workbench infer``: check every option, read, run, write prediction + report.json."""
    import jax

    from workbench.app.nnunet import is_nnunet_folder
    from workbench.errors import UserError

    if is_nnunet_folder(args.checkpoint):
        return _nnunet(args)
    if args.mirror:
        raise UserError("--mirror applies to an nnU-Net training folder as --checkpoint; drop it")
    if args.compare_with is not None:
        raise UserError("--compare-with applies to an nnU-Net training folder as --checkpoint; drop it")
    if args.fold is not None:
        raise UserError("--fold applies to an nnU-Net training folder as --checkpoint; drop it")
    if len(args.input) > 1:
        raise UserError(
            f"{len(args.input)} inputs given; infer takes one volume (several channel files only with an "
            "nnU-Net training folder as --checkpoint)"
        )
    args.input = args.input[0]

    from workbench.app import (
        check_output_folder,
        check_run_options,
        guard_input,
        infer,
        load_volume,
        summary_line,
        task_for_input,
        write_result,
    )
    from workbench.execute.distributed import is_main
    from workbench.model.interior import validate_comm_overlap
    from workbench.model.unet import UNetConfig

    # Every option is checked before anything is read or written.
    config = UNetConfig.preset(args.model or "small")
    halo, _ = check_run_options(config, args.backend, args.halo, args.mesh, inference=False)
    validate_comm_overlap(args.comm_overlap)
    if is_main():
        check_output_folder(args.out, overwrite=args.overwrite)
    if jax.process_count() > 1:
        return _per_process(args, halo)
    choice = model_choice(args, task_for_input(args.input))
    # The memory guard, before the input is generated or read (its shape from the spec or headers).
    checked = not args.force and guard_input(
        choice.config,
        args.input,
        args.mesh,
        backend=args.backend,
        halo=halo,
        series=args.series,
        reference=args.reference,
    )
    loaded = load_volume(args.input, series=args.series)
    inference = infer(
        choice,
        loaded,
        args.mesh,
        backend=args.backend,
        halo=halo,
        reference=args.reference,
        force=args.force or checked,
        comm_overlap=args.comm_overlap,
    )
    if not is_main():  # another process of a multi-process run: it computed its shards; process 0 writes
        return 0
    report = write_result(
        args.out,
        inference,
        overwrite=args.overwrite,
        input_name=str(args.input),
        save_logits=args.save_logits,
        output_format=args.output_format,
    )
    print(summary_line(report))
    print(f"wrote {Path(args.out) / report['prediction']} and {Path(args.out) / 'report.json'}")
    return 0


def _per_process(args, halo) -> int:
    """One process of several: its own shards in, its own shards out (process 0: the report)."""
    from workbench.app import summary_line, task_for_input
    from workbench.app.sharded import infer_per_process

    choice = model_choice(args, task_for_input(args.input))
    report = infer_per_process(
        choice,
        args.input,
        args.mesh,
        out=args.out,
        backend=args.backend,
        halo=halo,
        reference=args.reference,
        save_logits=args.save_logits,
        overwrite=args.overwrite,
        series=args.series,
        input_name=str(args.input),
        force=args.force,
        output_format=args.output_format,
        comm_overlap=args.comm_overlap,
    )
    if report is not None:
        print(summary_line(report))
        print(f"wrote {Path(args.out) / report['prediction']} and {Path(args.out) / 'report.json'}")
    return 0


def _nnunet(args) -> int:
    """An nnU-Net training folder as ``--checkpoint``: its fold's model on one case."""
    import jax

    from workbench.app import check_output_folder
    from workbench.app.nnunet import check_nnunet_mesh, open_nnunet_folder, predict_nnunet, write_nnunet_result
    from workbench.app.nnunet_compare import comparison_for, comparison_line, read_comparison
    from workbench.app.results import summary_line
    from workbench.errors import UserError
    from workbench.model.interior import validate_comm_overlap

    if jax.process_count() > 1:
        raise UserError("nnU-Net models run in one process so far; drop workbench launch / WORKBENCH_DISTRIBUTED")
    for flag, given in (("--model", args.model), ("--random-weights", args.random_weights), ("--series", args.series)):
        if given:
            raise UserError(f"{flag} does not apply to an nnU-Net training folder as --checkpoint; drop it")
    if str(args.halo) != "exact":
        raise UserError(f"--halo {args.halo}: nnU-Net networks run with exact halos only; drop --halo")
    if args.output_format != "auto":
        raise UserError("--output-format applies to workbench's own models; an nnU-Net model's prediction "
                        "follows nnU-Net's file ending; drop --output-format")  # fmt: skip
    if args.compare_with is not None and args.reference:
        raise UserError("--compare-with and --reference both fill the viewers' comparison; pass one of them")
    folder = open_nnunet_folder(args.checkpoint, fold=0 if args.fold is None else args.fold)
    check_nnunet_mesh(None, None, args.mesh, args.backend)
    check_output_folder(args.out, overwrite=args.overwrite)
    other = None if args.compare_with is None else read_comparison(args.compare_with)
    prediction = predict_nnunet(
        folder.path,
        args.input,
        args.mesh,
        fold=folder.fold,
        backend=args.backend,
        reference=args.reference,
        mirror=args.mirror,
        force=args.force,
        comm_overlap=validate_comm_overlap(args.comm_overlap),
    )
    if other is not None:
        prediction.report["compare_with"] = comparison_for(prediction, other, args.compare_with)
    report = write_nnunet_result(
        args.out,
        prediction,
        overwrite=args.overwrite,
        input_name=" ".join(args.input),
        save_logits=args.save_logits,
        compare_with=other,
    )
    agreement = report["label_agreement"]
    print(summary_line(report) + ("" if agreement is None else f", labels equal on {agreement:.2%} of voxels"))
    if other is not None:
        print(comparison_line(report["compare_with"]))
    print(f"wrote {Path(args.out) / report['prediction']} and {Path(args.out) / 'report.json'}")
    return 0
