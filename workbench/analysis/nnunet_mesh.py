"""The smallest mesh whose per-device memory fits a budget, for an nnU-Net network on a whole volume.

:func:`mesh_for` picks, for a device count, the z×y×x split of a volume that pads least and
gives the most cube-like blocks (every block a multiple of the network's strides, no shard of
padding only). :func:`smallest_mesh` compiles (:func:`~workbench.analysis.nnunet_memory.spec_memory`)
one device count after another, powers of two, and returns the smallest whose compiled step
fits: the first guess comes from the single-device figure divided by the devices, and every
answer is a compiled figure (a count fits when its own compile fits and half of it does not).

Example
-------
>>> mesh_for((128, 512, 512), (8, 32, 32), 16)
MeshSpec(z=1, y=4, x=4, data=1)
"""

from __future__ import annotations

from workbench.errors import UserError
from workbench.mesh import MeshSpec

__all__ = ["mesh_for", "smallest_mesh", "NothingFits", "GIB"]

GIB = 2**30


class NothingFits(UserError):
    """No mesh up to the largest device count fits the budget (names the smallest need)."""


def _devices(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def mesh_for(shape, multiple, n_devices: int) -> MeshSpec | None:
    """The z×y×x split of ``n_devices`` for a ``shape`` volume whose blocks must be multiples of
    ``multiple``: least padding, then the most cube-like block; None when every split leaves a
    shard holding padding only."""
    best, best_key = None, None
    for z in range(1, n_devices + 1):
        if n_devices % z:
            continue
        for y in range(1, n_devices // z + 1):
            if (n_devices // z) % y:
                continue
            split = (z, y, n_devices // z // y)
            padded = [_round_up(n, s * m) for n, s, m in zip(shape, split, multiple)]
            block = [p // s for p, s in zip(padded, split)]
            if any((s - 1) * b >= n for s, b, n in zip(split, block, shape)):
                continue  # the last shard on that axis would hold padding only
            volume = padded[0] * padded[1] * padded[2]
            key = (volume, max(block) / min(block), split)
            if best_key is None or key < best_key:
                best, best_key = MeshSpec(*split), key
    return best


def smallest_mesh(
    spec,
    shape,
    budget_gib: float,
    *,
    train: bool = True,
    dtype: str = "bfloat16",
    compiler: str | None = None,
    max_devices: int = 512,
    measured: dict | None = None,
    log=None,
) -> dict:
    """The smallest power-of-two device count (with :func:`mesh_for`'s split) whose compiled
    step of ``spec`` on ``shape`` fits ``budget_gib`` per device.

    Returns ``{"mesh", "devices", "bytes_per_device", "memory", "fits": True, "tried": [...]}``;
    raises :class:`NothingFits` naming the smallest per-device need found when no count up to
    ``max_devices`` fits. ``measured`` (a dict) caches compiled figures across calls (e.g. the
    same network for two budgets)."""
    from workbench.analysis.nnunet_memory import spec_memory
    from workbench.analysis.plan import _size

    if isinstance(budget_gib, bool) or not isinstance(budget_gib, (int, float)) or not budget_gib > 0:
        raise UserError(f"--budget-gib {budget_gib!r} must be a positive number of GiB per device (e.g. 80)")
    budget = int(budget_gib * GIB)
    measured = {} if measured is None else measured
    counts = [2**k for k in range(max_devices.bit_length()) if 2**k <= max_devices]
    counts = [n for n in counts if mesh_for(shape, spec.multiple, n) is not None]
    if not counts:
        raise UserError(f"no mesh splits a {'x'.join(map(str, shape))} volume; check the shape")

    def measure(n: int) -> dict:
        mesh = mesh_for(shape, spec.multiple, n)
        key = (spec, tuple(shape), str(mesh), train, dtype, compiler)
        if key not in measured:
            if log:
                log(f"  compiling the {'training step' if train else 'inference'} on {mesh} ({_devices(n)})...")
            measured[key] = spec_memory(spec, shape, mesh, train=train, dtype=dtype, compiler=compiler)
            r = measured[key]
            if log:
                log(f"    {_size(r['bytes_per_device'])}/device ({r['compile_seconds']:.0f} s to compile)")
        return measured[key]

    results: dict[int, dict] = {}
    i = 0
    results[counts[0]] = measure(counts[0])
    if results[counts[0]]["bytes_per_device"] > budget:
        total = results[counts[0]]["bytes_per_device"] * counts[0]
        i = next((k for k, n in enumerate(counts) if total / n <= budget), len(counts) - 1)
        results[counts[i]] = measure(counts[i])
        if results[counts[i]]["bytes_per_device"] <= budget:  # walk down while half still fits
            while i > 0 and counts[i - 1] not in results:
                results[counts[i - 1]] = measure(counts[i - 1])
                if results[counts[i - 1]]["bytes_per_device"] > budget:
                    break
                i -= 1
        else:  # walk up until it fits
            while i + 1 < len(counts) and results[counts[i]]["bytes_per_device"] > budget:
                i += 1
                results[counts[i]] = measure(counts[i])
    tried = [
        {
            "mesh": r["mesh"],
            "devices": n,
            "bytes_per_device": r["bytes_per_device"],
            "fits": r["bytes_per_device"] <= budget,
        }
        for n, r in sorted(results.items())
    ]
    fitting = [n for n, r in results.items() if r["bytes_per_device"] <= budget]
    if not fitting:
        least = min(results.values(), key=lambda r: r["bytes_per_device"])
        raise NothingFits(
            f"no mesh up to {_devices(counts[-1])} fits {budget_gib:g} GiB/device: the smallest need found is "
            f"{least['bytes_per_device'] / GIB:.2f} GiB/device on {least['mesh']} ({_devices(least['devices'])}); "
            f"raise --budget-gib to {least['bytes_per_device'] / GIB:.2f} or allow more devices (--max-devices)"
        )
    best = results[min(fitting)]
    return {
        "mesh": best["mesh"],
        "devices": best["devices"],
        "bytes_per_device": best["bytes_per_device"],
        "memory": best["memory"],
        "padded_shape": best["padded_shape"],
        "block_shape": best["block_shape"],
        "compiler": best["compiler"],
        "fits": True,
        "tried": tried,
    }
