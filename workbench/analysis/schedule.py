"""What the compiled schedule runs while each halo message is in flight.

XLA:GPU emits its program scheduled (``HloModule ..., is_scheduled=true``): the entry
computation lists instructions in the order one stream runs them, and every
asynchronous collective appears as a ``-start`` and a ``-done``. A halo
collective-permute is *overlapped* when independent compute (a convolution, cuDNN's
forward, input-gradient and filter-gradient calls included, or a matrix product) is
scheduled between its start and its done: that work runs while the message travels.
Independent means not downstream of the message: a schedule is a topological order, so
nothing placed before the done can need it.

:func:`halo_schedule` reports, per pass (forward, backward: the metadata's
``transpose(...)`` marks the backward pass) and per layer, the permutes, their bytes,
how many bytes are overlapped, and for the others why not: ``synchronous`` (nothing
scheduled between start and done), ``fusions only`` (memory-bound work only), and whether
any convolution independent of the message exists anywhere in the program
(``independent_convolutions``): none means data flow forbids overlap (every convolution
feeds the message or needs it), some means the scheduler chose not to use them.
:func:`scheduler_flags` says which XLA/JAX switches that change the schedule were on in
this process (XLA reads ``XLA_FLAGS`` once per process).

Example
-------
>>> report = halo_schedule(compiled.as_text())
>>> report["passes"]["forward"]["overlapped_fraction"]
"""

from __future__ import annotations

import os
import re
from typing import Any

from workbench.analysis.audit import _INSTR, _arrays, _nbytes

__all__ = [
    "parse_entry",
    "halo_schedule",
    "schedule_summary",
    "timeline",
    "scheduler_flags",
    "format_schedule",
    "LHS_EFFORT",
]

# XLA:GPU runs its latency-hiding scheduler when the flag is set or JAX's
# exec_time_optimization_effort is at least this (xla/service/gpu/flag_utils.h).
LHS_EFFORT = 0.2

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=")
_OP_NAME = re.compile(r'op_name="(?P<path>[^"]*)"')
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]*)"')
_DIM_LABELS = re.compile(r"dim_labels=(?P<lhs>\w+)_(?P<rhs>\w+)->(?P<out>\w+)")
_WINDOW = re.compile(r"window=\{size=(?P<size>[\dx]+)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{(?P<dims>[\d,]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{(?P<pairs>(?:\{\d+,\d+\},?)*)\}")
_SYNC = re.compile(r'"is_sync":(true|false)')
_COMMENT = re.compile(r"/\*.*?\*/")


def _operands(line: str, op: str) -> list[str]:
    """Names of the operands of ``op(...)`` (up to its matching parenthesis)."""
    start = line.index(op + "(") + len(op) + 1
    depth, end = 1, start
    while end < len(line) and depth:
        depth += {"(": 1, ")": -1}.get(line[end], 0)
        end += 1
    return re.findall(r"%([\w.\-]+)", line[start:end])


def parse_entry(hlo: str) -> list[dict[str, Any]]:
    """The entry computation's instructions in program (schedule) order: ``name``, ``op``,
    ``shape`` (text), ``operands`` (names), ``path`` (the metadata's op_name), ``line``."""
    lines = hlo.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ENTRY")), None)
    if start is None:
        return []
    out = []
    for line in lines[start + 1 :]:
        if line.startswith("}"):
            break
        line = _COMMENT.sub("", line)  # /*index=5*/ inside long tuples and operand lists
        match = _INSTR.match(line)
        if match is None:
            continue
        op = match.group("op")
        path = _OP_NAME.search(line)
        out.append(
            {
                "name": _NAME.match(line).group("name"),
                "op": op,
                "shape": match.group("shape"),
                "operands": _operands(line, op),
                "path": path.group("path") if path else "",
                "line": line,
            }
        )
    return out


def _computations(hlo: str) -> dict[str, list[str]]:
    """The instruction lines of every non-entry computation, by name."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^%([\w.\-]+) .*\{\s*$", line)
        if head:
            current = out.setdefault(head.group(1), [])
        elif line.startswith("}") or line.startswith("ENTRY"):
            current = None
        elif current is not None:
            current.append(line)
    return out


def _fused_dot(lines: list[str]) -> dict | None:
    """The dot or convolution inside a fusion's computation, with its local shapes."""
    lines = [_COMMENT.sub("", line) for line in lines]
    local = [(m, line) for line in lines if (m := _INSTR.match(line))]
    shapes = {_NAME.match(line).group("name"): _first(m.group("shape")) for m, line in local}
    for m, line in local:
        if m.group("op") in ("dot", "convolution"):
            ins = {"op": m.group("op"), "shape": m.group("shape"), "line": line}
            ins["operands"] = _operands(line, ins["op"])
            return {"ins": ins, "shapes": shapes}
    return None


