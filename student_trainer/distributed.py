"""The distributed wrapper: torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and the few
collective operations the recipe needs; a world of one without it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch




@dataclass
class Dist:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); world 1 without it."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: str) -> str:
        if not self.on:
            return device
        import torch.distributed as dist

        if device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.owns_group = True
        return device

    def all_min(self, values: list[int], device: str) -> list[int]:
        if not self.on:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [int(v) for v in t.tolist()]

    def all_sum(self, values: list[float], device: str) -> list[float]:
        if not self.on:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
