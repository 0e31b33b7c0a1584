"""nnU-Net's five-fold cross-validation split (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["crossval_folds", "N_FOLDS", "SPLIT_SEED"]

N_FOLDS = 5
SPLIT_SEED = 12345  # nnU-Net's


def crossval_folds(names, n_folds: int = N_FOLDS, seed: int = SPLIT_SEED) -> list[tuple[list[str], list[str]]]:
    """nnU-Net's split: ``sklearn.model_selection.KFold(n_folds, shuffle=True,
    random_state=seed)`` over ``sorted(names)``, as (training, validation) name lists.

    With fewer cases than folds the last folds are empty (KFold refuses; see
    :meth:`Dataset.split`).

    Examples
    --------
    >>> crossval_folds([f"c{i}" for i in range(6)])[0]
    (['c0', 'c1', 'c2', 'c4'], ['c3', 'c5'])
    """
    names = sorted(names)
    n = len(names)
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)  # sklearn's check_random_state(seed).shuffle
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    folds, start = [], 0
    for size in sizes:
        mask = np.zeros(n, bool)
        mask[order[start : start + size]] = True
        start += size
        folds.append(([names[i] for i in np.flatnonzero(~mask)], [names[i] for i in np.flatnonzero(mask)]))
    return folds
