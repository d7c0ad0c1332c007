"""Lockstep groups: students that see the same batches train together, each batch read, decoded and moved
to the device once for all of them, each student stepping with its own random stream (stacked where they
can be: :mod:`.stack`)."""

from __future__ import annotations

from typing import Any, Callable
from .recipe import Recipe





def train_group(group: list[Recipe], on_step: Callable[[int], None] | None,
                 on_epoch: Callable[[Recipe, dict[str, Any]], None] | None, stack: bool | str = True) -> None:
    """Students that see the same batches, trained in lockstep: each batch is read, decoded and moved to the
    device once, then every student takes its step on it with its own random stream; ``stack``: students of
    one architecture and optimiser step as one stacked model (:mod:`student_trainer.stack`)."""
    from .stack import stacks

    lead = group[0]
    dist = lead.dist
    stacked, alone = stacks(group, auto=stack == "auto") if stack else ([], list(group))
    lead.loader.load_state_dict(lead.loader_state or {"epoch": 0, "seen": {}})  # shared: set where this group is
    for epoch in range(lead.start_epoch, lead.config.total_epochs + 1):
        for r in group:
            r.begin_epoch(epoch)
        budget = lead.per_epoch[epoch - 1]  # DDP: checkpoints only at epoch ends, so epochs start whole
        for i, b in enumerate(lead.loader.epoch(epoch)):
            if dist.on and i >= budget:
                break
            b = b.to(lead.device)
            settled = []  # stepped on this batch already: one by one from the next
            for stk in list(stacked):
                if not stk.try_step(b):  # cannot stack: its students step on this batch below
                    stacked.remove(stk)
                    alone += stk.members
                    continue
                stk.after_step(epoch)
                if stk.settled_alone:  # an AutoStack timed one by one as faster here
                    stacked.remove(stk)
                    settled += stk.members
            for r in alone:
                with r.own_rng():
                    r.step(b)
                r.after_step(epoch)
            alone += settled
            if on_step:
                on_step(lead.steps_done)
        for stk in stacked:
            stk.unload()
        for r in group:
            row = r.end_epoch(epoch)
            if dist.main and on_epoch:
                on_epoch(r, row)
        dist.barrier()


def together(recipes: list[Recipe]) -> list[list[Recipe]]:
    """Recipes split into groups that can train in lockstep: one loader (the same batches in the same order),
    the same epochs and checkpoint steps, and the same place to start from."""
    groups: dict[tuple, list[Recipe]] = {}
    for r in recipes:
        c = r.config
        key = (id(r.loader), c.total_epochs, c.checkpoint_every, r.position())
        groups.setdefault(key, []).append(r)
    return list(groups.values())
