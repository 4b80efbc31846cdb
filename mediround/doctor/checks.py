"""The result type every doctor check returns: one row of the pre-flight table."""

from __future__ import annotations

from dataclasses import dataclass

OK = "ok"
WARN = "warn"
FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    """One pre-flight check: ``status`` is ``ok``, ``warn`` (the run works but look) or ``FAIL`` (it would fail)."""

    name: str
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def any_failed(results: list[CheckResult]) -> bool:
    """Whether a run with this setup would fail."""
    return any(result.failed for result in results)
