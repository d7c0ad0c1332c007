"""Online distillation in plain PyTorch, one student per process: the teacher ensemble runs at every step.

    python bench/online_kd.py --teachers ensemble.yaml --data x.npz --epochs 2 --batch-size 128 --seed 0

The reference that ``bench/offline_vs_online.py`` runs as whole processes against darkstore's CLI
(what an online-distillation user runs: teachers loaded, then every batch goes through them and the
student). The same student, loss (Hinton's KD at T = 4, α = 0.9, geometric-mean targets) and batch
size as the offline runs. Prints the wall time of its training loop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from _common import machine  # (importing _common puts the repository on the path, for the architectures)

from darkstore.models import build_model  # the architectures only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teachers", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t_start = time.perf_counter()
    ens = yaml.safe_load(open(a.teachers))
    c = ens["num_classes"]
    members = []
    for m in ens["members"]:
        model = build_model(m["arch"], c, **m.get("arch_kwargs", {}))
        model.load_state_dict(load_file(m["weights"]))
        members.append(model.eval())
    d = np.load(a.data)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"]).long()
    torch.manual_seed(a.seed)
    student = build_model("mlp", c, in_features=int(np.prod(x.shape[1:])), hidden=[a.hidden])
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr)
    rng = np.random.default_rng(a.seed)
    T, alpha = 4.0, 0.9
    t0 = time.perf_counter()
    for _ in range(a.epochs):
        perm = torch.from_numpy(rng.permutation(len(x)))
        for s in range(0, len(x), a.batch_size):
            r = perm[s:s + a.batch_size]
            xb, yb = x[r], y[r]
            with torch.no_grad():
                z = torch.stack([m(xb) for m in members]).mean(0)  # geometric mean of the members, as logits
            out = student(xb)
            soft = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(z / T, -1), log_target=True,
                            reduction="batchmean") * T * T
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    print(f"online: {time.perf_counter() - t0:.3f} s training, {time.perf_counter() - t_start:.3f} s after imports "
          f"({machine()})")


if __name__ == "__main__":
    main()
