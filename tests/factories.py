"""Factories that tests load through `module:function` (code the operator allows)."""

import time

import numpy as np
import torch

from darkstore.models import MLP


def digits_like(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((n, 1, 8, 8), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 5, n))
    return torch.utils.data.TensorDataset(x, y)


def tiny_mlp(num_classes: int = 5):
    torch.manual_seed(0)
    return MLP(64, num_classes, hidden=[8])


class Slow(torch.nn.Module):
    """A teacher that takes its time and counts its forward passes in a file (across processes)."""

    def __init__(self, inner: torch.nn.Module, delay: float, counter: str | None, rows: str | None = None):
        super().__init__()
        self.inner, self.delay, self.counter, self.rows = inner, delay, counter, rows

    def forward(self, x):
        import os

        for path, n in ((self.counter, 1), (self.rows, x.shape[0] if x.shape[0] > 2 else 0)):
            if path and n:  # one byte per forward, or per row computed (the probe left out)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, b"x" * n)
                os.close(fd)
        if x.shape[0] > 2:  # the class-count probe (2 rows) stays quick
            time.sleep(self.delay)
        return self.inner(x)


def slow_mlp(num_classes: int = 5, delay: float = 0.1, counter: str | None = None, seed: int = 0,
             rows: str | None = None):
    torch.manual_seed(seed)
    inner = MLP(64, num_classes, hidden=[16])
    for p in inner.parameters():
        p.data.mul_(3.0)
    return Slow(inner, delay, counter, rows)


class Recorder(torch.nn.Module):
    """A teacher that saves every input it is given (to ``folder/NNNNN.pt``), to compare the
    pixels a teacher saw at generation with what a loader rebuilds."""

    def __init__(self, inner: torch.nn.Module, folder: str):
        super().__init__()
        self.inner, self.folder, self.calls = inner, folder, 0

    def forward(self, x):
        import os

        os.makedirs(self.folder, exist_ok=True)
        torch.save(x.detach().cpu().clone(), os.path.join(self.folder, f"{self.calls:05d}.pt"))
        self.calls += 1
        return self.inner(x)


def recording_mlp(folder: str, num_classes: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    inner = MLP(64, num_classes, hidden=[16])
    for p in inner.parameters():
        p.data.mul_(3.0)
    return Recorder(inner, folder)


class Checked(torch.nn.Module):
    """A student whose forward reads a value back to Python (``.item()``): ``torch.func.vmap`` cannot run it,
    so students of it cannot be stacked."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        if out.abs().max().item() > 1e6:
            raise FloatingPointError("logits ran away")
        return out


def checked_mlp(num_classes: int = 5):
    return Checked(MLP(64, num_classes, hidden=[16]))


def dict_items(n: int = 8):
    """A dataset whose items are dicts, as a Hugging Face dataset's are."""
    rng = np.random.default_rng(0)
    return [{"image": rng.random((1, 8, 8), dtype=np.float32), "label": i % 5} for i in range(n)]



class PidRecording(torch.utils.data.Dataset):
    """``digits_like`` samples; reading one leaves a file ``<pid>-<parent pid>`` in ``folder``, so a test can tell
    which processes decoded the transfer set."""

    def __init__(self, n: int, folder: str, seed: int):
        self.inner, self.folder = digits_like(n, seed), folder

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        import os
        from pathlib import Path

        Path(self.folder, f"{os.getpid()}-{os.getppid()}").touch()
        return self.inner[i]


def pid_recording(n: int = 40, folder: str = ".", seed: int = 0):
    return PidRecording(n, folder, seed)


def slow_digits(delay: float, started: str, n: int = 40):
    """``digits_like`` after a pause; ``started`` is created when the pause begins (a check in progress)."""
    from pathlib import Path

    Path(started).touch()
    time.sleep(delay)
    return digits_like(n)
