"""Communication audit of a compiled step, read from its optimised HLO text.

Counts and sizes the collectives one step issues per device (collective-permutes
are the halo exchanges, all-reduces the cross-shard statistics and gradient sums,
all-gathers and all-to-alls what GSPMD adds when it re-lays out data), and relates
the halo traffic to the activations the step computes. An all-gather whose result
is a volume-shaped (rank >= 4) array means an activation was gathered: GSPMD fell
back to replicating it, which costs memory on every device; :func:`audit` reports
that as a warning.

Counts are static occurrences in the program text (the U-Net has no loops, so each
runs once per step). Bytes are result sizes per device.

:func:`async_overlap` reads a scheduled program (``is_scheduled=true``, as XLA:GPU
emits it) and says, for every asynchronous collective, what the schedule places
between its ``-start`` and its ``-done``: the work that can run while the message is
in flight.

Example
-------
>>> compiled = compile_train_step(config, layout)           # workbench.training.step
>>> report = audit(compiled)
>>> report["collectives"]["collective-permute"]["count"], report["halo_ratio"]
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["COLLECTIVES", "audit", "audit_text", "format_audit", "async_overlap"]

COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "all-to-all", "reduce-scatter")

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 1,
    "u4": 1,
}
# "%name = <shape> <op>(" where <shape> is one array shape or a tuple of them.
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>[a-z][a-z0-9\-]*)\("
)
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_DIM_LABELS = re.compile(r"dim_labels=[^,\s]*->(\w+)")
# Convolutions that GPU backends lower to library calls.
_CONV_CALL = re.compile(r'custom_call_target="__cudnn\$conv(?:Forward|BiasActivationForward)?"')


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return _DTYPE_BYTES[dtype] * math.prod(dims)


def _collective(op: str) -> str | None:
    """``all-gather-start`` → ``all-gather``; ``-done`` halves are not counted twice."""
    if op.endswith("-done"):
        return None
    base = op[: -len("-start")] if op.endswith("-start") else op
    return base if base in COLLECTIVES else None


def audit_text(hlo: str, *, activation_rank: int = 4) -> dict[str, Any]:
    """Audit optimised HLO text (``compiled.as_text()``); see :func:`audit`."""
    stats = {name: {"count": 0, "bytes": 0, "largest_bytes": 0} for name in COLLECTIVES}
    gathered: list[dict[str, Any]] = []
    activation_bytes = 0
    conv_dtypes: set[str] = set()
    for line in hlo.splitlines():
        match = _INSTR.match(line)
        if match is None:
            continue
        op, shape = match.group("op"), match.group("shape")
        arrays = _arrays(shape)
        name = _collective(op)
        if name is not None:
            if op.endswith("-start") and shape.startswith("(") and len(arrays) >= 2:
                # async start: (operand, result, [context...]); the result is the message
                arrays = [arrays[1]]
            size = sum(_nbytes(d, s) for d, s in arrays)
            entry = stats[name]
            entry["count"] += 1
            entry["bytes"] += size
            entry["largest_bytes"] = max(entry["largest_bytes"], size)
            if name == "all-gather":
                for dtype, dims in arrays:
                    if len(dims) >= activation_rank:
                        gathered.append(
                            {"shape": f"{dtype}[{','.join(map(str, dims))}]", "bytes": _nbytes(dtype, dims)}
                        )
            continue
        is_conv = op == "convolution" or (op == "custom-call" and _CONV_CALL.search(line))
        if is_conv and arrays:
            labels = _DIM_LABELS.search(line)
            # activations are laid out batch-first; weight gradients are not
            if labels is None or labels.group(1).startswith("b"):
                activation_bytes += _nbytes(*arrays[0])
                conv_dtypes.add(arrays[0][0])
    halo = stats["collective-permute"]["bytes"]
    warnings = []
    if gathered:
        largest = max(gathered, key=lambda g: g["bytes"])
        warnings.append(
            f"{len(gathered)} all-gather(s) of activations ({sum(g['bytes'] for g in gathered) / 2**20:.1f} MiB "
            f"per device; largest {largest['shape']}): GSPMD replicated volume-shaped arrays instead "
            "of exchanging halos, so every device holds gathered copies; use the explicit backend"
        )
    return {
        "collectives": stats,
        "halo_bytes": halo,
        "activation_bytes": activation_bytes,
        "halo_ratio": halo / activation_bytes if activation_bytes else None,
        "activation_all_gathers": gathered,
        "convolution_dtypes": sorted(conv_dtypes),
        "warnings": warnings,
    }


def audit(compiled, *, activation_rank: int = 4) -> dict[str, Any]:
    """Collectives of one compiled step, per device.

    Parameters
    ----------
    compiled
        a ``jax.stages.Compiled`` (e.g. ``workbench.execute.run.compile_forward(...).compiled``).
    activation_rank
        all-gathers whose result has at least this many dimensions count as gathered
        activations (volumes are (N, Z, Y, X, C); parameters have rank <= 5 but are
        never all-gathered when replicated).

    Returns
    -------
    dict with ``collectives`` ({kind: {count, bytes, largest_bytes}} for each of
    :data:`COLLECTIVES`), ``halo_bytes`` (collective-permute bytes),
    ``activation_bytes`` (bytes of every batch-first convolution result: the
    activations computed, forward and backward), ``halo_ratio``,
    ``convolution_dtypes`` (what the compiler computes convolutions in),
    ``activation_all_gathers`` and ``warnings``.
    """
    return audit_text(compiled.as_text(), activation_rank=activation_rank)


def format_audit(report: dict[str, Any]) -> str:
    """A small table of the audit, one collective kind per line."""
    lines = [f"{'collective':<20}{'count':>7}{'MiB/device':>12}{'largest MiB':>13}"]
    for name, entry in report["collectives"].items():
        if entry["count"]:
            lines.append(
                f"{name:<20}{entry['count']:>7}{entry['bytes'] / 2**20:>12.2f}{entry['largest_bytes'] / 2**20:>13.2f}"
            )
    if len(lines) == 1:
        lines.append("(no collectives: one device, or nothing to exchange)")
    ratio = report["halo_ratio"]
    lines.append(
        f"halo bytes / activation bytes: {'n/a' if ratio is None else f'{ratio:.4f}'} "
        f"({report['halo_bytes'] / 2**20:.1f} MiB halos, "
        f"{report['activation_bytes'] / 2**20:.1f} MiB convolution outputs)"
    )
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return "\n".join(lines)


_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=")
_PAIRS = re.compile(r"source_target_pairs=\{(?P<pairs>(?:\{\d+,\d+\},?)*)\}")
_ANY_CONV_CALL = re.compile(r'custom_call_target="__cudnn\$conv')  # forward and both gradients
_SYNC = re.compile(r'"is_sync":(true|false)')


def _entry_lines(hlo: str) -> list[str]:
    lines = hlo.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ENTRY")), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("}")), len(lines))
    return lines[start + 1 : end]


def async_overlap(hlo: str) -> dict[str, Any]:
    """What the entry computation's schedule runs between each async collective's start and done.

    Returns ``{"collectives": [...], "summary": {kind: {...}}}``. Each collective:
    ``name``, ``kind`` (``collective-permute``, ``all-reduce``, ...), ``bytes`` (the
    message: the result), ``is_sync`` (XLA's flag that it runs synchronously),
    ``pairs`` (source → target device ids of a permute), ``convolutions`` (convolutions,
    cuDNN convolution calls included, scheduled in between), ``fusions`` and
    ``fusion_bytes`` (their result bytes: memory-bound work that can hide the message).
    ``summary`` counts, per kind, ``count``, ``sync``, ``with_convolution``,
    ``with_fusion`` and ``nothing_between``. Synchronous collectives (``op(...)``
    without start/done) count as ``sync`` with nothing between.
    """
    ops = []  # (name, op, shape, line)
    for line in _entry_lines(hlo):
        match = _INSTR.match(line)
        if match is not None:
            ops.append((_NAME.match(line).group("name"), match.group("op"), match.group("shape"), line))
    done_at = {}
    for i, (_, op, _, line) in enumerate(ops):
        if op.endswith("-done"):
            operand = re.search(r"\(%?([\w.\-]+)\)", line[line.index(op) :])
            if operand:
                done_at[operand.group(1)] = i
    found = []
    for i, (name, op, shape, line) in enumerate(ops):
        kind = _collective(op)
        if kind is None:
            continue
        arrays = _arrays(shape)
        if op.endswith("-start") and shape.startswith("(") and len(arrays) >= 2:
            arrays = [arrays[1]]
        between = ops[i + 1 : done_at.get(name, i + 1)] if op.endswith("-start") else []
        sync = _SYNC.search(line)
        pairs = _PAIRS.search(line)
        convs = [b for b in between if b[1] == "convolution" or (b[1] == "custom-call" and _ANY_CONV_CALL.search(b[3]))]
        fusions = [b for b in between if b[1] == "fusion"]
        found.append(
            {
                "name": name,
                "kind": kind,
                "bytes": sum(_nbytes(d, s) for d, s in arrays),
                "is_sync": (not op.endswith("-start")) or (sync is not None and sync.group(1) == "true"),
                "pairs": [tuple(map(int, p.split(","))) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group("pairs"))]
                if pairs
                else [],
                "convolutions": len(convs),
                "fusions": len(fusions),
                "fusion_bytes": sum(_nbytes(d, s) for f in fusions for d, s in _arrays(f[2])),
            }
        )
    summary = {}
    for c in found:
        entry = summary.setdefault(
            c["kind"], {"count": 0, "sync": 0, "with_convolution": 0, "with_fusion": 0, "nothing_between": 0}
        )
        entry["count"] += 1
        entry["sync"] += c["is_sync"]
        entry["with_convolution"] += c["convolutions"] > 0
        entry["with_fusion"] += c["fusions"] > 0
        entry["nothing_between"] += c["convolutions"] == 0 and c["fusions"] == 0
    return {"collectives": found, "summary": summary}
