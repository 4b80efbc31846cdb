"""What an inference run reports while it works: one method per event, each a no-op unless overridden."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mediround.inference.plan import Plan


class InferenceEvents:
    """Pass a subclass to ``run_inference`` (or ``evaluate_model``, ``run_demo``) to follow a run."""

    def planned(self, plan: Plan) -> None:
        """The data is loaded; ``plan.todo`` lists the dialogues still to predict."""

    def progressed(self, finished: int) -> None:
        """``finished`` dialogues of ``plan.todo`` are done so far (predicted or skipped); called from a
        background thread (the one writing the outputs, or the one watching re-launched workers)."""
