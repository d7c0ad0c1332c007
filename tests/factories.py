"""Factories that tests load through `module:function` (code the operator allows)."""

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
