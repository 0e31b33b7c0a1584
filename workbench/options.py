"""Names a user picks from, defined once: backends, halo modes, model presets, optimisers.

The CLI's choices, the notebook panel's dropdowns and the napari widget's combo boxes
all read these tuples; the modules that implement them check against the same names.
Pure Python: importing it starts nothing.
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "PLAN_BACKENDS",
    "HALO_MODES",
    "COMM_OVERLAP",
    "PRESETS",
    "OPTIMIZERS",
    "SCHEDULES",
    "NORMS",
    "DTYPES",
]

# How a model runs: our shard_map + halo exchange, XLA's partitioner, or one device.
BACKENDS = ("explicit", "gspmd", "reference")
PLAN_BACKENDS = ("explicit", "gspmd")  # the partitioned ones: what a memory plan compares
# Halo modes: ``exact`` exchanges with neighbours; the rest pad each shard alone (to show
# seams) or, ``overlap``, read one input halo as wide as the receptive field. An integer
# is an overlap of that width.
HALO_MODES = ("exact", "zero", "reflect", "replicate", "overlap")
# Whether the explicit backend computes each convolution as interior + boundary shells so
# the halo messages travel while the interior is computed (workbench.model.interior):
# ``auto`` decides per layer and block (never on CPU), ``on`` splits wherever it can.
COMM_OVERLAP = ("auto", "on", "off")
PRESETS = ("small", "paper")
OPTIMIZERS = ("adam", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
NORMS = ("none", "batch", "group", "instance")
DTYPES = ("float32", "bfloat16", "float64")  # float64: verification only (jax_enable_x64)