def _compute_kind(ins: dict, fused: dict | None = None) -> str | None:
    """``convolution``, ``matmul`` or None (memory-bound or bookkeeping)."""
    op, line = ins["op"], ins["line"]
    if op == "convolution":
        return "convolution"
    if op == "dot":
        return "matmul"
    if op == "custom-call":
        target = _TARGET.search(line)
        target = target.group("target") if target else ""
        if target.startswith("__cudnn$conv"):
            return "convolution"
        if "gemm" in target or "matmul" in target:
            return "matmul"
    if op == "fusion" and fused is not None:  # Triton GEMMs, cuDNN fusions
        return "convolution" if fused["ins"]["op"] == "convolution" else "matmul"
    return None


def _first(shape_text: str) -> tuple[str, tuple[int, ...]] | None:
    arrays = _arrays(shape_text)
    return arrays[0] if arrays else None


def _conv_flops(ins: dict, shapes: dict) -> int:
    """Multiply-adds × 2 of a convolution, from the forward convolution's shapes: cuDNN
    calls keep the forward dim_labels; (x, w) -> y, (dy, w) -> dx, (x, dy) -> dw."""
    labels, window = _DIM_LABELS.search(ins["line"]), _WINDOW.search(ins["line"])
    result = _first(ins["shape"])
    ops = [shapes.get(o) for o in ins["operands"][:2]]
    if labels is None or window is None or result is None or None in ops:
        return 0
    target = _TARGET.search(ins["line"])
    target = target.group("target") if target else ""
    if target.endswith("BackwardInput"):
        y, w = ops[0], ops[1]
    elif target.endswith("BackwardFilter"):
        y, w = ops[1], result
    else:
        y, w = result, ops[1]
    out_features = y[1][labels.group("out").index("f")]
    kernel = 1
    for size in window.group("size").split("x"):
        kernel *= int(size)
    n_y = n_w = 1
    for d in y[1]:
        n_y *= d
    for d in w[1]:
        n_w *= d
    return 2 * n_y * n_w // max(out_features, 1) if kernel else 0


def _dot_flops(ins: dict, shapes: dict) -> int:
    result, contract = _first(ins["shape"]), _CONTRACT.search(ins["line"])
    lhs = shapes.get(ins["operands"][0]) if ins["operands"] else None
    if result is None or lhs is None or contract is None:
        return 0
    k = 1
    for d in (int(x) for x in contract.group("dims").split(",") if x):
        k *= lhs[1][d]
    n = 1
    for d in result[1]:
        n *= d
    return 2 * n * k


def _message(ins: dict) -> int:
    arrays = _arrays(ins["shape"])
    if ins["op"].endswith("-start") and ins["shape"].startswith("(") and len(arrays) >= 2:
        arrays = [arrays[1]]  # (operand, result, ...): the result is the message
    return sum(_nbytes(d, s) for d, s in arrays)


def _layer(path: str) -> str:
    """``jit(step)/transpose(jvp(...))/shard_map/UNet3D/down0/conv1/ppermute`` -> ``UNet3D/down0/conv1``."""
    parts = [p for p in path.split("/") if p and "(" not in p and p != "shard_map"]
    return "/".join(parts[:-1]) or "?"


