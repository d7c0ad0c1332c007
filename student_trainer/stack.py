"""Students of one architecture stepped as one model: parameters stacked, one vmapped forward.

Students that train in lockstep (the same batches in the same order) and share an architecture, an
optimiser and a schedule differ only in their weights' history and their loss (temperature, alpha, the
objective). :class:`Stack` holds their parameters, buffers and optimiser state stacked along a new first
dimension (``torch.func.stack_module_state``), runs one forward for all of them (``torch.func.vmap`` over
``functional_call``), sums their losses (each student's loss reaches only its own slice) and takes one
optimiser step. AdamW and SGD act elementwise, so one optimiser over the stack is each student's own.

What changes against training each alone: the vmapped kernels sum in another order (equal within float
rounding, not bit for bit), and random draws (dropout) come from one stream for the stack (the lead
student's), not one per student. A stacked run is still exactly resumable: every student's checkpoint holds
its own slice of everything, and the stack's random stream. Sixteen small students on a GPU cost a few times
one instead of sixteen times (``./dev bench stack``).

The students' own modules stay the record: :meth:`Stack.unload` writes each slice back (weights, buffers,
optimiser and schedule state, the loss sums) before every checkpoint and every epoch's evaluation.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

import torch

from darkstore.models import logits_of, preprocess

from . import objectives

if TYPE_CHECKING:
    from .recipe import Recipe


def stack_key(r: "Recipe") -> str | None:
    """Students with equal keys can be stacked; None: this one steps alone (two-stage objectives and
    regressor heads, fp16 loss scaling (skips steps per student), DDP)."""
    c = r.config
    if not r.stackable or len(r.stages) > 1 or r.hint_name is not None or c.amp == "fp16" or r.dist.on:
        return None
    if c.max_grad_norm or (c.decay == "matrices" and c.weight_decay):  # a norm or a shape per student, not per stack
        return None
    return json.dumps({"student": r.spec.model_dump(mode="json"), "optimizer": c.optimizer, "lr": c.lr,
                       "weight_decay": c.weight_decay, "schedule": c.schedule, "warmup": c.warmup, "amp": c.amp,
                       "betas": c.betas, "lr_floor": c.lr_floor, "device": r.device}, sort_keys=True)


def stacks(group: list["Recipe"], auto: bool = False) -> tuple[list["Stack | AutoStack"], list["Recipe"]]:
    """``group`` split into stacks (two or more students with one :func:`stack_key`) and the students that
    step alone; ``auto``: each stack times its first steps both ways and keeps the faster (:class:`AutoStack`)."""
    by_key: dict[str, list[Recipe]] = {}
    alone = []
    for r in group:
        k = stack_key(r)
        if k is None:
            alone.append(r)
        else:
            by_key.setdefault(k, []).append(r)
    out = []
    for members in by_key.values():
        if len(members) > 1:
            out.append(AutoStack(members) if auto else Stack(members))
        else:
            alone += members
    return out, alone


def _stack_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Optimiser state dicts of students (same parameter order) as one over stacked parameters."""
    lead = states[0]
    state = {}
    for j, st in lead["state"].items():
        state[j] = {k: (torch.stack([s["state"][j][k] for s in states]) if torch.is_tensor(v) and v.dim() > 0 else v)
                    for k, v in st.items()}
    return {"state": state, "param_groups": copy.deepcopy(lead["param_groups"])}


def _slice_state(sd: dict[str, Any], i: int) -> dict[str, Any]:
    return {"state": {j: {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 else
                              (v.clone() if torch.is_tensor(v) else v)) for k, v in st.items()}
                      for j, st in sd["state"].items()},
            "param_groups": copy.deepcopy(sd["param_groups"])}


