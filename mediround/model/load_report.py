"""Every weight load goes through here: missing, unexpected and mis-shaped keys are named, then refused.

A key that is missing or unexpected *by design* (e.g. the LoRA keys a base state dict does not hold) is
passed as ``expected`` and only recorded. ``allow_partial=True`` turns the refusal into a report of what
was left at its random initialisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mediround.errors import CheckpointError

MAX_NAMED = 8


@dataclass
class LoadReport:
    """What one load left out, brought in unused, or could not fit."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:MAX_NAMED]) + (f" (+{len(keys) - MAX_NAMED} more)" if len(keys) > MAX_NAMED else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        if self.mismatched:
            shown = ", ".join(f"{k} {list(a)} in file vs {list(b)} in model" for k, a, b in self.mismatched[:MAX_NAMED])
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {shown}")
        return "; ".join(parts) or "all keys matched"

    def raise_if_bad(self) -> LoadReport:
        if not self.ok:
            raise CheckpointError(f"{self.source}: weights do not match the model: {self.describe()}")
        return self


def report_from_lists(
    source: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, tuple, tuple]] = (),
    expected_missing: str | None = None,
) -> LoadReport:
    """A report from key lists; missing keys matching the regex ``expected_missing`` are by design."""
    pattern = re.compile(expected_missing) if expected_missing else None
    report = LoadReport(source, unexpected=sorted(unexpected), mismatched=list(mismatched))
    for key in sorted(missing):
        (report.expected_missing if pattern and pattern.search(key) else report.missing).append(key)
    return report


def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    expected_missing: str | None = None,
    allow_partial: bool = False,
    assign: bool = False,
) -> LoadReport:
    """Load ``state`` into ``module`` after checking names and shapes; raise ``CheckpointError`` on any
    surprise unless ``allow_partial`` (then mis-shaped keys are skipped and the report says so)."""
    own = module.state_dict(keep_vars=True)
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    report = report_from_lists(
        source,
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
        mismatched=mismatched,
        expected_missing=expected_missing,
    )
    if not allow_partial:
        report.raise_if_bad()
    bad = {k for k, _, _ in mismatched} | set(report.unexpected)
    module.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False, assign=assign)
    return report
