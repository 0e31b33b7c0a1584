"""The panel's live memory estimate: a label that follows the controls without freezing them.

:class:`EstimateView` submits a :class:`~workbench.app.planning.PlanKey` to a
:class:`~workbench.app.planning.MemoryEstimator` (a background thread and a cache) and shows
the planner's per-device bytes against the budget when they arrive; a newer key replaces
an older one, and changing the budget does not recompile.
"""

from __future__ import annotations

import concurrent.futures
import html

import ipywidgets as W

from workbench.app.planning import MemoryEstimator, PlanKey, fits_line
from workbench.errors import USER_ERRORS, UserError, one_line

__all__ = ["EstimateView", "red", "green"]


def red(text: str) -> str:
    return f'<span style="color:#b00020">{html.escape(text)}</span>'


def green(text: str) -> str:
    return f'<span style="color:#1b7a1b">{html.escape(text)}</span>'


class EstimateView:
    """Controls ``plan_for`` and ``budget``, the ``label``, and the estimate's state."""

    def __init__(
        self,
        estimator: MemoryEstimator | None = None,
        *,
        mode: str = "background",
        budget_gib: float = 16.0,
        plan_for: str = "inference",
        style=None,
    ):
        if mode not in ("background", "sync", "off"):
            raise UserError(f"estimate={mode!r}; use 'background', 'sync' or 'off'")
        if plan_for not in ("inference", "training"):
            raise UserError(f"plan_for={plan_for!r}; use 'inference' or 'training'")
        self.estimator = estimator or MemoryEstimator()
        self.mode = mode
        self.key: PlanKey | None = None
        self.blocked: str | None = None  # why no key can be built from the choices
        self.fits: bool | None = None
        self.last: dict | None = None
        self.plan_for = W.ToggleButtons(
            options=["inference", "training"], value=plan_for, description="plan for", style={"button_width": "92px"}
        )
        self.budget = W.BoundedFloatText(
            value=budget_gib,
            min=1e-6,
            max=1e6,
            step=1.0,
            description="budget GiB/dev",
            style=style or {},
            layout=W.Layout(width="200px"),
        )
        self.label = W.HTML()
        self.budget.observe(self._on_budget, names="value")

    @property
    def train(self) -> bool:
        return self.plan_for.value == "training"

    def block(self, reason: str) -> None:
        """No estimate for these choices (the panel shows ``reason`` elsewhere)."""
        self.key, self.blocked, self.label.value = None, reason, ""
        self.fits = self.last = None

    def refresh(self, key: PlanKey) -> None:
        """(Re)start the planner for ``key``; the label updates when it is done."""
        self.key, self.blocked = key, None
        self.fits = self.last = None
        if self.mode == "off":
            self.label.value = "memory estimate off"
            return
        future = self.estimator.submit(key)
        if not future.done():
            self.label.value = "estimating per-device memory (compiling ahead of time, nothing is allocated)…"
            future.add_done_callback(lambda f, k=key: self._show(k, f))
        if self.mode == "sync":
            concurrent.futures.wait([future])
        if future.done():
            self._show(key, future)

    def wait(self, timeout: float | None = None) -> dict:
        """Wait for the current estimate; returns the planner's bytes (raises its error)."""
        if self.key is None:
            raise UserError(self.blocked or "no valid configuration to estimate; fix the choices first")
        key = self.key
        future = self.estimator.submit(key)
        concurrent.futures.wait([future], timeout)
        self._show(key, future)
        return future.result(0)

    def _show(self, key: PlanKey, future: concurrent.futures.Future) -> None:
        if key != self.key or not future.done():
            return  # a newer choice replaced this one
        err = future.exception()
        if err is not None:
            self.fits = None
            prefix = "" if isinstance(err, USER_ERRORS) else f"planner failed ({type(err).__name__}): "
            self.label.value = red(prefix + one_line(err))
            return
        stats = future.result()
        self.last = stats
        self.fits, text = fits_line(stats, self.budget.value)
        mode = "training step" if key.train else "inference"
        self.label.value = (green if self.fits else red)(f"{mode}: {text}")

    def _on_budget(self, change=None) -> None:
        if self.key is not None:
            self._show(self.key, self.estimator.submit(self.key))