class Stack:
    """Stacked students (see the module's doc). ``members[0]`` leads: its random stream drives the stack."""

    settled_alone = False  # a plain stack stays stacked (an :class:`AutoStack` may settle on stepping alone)

    def __init__(self, members: list["Recipe"], quiet: bool = False):
        from torch.func import functional_call, stack_module_state, vmap

        self.members = members
        lead = self.lead = members[0]
        self.params, self.buffers = stack_module_state([r.model for r in members])
        base = copy.deepcopy(lead.model).to("meta")
        base.train()
        self.forward = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None),
                            randomness="different")
        self.opt, self.sched = lead.optimiser(list(self.params.values()))
        if lead.opt.state:  # resumed: the students' optimiser states, stacked
            self.opt.load_state_dict(_stack_state([r.opt.state_dict() for r in members]))
        self.sched.load_state_dict(lead.sched.state_dict())
        for g, lg in zip(self.opt.param_groups, lead.opt.param_groups):
            g["lr"] = lg["lr"]
        self.proven = False  # set after the first step: a model vmap cannot run falls back before any change
        self.loss_sum = torch.zeros(len(members), dtype=torch.float64, device=lead.device)
        self.seen = 0
        for r in members:
            r.stacked_with = len(members) - 1
            if r.log and not quiet:
                r.log(f"stacked with {len(members) - 1} other student(s) of this architecture: one vmapped forward "
                      "and one optimiser step for all of them")

    def try_step(self, b) -> bool:
        """:meth:`step` in the lead's random stream. False when this model cannot be stacked (vmap refuses
        something in its forward on the first step): nothing of the members has changed, and they step alone
        from here."""
        lead = self.lead
        rng = lead.rng, lead.cuda_rng
        try:
            with lead.own_rng():
                self.step(b)
        except Exception as exc:  # noqa: BLE001 — any refusal of the first step; later errors are real
            if self.proven:
                raise
            lead.rng, lead.cuda_rng = rng
            for r in self.members:
                r.stacked_with = 0
                if r.log:
                    r.log(f"cannot stack this architecture ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                          "its students step one by one")
            return False
        self.proven = True
        return True

    def step(self, b) -> None:
        """One optimiser step of every member on a batch already on the device."""
        lead = self.lead
        with torch.autocast(lead.dev_type, dtype=lead.amp_dtype, enabled=lead.amp_dtype is not None):
            out = self.forward(self.params, self.buffers, preprocess(b.x, lead.spec.preprocess))
        logits = logits_of(out).float()
        loss = torch.stack([r.stage.objective.fn(objectives.Step(logits[i], b, alpha=r.config.alpha, soft=r.soft))
                            for i, r in enumerate(self.members)])
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        self.opt.step()
        self.sched.step()
        self.loss_sum += loss.detach().double() * len(b.labels)  # no host sync per step
        self.seen += len(b.labels)
        for r in self.members:
            r.steps_done += 1

    def after_step(self, epoch: int) -> None:
        """The members' checkpoints when due (the stack written back to them first)."""
        if self.lead.checkpoint_due():
            self.unload()
        for r in self.members:
            r.after_step(epoch)

    def unload(self) -> None:
        """Write every member's slice back to its own model, optimiser, schedule, loss sums and random stream:
        its checkpoint and evaluation see exactly where it stands."""
        sums = self.loss_sum.tolist()
        opt_sd, sched_sd = self.opt.state_dict(), self.sched.state_dict()
        with torch.no_grad():
            for i, r in enumerate(self.members):
                for n, p in r.model.named_parameters():
                    p.copy_(self.params[n][i])
                for n, buf in r.model.named_buffers():
                    buf.copy_(self.buffers[n][i])
                r.opt.load_state_dict(_slice_state(opt_sd, i))
                r.sched.load_state_dict(sched_sd)
                r.add_sums(sums[i], self.seen)
                if r is not self.lead:
                    r.rng, r.cuda_rng = self.lead.rng, self.lead.cuda_rng
        self.loss_sum.zero_()
        self.seen = 0


class AutoStack:
    """A stack that measures which way is faster on this model and device, as a sweep runs: its first steps
    stacked, then as many with each student stepping alone, and the faster way for the rest of the run.

    Which wins depends on the model and the device (a thin CNN or an MLP on small inputs gains from stacking;
    on two CPU cores a convolution over 64×64 inputs is compute-bound and stacking only adds copies:
    ``./dev bench stack``), so it is timed rather than guessed. Either way the students reach the same weights
    within float rounding; a run that must match a lone ``train`` bit for bit uses ``stack=False``."""

    WARM, TIMED = 1, 3  # untimed first steps of each way (first-use costs), then timed ones

    def __init__(self, members: list["Recipe"]):
        self.members, self.lead = members, members[0]
        self.stack: Stack | None = Stack(members)
        self.mode = "trial-stacked"  # then "trial-alone", then "stacked" or "alone"
        self.times: dict[str, list[float]] = {"trial-stacked": [], "trial-alone": []}
        self.steps = 0

    @property
    def settled_alone(self) -> bool:
        return self.mode == "alone"

    def try_step(self, b) -> bool:
        t0 = self._clock()
        if self.mode in ("trial-stacked", "stacked"):
            if not self.stack.try_step(b):
                return False
        else:
            for r in self.members:
                with r.own_rng():
                    r.step(b)
        if self.mode.startswith("trial"):
            self._timed(self._clock() - t0)
        return True

    def after_step(self, epoch: int) -> None:
        if self.stack is not None and self.mode in ("trial-stacked", "stacked"):
            self.stack.after_step(epoch)
        else:
            for r in self.members:
                r.after_step(epoch)

    def unload(self) -> None:
        if self.stack is not None and self.mode in ("trial-stacked", "stacked"):
            self.stack.unload()

    def _clock(self) -> float:
        import time

        if self.lead.dev_type == "cuda":
            torch.cuda.synchronize(self.lead.device)
        return time.perf_counter()

    def _timed(self, seconds: float) -> None:
        self.steps += 1
        if self.steps > self.WARM:
            self.times[self.mode].append(seconds)
        if len(self.times[self.mode]) < self.TIMED:
            return
        self.steps = 0
        if self.mode == "trial-stacked":
            self.stack.unload()  # the students' own modules carry on from here
            self.mode = "trial-alone"
        else:
            self._decide()

    def _decide(self) -> None:
        import statistics

        stacked = statistics.median(self.times["trial-stacked"])
        alone = statistics.median(self.times["trial-alone"])
        n = len(self.members)
        if alone < stacked:
            self.mode, self.stack = "alone", None
            for r in self.members:
                r.stacked_with = 0
        else:
            self.mode, self.stack = "stacked", Stack(self.members, quiet=True)
        for r in self.members:
            if r.log:
                r.log(f"timed {n} students: {1e3 * stacked:.1f} ms a step stacked, {1e3 * alone:.1f} ms one by "
                      f"one; they step {'one by one' if self.mode == 'alone' else 'stacked'} from here")
