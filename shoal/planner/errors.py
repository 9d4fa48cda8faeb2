"""The planner's one error type: bad input to `shoal plan` (unknown chip, bad layout, infeasible SLO)."""

from __future__ import annotations

from shoal.errors import ShoalError


class PlanError(ShoalError, ValueError):
    """A plan cannot be made from this input; the message says why and what to change."""