def _closure(start: int, edges: list[list[int]]) -> set[int]:
    seen, stack = set(), [start]
    while stack:
        for j in edges[stack.pop()]:
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def _graph(hlo: str, mesh=None) -> dict[str, Any]:
    """Instructions, users, operands (as indices), compute kind and FLOPs of each, and the
    mesh axis of each permute (with ``mesh``)."""
    instrs = parse_entry(hlo)
    index = {ins["name"]: i for i, ins in enumerate(instrs)}
    shapes = {ins["name"]: _first(ins["shape"]) for ins in instrs}
    users: list[list[int]] = [[] for _ in instrs]
    deps: list[list[int]] = [[] for _ in instrs]
    for i, ins in enumerate(instrs):
        for o in ins["operands"]:
            if o in index:
                users[index[o]].append(i)
                deps[i].append(index[o])
    bodies = _computations(hlo)
    fused = {}
    for i, ins in enumerate(instrs):
        called = re.search(r"calls=%([\w.\-]+)", ins["line"]) if ins["op"] == "fusion" else None
        if called and called.group(1) in bodies:
            found = _fused_dot(bodies[called.group(1)])
            if found is not None:
                fused[i] = found
    kinds = [_compute_kind(ins, fused.get(i)) for i, ins in enumerate(instrs)]
    flops = [0] * len(instrs)
    for i, ins in enumerate(instrs):
        inner, table = (fused[i]["ins"], fused[i]["shapes"]) if i in fused else (ins, shapes)
        if kinds[i] == "convolution":
            flops[i] = _conv_flops(inner, table)
        elif kinds[i] == "matmul" and inner["op"] == "dot":
            flops[i] = _dot_flops(inner, table)
    axes = {}
    if mesh is not None:
        from workbench.mesh import SPATIAL_AXES, parse_mesh

        spec = parse_mesh(mesh)
        strides = dict(zip(SPATIAL_AXES, (spec.y * spec.x, spec.x, 1)))
        sizes = dict(zip(SPATIAL_AXES, spec.spatial))
        for i, ins in enumerate(instrs):
            pairs = _PAIRS.search(ins["line"]) if ins["op"].startswith("collective-permute") else None
            found = re.findall(r"\{(\d+),(\d+)\}", pairs.group("pairs")) if pairs else []
            if found:
                step = abs(int(found[0][1]) - int(found[0][0]))
                axes[i] = next((a for a, s in strides.items() if s == step and sizes[a] > 1), "?")
    return {"instrs": instrs, "users": users, "deps": deps, "kinds": kinds, "flops": flops, "axes": axes}


def halo_schedule(hlo: str, *, mesh=None, flags: dict | None = None) -> dict[str, Any]:
    """Per halo collective-permute: what the schedule runs between its start and done.

    Returns ``scheduled`` (the module says ``is_scheduled=true``), ``flags`` (as given:
    :func:`scheduler_flags` of the compiling process), ``permutes`` (one row each:
    ``name``, ``pass``, ``layer``, ``axis`` (with ``mesh``), ``bytes``, ``is_sync``,
    ``two_way`` (one message carries both directions: pairs (a, b) and (b, a)),
    ``convolutions`` and ``flops`` (independent convolutions and matrix products between
    start and done, their FLOPs), ``fusions``, ``fusion_bytes``, ``overlapped``),
    ``passes`` ({forward, backward, total}: ``count``, ``bytes``, ``overlapped``,
    ``overlapped_bytes``, ``overlapped_fraction`` of the bytes, ``sync``, ``two_way``), ``layers``
    (per pass and layer: the same counts and ``reasons`` where bytes are not overlapped)
    and ``all_reduce`` (count, bytes, overlapped: the same test).
    """
    g = _graph(hlo, mesh)
    instrs, users, deps, kinds, flops = g["instrs"], g["users"], g["deps"], g["kinds"], g["flops"]
    compute_at = [i for i, k in enumerate(kinds) if k]
    rows, reduces = [], []
    for i, ins in enumerate(instrs):
        op = ins["op"]
        base = op.removesuffix("-start")
        if base not in ("collective-permute", "all-reduce") or op.endswith("-done"):
            continue
        done = next((u for u in users[i] if instrs[u]["op"].endswith("-done")), i)
        # a schedule is a topological order: nothing between start and done needs the message
        between = range(i + 1, done)
        comp = [j for j in between if kinds[j]]
        fus = [j for j in between if instrs[j]["op"] == "fusion" and not kinds[j]]
        sync = _SYNC.search(ins["line"])
        row = {
            "name": ins["name"],
            "pass": "backward" if "transpose(" in ins["path"] else "forward",
            "layer": _layer(ins["path"]),
            "bytes": _message(ins),
            "is_sync": done == i or (sync is not None and sync.group(1) == "true"),
            "convolutions": len(comp),
            "flops": sum(flops[j] for j in comp),
            "fusions": len(fus),
            "fusion_bytes": sum(_nbytes(d, s) for j in fus for d, s in _arrays(instrs[j]["shape"])),
            "overlapped": bool(comp),
        }
        if base == "all-reduce":
            reduces.append(row)
            continue
        if i in g["axes"]:
            row["axis"] = g["axes"][i]
        pairs = _PAIRS.search(ins["line"])
        pairs = set(re.findall(r"\{(\d+),(\d+)\}", pairs.group("pairs"))) if pairs else set()
        row["two_way"] = any((b, a) in pairs for a, b in pairs)  # both directions in one message
        if not comp:
            # is there any convolution the message neither waits for nor feeds?
            upstream, downstream = _closure(i, deps), _closure(done, users) | {done}
            free = [j for j in compute_at if j not in upstream and j not in downstream and kinds[j] == "convolution"]
            row["independent_convolutions"] = len(free)
            row["independent_before_start"] = sum(j < i for j in free)
            # does its face wait for another message of the same layer (the corners of an earlier axis)?
            row["after_other_message"] = any(
                instrs[j]["op"] == "collective-permute-done" and _layer(instrs[j]["path"]) == row["layer"]
                for j in upstream
            )
            # the backward pass: is this layer's weight gradient computed before its message is sent?
            row["weight_gradient_first"] = any(
                "BackwardFilter" in instrs[j]["line"] and _layer(instrs[j]["path"]) == row["layer"]
                for j in compute_at
                if j in upstream
            )
        rows.append(row)
    passes = {}
    for name in ("forward", "backward", "total"):
        sel = [r for r in rows if name in ("total", r["pass"])]
        total = sum(r["bytes"] for r in sel)
        hidden = sum(r["bytes"] for r in sel if r["overlapped"])
        passes[name] = {
            "count": len(sel),
            "bytes": total,
            "overlapped": sum(r["overlapped"] for r in sel),
            "overlapped_bytes": hidden,
            "overlapped_fraction": hidden / total if total else None,
            "sync": sum(r["is_sync"] for r in sel),
            "two_way": sum(r["two_way"] for r in sel),
        }
    return {
        "scheduled": "is_scheduled=true" in hlo.split("\n", 1)[0],
        "flags": flags,
        "permutes": rows,
        "passes": passes,
        "layers": _layers(rows),
        "all_reduce": {
            "count": len(reduces),
            "bytes": sum(r["bytes"] for r in reduces),
            "overlapped": sum(r["overlapped"] for r in reduces),
            "largest_bytes": max((r["bytes"] for r in reduces), default=0),
            "largest_overlapped": bool(reduces) and max(reduces, key=lambda r: r["bytes"])["overlapped"],
        },
    }


