"""Where the panel's results appear: one status line, one output area, the figures shown.

:class:`Display` owns the status line (a user error is one red line there, ``error``
holds its text), the output area figures are drawn into (kept in ``figures`` by name),
and the button handler that runs an action with both in place.
"""

from __future__ import annotations

import html
from typing import Any

from workbench.analysis.figures import _pyplot
from workbench.errors import USER_ERRORS, one_line
from workbench.ui.estimate import red

__all__ = ["Display"]


class Display:
    """The status line and output area of a panel (widgets from :class:`~workbench.ui.controls.Controls`)."""

    def __init__(self, status, output):
        self.status, self.output = status, output
        self.error: str | None = None
        self.figures: dict[str, Any] = {}

    def show_error(self, err: BaseException | str) -> None:
        """One red line (``error`` holds the text)."""
        self.error = err if isinstance(err, str) else one_line(err)
        self.status.value = red(self.error)

    def clear_error(self) -> None:
        self.error = None
        self.status.value = ""

    def show_status(self, text: str) -> None:
        self.status.value = html.escape(text)

    def show_figure(self, name: str, fig) -> None:
        """Draw ``fig`` in the output area and keep it as ``figures[name]``."""
        from IPython.display import display

        self.figures[name] = fig
        with self.output:
            display(fig)
        _pyplot().close(fig)

    def show_widget(self, widget) -> None:
        """Show a widget (the notebook viewer) in the output area, below the panel."""
        from IPython.display import display

        with self.output:
            display(widget)

    def on_click(self, button, action) -> None:
        """Run ``action`` when ``button`` is clicked: a user error becomes the red line; a
        bug shows its traceback in the output area."""

        def handler(_button=None):
            self.clear_error()
            button.disabled = True
            try:
                with self.output:
                    try:
                        action()
                    except USER_ERRORS as err:
                        self.show_error(err)
            finally:
                button.disabled = False

        button.on_click(handler)
