"""Survive a device that drops out: re-plan on the others and run the request again.

Every rank holds the whole input, so when a rank dies, is killed or stops answering
during a prefill (the launcher names it: :attr:`RunnerError.lost
<astra.parallel.job.RunnerError>`), nothing of the request is lost but time:
:func:`run_planned` re-plans without that device and runs the request again on the
ones left, until it completes or one device is left to fail. A rank that fails with an
error of its own (a Python exception: bad input, a bug) is not a drop-out: every device
would fail alike, so the error is raised as it is.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, Tuple

from .job import RunnerError
from .planner import Plan

__all__ = ["Loss", "run_planned", "report"]


@dataclass
class Loss:
    """A device lost during a run: its index among the request's devices, its rank in
    that attempt, seconds from the attempt's start to the launcher's verdict, the first
    line of the verdict, and the plan that ran on the devices left."""

    device: int
    rank: int
    after_s: float
    why: str
    replan: Plan


def run_planned(first: Plan, attempt: Callable[[Plan, int], Any],
                replan: Callable[[Sequence[int]], Plan], devices: Sequence[int]
                ) -> Tuple[Any, Plan, List[Loss]]:
    """Run ``attempt(plan, tries)`` (``tries``: earlier attempts); on a drop-out, call
    ``replan(devices left)`` and attempt again. Returns ``(what the successful attempt
    returned, its plan, the losses)``."""
    plan, alive, losses = first, list(devices), []
    while True:
        t0 = time.monotonic()
        try:
            return attempt(plan, len(losses)), plan, losses
        except RunnerError as e:
            after = time.monotonic() - t0
            gone = [plan.devices[r] for r in e.lost if r < len(plan.devices)]
            left = [d for d in alive if d not in gone]
            if not gone or not left:
                raise
            alive = left
            plan = replan(alive)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            losses += [Loss(d, plan_rank, after, why, plan)
                       for d, plan_rank in zip(gone, e.lost)]


def report(loss: Loss) -> str:
    """One line: which device was lost, when, and the plan that completed the request."""
    return (f"device {loss.device} (rank {loss.rank}) was lost {loss.after_s:.1f} s into the "
            f"run ({loss.why.rstrip('.')}); re-planned without it: "
            f"{loss.replan.line().removeprefix('plan: ')}")