def schedule_summary(hlo: str, *, mesh=None) -> dict[str, Any]:
    """:func:`halo_schedule` without its per-permute rows, with this process's
    :func:`scheduler_flags`: what ``workbench plan`` reports."""
    report = halo_schedule(hlo, mesh=mesh, flags=scheduler_flags())
    del report["permutes"]
    return report


def timeline(hlo: str, *, mesh=None) -> list[dict[str, Any]]:
    """The entry computation as the scaling model times it, in schedule order: ``compute``
    events (``flops`` of convolutions and matrix products, ``bytes`` written by every other
    instruction that may launch work; consecutive ones merged) and collective events
    ``start`` / ``done`` (paired by ``id``) or ``sync``, with ``kind``, ``bytes`` and, for
    permutes with ``mesh``, ``axis``."""
    g = _graph(hlo, mesh)
    instrs, kinds, flops = g["instrs"], g["kinds"], g["flops"]
    free = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "copy-start", "copy-done")
    out: list[dict[str, Any]] = []
    ids: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        op = ins["op"]
        base = op.removesuffix("-start").removesuffix("-done")
        if base in ("collective-permute", "all-reduce", "all-gather", "reduce-scatter", "all-to-all"):
            if op.endswith("-done"):
                start = next((index for index in ids if instrs[index]["name"] in ins["operands"]), None)
                out.append({"event": "done", "id": ids.pop(start, -1)})
                continue
            event = {"event": "start" if op.endswith("-start") else "sync", "kind": base, "bytes": _message(ins)}
            if i in g["axes"]:
                event["axis"] = g["axes"][i]
            if op.endswith("-start"):
                ids[i] = event["id"] = i
            out.append(event)
            continue
        if op in free:
            continue
        # compute instructions are timed by their FLOPs, everything else by the bytes it writes
        written = 0 if kinds[i] else sum(_nbytes(d, s) for d, s in _arrays(ins["shape"]))
        if out and out[-1]["event"] == "compute":
            out[-1]["flops"] += flops[i]
            out[-1]["bytes"] += written
        else:
            out.append({"event": "compute", "flops": flops[i], "bytes": written})
    return out


