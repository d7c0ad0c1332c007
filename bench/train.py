"""Training efficiency: a student trained with targets streamed from the store (chunk loader,
read-ahead) against the same loop with every target preloaded in memory.

    ./dev bench train [--rows 50000 --classes 100 --epochs 2 --hidden 512]

Both loops see the same batches in the same order and run the same model, loss and optimiser;
only where the targets come from differs. The loader shuffles within the window ``train`` uses by default. Last line: ``train_efficiency: <preloaded / streamed>``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import alternate, paired_ratio, images, machine, med, teachers

from darkstore.transfer import open_transfer_set
from darkstore.models import build_model
from storage import open_store
from student_trainer import losses
from student_trainer.config import TrainConfig
from student_trainer.loader import Batch, make_loader, window_chunks
from teacher_service.generate import generate
from teacher_service.spec import JobSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=512, help="student MLP hidden width")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=15, help="alternated pairs (this VM drifts ±10 %% run to run)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="darkstore-bench-"))
    try:
        data_path = images(tmp / "x.npz", a.rows, shape=(3, 16, 16), classes=a.classes)
        members = teachers(tmp / "t", 1, a.classes, "mlp", in_features=768, hidden=[32])
        spec = JobSpec.model_validate({"teachers": {"num_classes": a.classes, "members": members},
                                       "data": {"kind": "arrays", "path": str(data_path)},
                                       "chunk_rows": a.chunk_rows})
        store = open_store(generate(spec, tmp / "store").path)
        data = open_transfer_set(store.meta.transfer_set.spec)
        rows = np.arange(a.rows)
        cuda = a.device.startswith("cuda")
        # the shuffle window `train` uses by default (a store this size shuffles whole)
        window = window_chunks(store.meta, TrainConfig.model_fields["shuffle_buffer_mb"].default)
        loader = make_loader(store, rows, batch_size=a.batch_size, seed=0, num_workers=a.num_workers, data=data,
                             pin_memory=cuda, buffer_chunks=window)
        # the preloaded alternative: every target in memory, inputs from the same in-memory set
        everything = store.read_all()

        def preloaded_epoch(epoch: int):
            stream = loader.stream
            stream.epoch = epoch
            for shard in stream.shards():
                for r in stream.plan(shard):
                    x, _ = data.get_batch(everything.index[r])
                    yield Batch(x, torch.from_numpy(everything.logits[r]), torch.from_numpy(everything.labels[r]),
                                torch.from_numpy(r))

        def run(batches_of_epoch):
            def go():
                torch.manual_seed(0)
                model = build_model("mlp", a.classes, in_features=768, hidden=[a.hidden]).to(a.device)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                for e in range(a.epochs):
                    for b in batches_of_epoch(e):
                        b = b.to(a.device)
                        s = model(b.x)
                        loss = losses.kd_loss(s, torch.log_softmax(b.logits.float() / 4.0, -1), b.labels,
                                              temperature=4.0, alpha=0.9)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                if cuda:
                    torch.cuda.synchronize()
            return go

        pre, streamed = run(preloaded_epoch), run(loader.epoch)
        pre()
        streamed()
        tp, ts = alternate(pre, streamed, a.repeats)
        p, s = med(tp), med(ts)
        n = a.rows * a.epochs
        print(f"machine: {machine()}")
        print(f"store: {a.rows} rows x {a.classes} classes, float16/zstd, chunks of {a.chunk_rows}; student "
              f"mlp(768->{a.hidden}->{a.classes}), batch {a.batch_size}, {a.epochs} epochs, "
              f"{a.num_workers} loader workers, device {a.device}")
        print(f"targets preloaded in memory: {p:.3f} s ({n / p:,.0f} rows/s)   runs {', '.join(f'{t:.3f}' for t in tp)}")
        print(f"targets streamed from store: {s:.3f} s ({n / s:,.0f} rows/s)   runs {', '.join(f'{t:.3f}' for t in ts)}")
        m, lo, hi = paired_ratio(tp, ts)
        print(f"median of the {a.repeats} paired ratios (the headline) {m:.3f}, range {lo:.3f}–{hi:.3f}")
        print(f"train_efficiency: {m:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
