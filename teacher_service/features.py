"""Teacher features kept beside the targets (FitNets' hints): taps on named layers and their fixed reductions.

A :class:`FeatureTaps` registers a forward hook on each named module of each named teacher; after the
ensemble's forward pass, :meth:`FeatureTaps.collect` returns every tapped output reduced as its
:class:`storage.schema.FeatureRecord` says (adaptive average pooling, then a seeded Gaussian projection)
and flattened side by side, in record order: one ``[B, D]`` float32 tensor, the store's ``features``
field. Forward hooks see exactly what the module returns, whatever the model's code, so any
``nn.Module`` teacher works (TorchScript and exported programs have no hooks and are refused).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from darkstore.errors import SpecError
from darkstore.models import LoadedModel
from storage.schema import FeatureRecord


def projection(record: FeatureRecord, in_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed [in_dim, project] matrix of ``record``: N(0, 1/project) entries from a CPU generator seeded
    by ``record.seed`` (the same on every machine), moved to ``device``."""
    g = torch.Generator().manual_seed(record.seed)
    return (torch.randn(in_dim, record.project, generator=g) / math.sqrt(record.project)).to(device)


def reduce(record: FeatureRecord, out: torch.Tensor, proj: torch.Tensor | None = None) -> torch.Tensor:
    """[B, ...] layer output -> [B, size]: pooled, flattened, projected (float32)."""
    v = out.float()
    if record.pool is not None:
        if v.ndim != 4:
            raise SpecError(f"feature {record.name}: pool needs a [B, C, H, W] output, the layer gives "
                            f"{list(v.shape)}")
        v = F.adaptive_avg_pool2d(v, record.pool)
    v = v.flatten(1)
    if record.project is not None:
        v = v @ (proj if proj is not None else projection(record, v.shape[1], v.device))
    return v


def _module(member: LoadedModel, layer: str) -> torch.nn.Module:
    if not isinstance(member.module, torch.nn.Module) or isinstance(member.module, torch.jit.ScriptModule):
        raise SpecError(f"teacher {member.name!r} is a {member.format} program: its layers cannot be tapped; keep "
                        "features of nn.Module teachers (weights files)")
    try:
        return member.module.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in member.module.named_modules() if n]
        shown = ", ".join(names[:12]) + (f" … ({len(names)} modules)" if len(names) > 12 else "")
        raise SpecError(f"teacher {member.name!r} has no layer {layer!r}; its modules: {shown}") from None


class FeatureTaps:
    """Forward hooks on the recorded layers; :meth:`collect` after each forward pass."""

    def __init__(self, members: Sequence[LoadedModel], records: Sequence[FeatureRecord]):
        by_name = {m.name: m for m in members}
        self.records = list(records)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.records)
        self.proj: list[torch.Tensor | None] = [None] * len(self.records)
        self.handles = []
        for i, r in enumerate(self.records):
            if r.teacher not in by_name:
                raise SpecError(f"feature {r.name}: no teacher named {r.teacher!r} (teachers: {', '.join(by_name)})")
            self.handles.append(_module(by_name[r.teacher], r.layer).register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise SpecError(f"feature {self.records[i].name}: the layer returns a {type(output).__name__}, "
                                "not a tensor; tap a module that returns one")
            self.outputs[i] = output.detach()
        return hook

    def collect(self) -> torch.Tensor:
        """[B, D] float32: the last forward pass's tapped outputs, reduced and side by side."""
        parts = []
        for i, (r, out) in enumerate(zip(self.records, self.outputs)):
            if out is None:
                raise SpecError(f"feature {r.name}: the layer did not run in the teacher's forward pass")
            if r.project is not None and self.proj[i] is None:
                pooled = reduce(r.model_copy(update={"project": None}), out)
                self.proj[i] = projection(r, pooled.shape[1], out.device)
            parts.append(reduce(r, out, self.proj[i]))
        self.outputs = [None] * len(self.records)
        return torch.cat(parts, dim=1)

    def shapes(self) -> list[list[int]]:
        """Per-row stored shape of each record, from the last forward pass (call before :meth:`collect`)."""
        out = []
        for r, o in zip(self.records, self.outputs):
            if o is None:
                raise SpecError(f"feature {r.name}: the layer did not run in the teacher's forward pass")
            if r.project is not None:
                out.append([r.project])
            elif r.pool is not None:
                if o.ndim != 4:
                    raise SpecError(f"feature {r.name}: pool needs a [B, C, H, W] output, the layer gives "
                                    f"{list(o.shape)}")
                out.append([int(o.shape[1]), r.pool, r.pool])
            else:
                out.append([int(s) for s in o.shape[1:]])
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
