"""The ways of attending that bench-io compares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of attending: ``method`` with ``estimator`` (rc only) at ``budget`` (topk, rc),
    choosing what to read with ``selector`` (topk, rc; named in the key unless exact)."""

    method: str
    estimator: str | None = None
    budget: float | None = None
    selector: str = "exact"

    @property
    def name(self) -> str:
        base = f"rc-{self.estimator}" if self.method == "rc" else self.method
        return base if self.selector == "exact" else f"{base}-{self.selector}"

    @property
    def key(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget:g}"