def _layers(rows: list[dict]) -> list[dict]:
    """Per (pass, layer): permutes, bytes, overlapped bytes; ``reasons`` for the rest."""
    out: dict[tuple, dict] = {}
    for r in rows:
        e = out.setdefault(
            (r["pass"], r["layer"]),
            {"pass": r["pass"], "layer": r["layer"], "count": 0, "bytes": 0, "overlapped_bytes": 0, "why": {}},
        )
        e["count"] += 1
        e["bytes"] += r["bytes"]
        if r["overlapped"]:
            e["overlapped_bytes"] += r["bytes"]
            continue
        what = "synchronous (nothing between start and done)" if not r["fusions"] else "fusions only between"
        if r.get("independent_convolutions"):
            n, before = r["independent_convolutions"], r["independent_before_start"]
            why = f"the scheduler put the {n} independent convolution(s) elsewhere ({before} before the start, "
            why += f"{n - before} after the done)"
            if r["after_other_message"]:
                why += "; its face waits for an earlier message of the layer"
        elif r.get("weight_gradient_first"):
            why = "the layer's weight-gradient convolution is computed before the message is sent"
        else:
            why = "every convolution of the program feeds the message or needs it"
        e["why"].setdefault(why, {}).setdefault(what, 0)
        e["why"][why][what] += 1
    for e in out.values():
        e["reasons"] = [
            f"{why} ({', '.join(f'{n} {what}' for what, n in whats.items())})" for why, whats in e.pop("why").items()
        ]
    return list(out.values())


def scheduler_flags(xla_flags: str | None = None, effort: float | None = None) -> dict[str, Any]:
    """The switches of this process that decide whether XLA:GPU hides collectives:
    ``xla_gpu_enable_latency_hiding_scheduler`` (XLA_FLAGS; XLA's default is off),
    ``jax_exec_time_optimization_effort`` (>= :data:`LHS_EFFORT` also turns the
    scheduler on), a profile for profile-guided scheduling, and ``latency_hiding_scheduler``:
    whether the scheduler runs. ``xla_flags``/``effort`` given: those of another process."""
    import jax

    xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags

    def flag(name: str) -> str | None:
        found = re.findall(rf"--{name}=(\S+)", xla_flags)
        return found[-1] if found else None

    lhs = (flag("xla_gpu_enable_latency_hiding_scheduler") or "false").lower() in ("true", "1")
    effort = float(jax.config.jax_exec_time_optimization_effort if effort is None else effort)
    profile = flag("xla_gpu_pgle_profile_file_or_directory_path")
    return {
        "xla_gpu_enable_latency_hiding_scheduler": lhs,
        "jax_exec_time_optimization_effort": effort,
        "jax_memory_fitting_effort": float(jax.config.jax_memory_fitting_effort),
        "xla_gpu_pgle_profile_file_or_directory_path": profile,
        "latency_hiding_scheduler": lhs or effort >= LHS_EFFORT or bool(profile),
        "xla_flags": xla_flags,
    }


def format_schedule(report: dict[str, Any], compiler: str = "") -> str:
    """Lines for ``workbench plan``: overlapped halo bytes per pass, and the flags."""
    flags = report.get("flags") or {}
    lhs = flags.get("latency_hiding_scheduler")
    notes = [compiler] if compiler else []
    if lhs is not None:
        notes.append(
            f"latency-hiding scheduler {'on' if lhs else 'off'}, "
            f"exec_time_optimization_effort {flags['jax_exec_time_optimization_effort']:g}"
        )
    head = "halo overlap in the compiled schedule" + (f" ({'; '.join(notes)})" if notes else "")
    lines = [head + ":"]
    for name in ("forward", "backward"):
        p = report["passes"][name]
        if p["count"]:
            lines.append(
                f"  {name:<9}{p['overlapped']:>4} of {p['count']:<4}permutes with independent compute between "
                f"start and done: {p['overlapped_bytes'] / 2**20:.1f} of {p['bytes'] / 2**20:.1f} MiB "
                f"({p['overlapped_fraction']:.1%}); {p['sync']} synchronous"
            )
    if report["passes"]["total"]["count"] == 0:
        lines.append("  (no halo collective-permutes)")
    return "\n".join(lines)
