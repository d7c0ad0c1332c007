"""Many students from one cache: resume, schedules, AMP, DDP, sweeps, evaluation, export, reports."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from darkstore.transfer import open_transfer_set
from darkstore.models import ModelSpec, load_model
from storage import open_store
from student_trainer.errors import RunDirError
from student_trainer.eval_cache import split_rows
from student_trainer.config import CLASS_OPTIMISER
from student_trainer.recipe import lr_lambda, param_groups
from student_trainer.train import Run, Sources, TrainConfig, train, train_many
from teacher_service.generate import generate

from .conftest import DARKSTORE, MEMBERS, cli_env, job, make_arrays, make_ensemble
from .procs import kill_after_checkpoint

MLP = {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16], "dropout": 0.2}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A labeled store over 300 learnable samples (labels follow a random linear teacher)."""
    tmp = tmp_path_factory.mktemp("cache")
    arrays = make_arrays(tmp / "transfer.npz", n=300)
    ens = make_ensemble(tmp / "teachers", MEMBERS)
    return generate(job(ens, arrays, chunk_rows=64), tmp / "store").path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def history(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


class Crash(Exception):
    """Raised from ``on_step`` to stop a run the way a crash would."""


def crash(step):
    if step == 13:  # after the step-12 checkpoint, in the middle of epoch 2
        raise Crash


# --- training: resume, schedules, AMP, DDP -------------------------------------------
def test_crash_mid_epoch_resumes_to_the_same_weights(tmp_path, cache):
    cfg = TrainConfig(student=MLP, epochs=3, batch_size=32, checkpoint_every=3, warmup=0.2, deterministic=True)
    ref = train(cfg, cache, tmp_path / "ref")

    with pytest.raises(Crash):
        train(cfg, cache, tmp_path / "run", on_step=crash)
    assert not (tmp_path / "run" / "summary.json").exists()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["epoch_done"], ck["step"]) == (2, False, 12)
    r = train(cfg, cache, tmp_path / "run", resume=True)
    assert r.resumed_from == "epoch 2 (mid-epoch) step 12"
    assert same(weights(tmp_path / "ref"), weights(tmp_path / "run"))
    assert r.final == ref.final and history(tmp_path / "run") == history(tmp_path / "ref")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # a finished run keeps its weights, not a checkpoint
    again = train(cfg, cache, tmp_path / "run", resume=True)
    assert again.already_finished and again.final == ref.final


def test_tensorboard_tracking_mirrors_the_metrics_through_a_crash(tmp_path, cache):
    """--track tensorboard: every epoch's numbers as scalars at the row's step, read back from the event files
    with TensorBoard's own reader; a crash after the first epoch and a resume log each epoch exactly once; the
    final metrics go with the settings as hyper-parameters."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(student=MLP, epochs=3, batch_size=32, checkpoint_every=3)
    with pytest.raises(Crash):
        train(cfg, cache, tmp_path / "run", on_step=crash, track=["tensorboard"])
    train(cfg, cache, tmp_path / "run", resume=True, track=["tensorboard"])
    rows = history(tmp_path / "run")
    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    ev.Reload()
    for tag, key in (("train/loss", "train_loss"), ("train/lr", "lr"), ("eval/accuracy", "eval_accuracy"),
                     ("eval/nll", "eval_nll")):
        got = [(e.step, e.value) for e in ev.Scalars(tag)]
        assert [s for s, _ in got] == [r["step"] for r in rows], tag  # each epoch once, in order
        assert np.allclose([v for _, v in got], [r[key] for r in rows], rtol=1e-6), tag
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    hp = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    hp.Reload()
    assert hp.Scalars("final/accuracy")[-1].value == pytest.approx(final["accuracy"], rel=1e-6)
    r = subprocess.run([*DARKSTORE, "train", "--store", str(cache), "--out", str(tmp_path / "bad"), "--student",
                        "mlp", "--arch-kwargs", '{"in_features": 64}', "--track", "wandb"], env=cli_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown tracker 'wandb'" in r.stderr


def test_resume_refuses_another_config(tmp_path, cache):
    cfg = TrainConfig(student=MLP, epochs=2, batch_size=32, checkpoint_every=2)

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, cache, tmp_path / "run", on_step=stop)
    with pytest.raises(RunDirError, match="differs in alpha, lr"):
        train(cfg.model_copy(update={"lr": 0.1, "alpha": 0.5}), cache, tmp_path / "run", resume=True)
    # the device may change between an interruption and its resumption
    train(cfg.model_copy(update={"device": "cpu:0"}), cache, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "summary.json").exists()


def test_killed_training_process_resumes_to_the_same_weights(tmp_path, cache):
    args = [*DARKSTORE, "train", "--store", str(cache), "--student", "mlp", "--arch-kwargs",
            json.dumps(MLP["arch_kwargs"]), "--epochs", "40", "--batch-size", "8", "--checkpoint-every", "5",
            "--deterministic", "--seed", "3"]
    subprocess.run([*args, "--out", str(tmp_path / "ref")], env=cli_env(), check=True, capture_output=True)
    run = tmp_path / "run"
    kill_after_checkpoint([*args, "--out", str(run)], run, cli_env())
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists(), "killed too late"
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 40 * 34
    r = subprocess.run([*args, "--out", str(run), "--resume"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"step {step}" in r.stderr
    assert same(weights(tmp_path / "ref"), weights(run))
    assert history(tmp_path / "ref") == history(run)


# --- students trained together ----------------------------------------------------------
def together_configs() -> list[TrainConfig]:
    """Four students that see the same batches (they differ in T, α, lr, objective, width; dropout draws from
    each one's own random stream) and one with another seed (other batches)."""
    base = TrainConfig(student=MLP, epochs=3, batch_size=32, checkpoint_every=4)
    wide = ModelSpec(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [32], "dropout": 0.1})
    return [base, base.model_copy(update={"temperature": 2.0, "alpha": 0.5, "lr": 3e-3}),
            base.model_copy(update={"loss": "ce", "student": wide}),
            base.model_copy(update={"loss": "mse", "weight_decay": 0.01}),
            base.model_copy(update={"seed": 5})]


def counting(data):
    """The transfer set, counting the samples it decodes for batches larger than the student probe's two."""
    get_batch, data.decoded = data.get_batch, 0

    def counted(idx):
        if len(idx) > 2:
            data.decoded += len(idx)
        return get_batch(idx)

    data.get_batch = counted
    return data


def test_students_trained_together_reach_each_ones_own_weights(tmp_path, cache):
    cfgs = together_configs()
    alone = [train(c, cache, tmp_path / f"alone{i}") for i, c in enumerate(cfgs)]
    spec = open_store(cache).meta.transfer_set.spec
    one, many = counting(open_transfer_set(spec)), counting(open_transfer_set(spec))
    train(cfgs[0], Sources(cache, data=one), tmp_path / 'counted')
    runs = [Run(c, tmp_path / f"together{i}") for i, c in enumerate(cfgs)]
    got = train_many(runs, Sources(cache, data=many))
    for i, (a, g) in enumerate(zip(alone, got)):
        assert same(weights(tmp_path / f"alone{i}"), weights(tmp_path / f"together{i}")), i
        assert g.final == a.final and history(tmp_path / f"together{i}") == history(tmp_path / f"alone{i}")
    # each training batch decoded once for the four students that share it, once more for the fifth (another
    # seed); the eval rows once in all
    n_eval = round(0.1 * 300)
    assert one.decoded == 3 * (300 - n_eval) + n_eval
    assert many.decoded == 2 * 3 * (300 - n_eval) + n_eval


def test_students_trained_together_resume_after_a_crash(tmp_path, cache):
    cfgs = together_configs()[:3]
    for i, c in enumerate(cfgs):
        train(c, cache, tmp_path / f"ref{i}")

    runs = [Run(c, tmp_path / f"run{i}") for i, c in enumerate(cfgs)]
    got = train_many(runs, cache, on_step=crash)
    assert all(isinstance(r, Crash) for r in got)
    assert {torch.load(r.out / "checkpoint.pt", weights_only=True)["step"] for r in runs} == {12}
    got = train_many(runs, cache, resume=True)
    assert [r.resumed_from for r in got] == ["epoch 2 (mid-epoch) step 12"] * 3
    for i in range(3):
        assert same(weights(tmp_path / f"ref{i}"), weights(tmp_path / f"run{i}"))
        assert history(tmp_path / f"ref{i}") == history(tmp_path / f"run{i}")


def stack_configs() -> list[TrainConfig]:
    """Four students of one architecture and optimiser (they differ in T, α and the objective): one stack."""
    base = TrainConfig(student={"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}}, epochs=3,
                       batch_size=32, checkpoint_every=4)
    return [base, base.model_copy(update={"temperature": 2.0, "alpha": 0.5}),
            base.model_copy(update={"loss": "ce"}), base.model_copy(update={"loss": "mse", "alpha": 0.7})]


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    assert a.keys() == b.keys()
    gap = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert gap <= atol, gap
    return gap


def test_students_of_one_architecture_step_as_one_stacked_model(tmp_path, cache):
    cfgs = stack_configs()
    alone = [train(c, cache, tmp_path / f"alone{i}") for i, c in enumerate(cfgs)]
    said: list[tuple[str, str]] = []
    got = train_many([Run(c, tmp_path / f"stack{i}") for i, c in enumerate(cfgs)], cache,
                     log=lambda run, m: said.append((run.out.name, m)))
    for i, (a, g) in enumerate(zip(alone, got)):
        assert json.loads((tmp_path / f"stack{i}" / "summary.json").read_text())["stacked_with"] == 3
        assert (f"stack{i}", "stacked with 3 other student(s) of this architecture: one vmapped forward and one "
                "optimiser step for all of them") in said
        # the same arithmetic up to the order of float32 sums: 36 steps later within a few float32 ulps
        close(weights(tmp_path / f"alone{i}"), weights(tmp_path / f"stack{i}"), atol=1e-6)
        for h_a, h_s in zip(history(tmp_path / f"alone{i}"), history(tmp_path / f"stack{i}")):
            assert h_s.keys() == h_a.keys()
            for k, v in h_a.items():
                assert h_s[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (i, k)


@pytest.mark.parametrize("faster", ["stacked", "one by one"])
def test_auto_stacking_times_both_ways_keeps_one_and_reaches_the_same_weights(faster, tmp_path, cache, monkeypatch):
    """stack="auto" (a sweep's default): the first steps stacked, then one by one, then the faster way; the
    students end within float rounding of training alone, and their summaries say which way they ended. Which
    way is faster is forced here (a loaded machine's timings go either way): students that settle one by one
    take the deciding batch once, not twice."""
    from student_trainer.stack import AutoStack

    decide = AutoStack._decide

    def timed(self):
        stacked, alone = ([1.0], [2.0]) if faster == "stacked" else ([2.0], [1.0])
        self.times.update({"trial-stacked": stacked, "trial-alone": alone})
        decide(self)

    monkeypatch.setattr(AutoStack, "_decide", timed)
    cfgs = [c.model_copy(update={"checkpoint_every": 0}) for c in stack_configs()]  # no flush of the sums
    for i, c in enumerate(cfgs):
        train(c, cache, tmp_path / f"alone{i}")
    said: list[tuple[str, str]] = []
    train_many([Run(c, tmp_path / f"auto{i}") for i, c in enumerate(cfgs)], cache, stack="auto",
               log=lambda run, m: said.append((run.out.name, m)))
    for i in range(len(cfgs)):
        verdict = [m for who, m in said if who == f"auto{i}" and m.startswith("timed 4 students: ")]
        assert len(verdict) == 1 and " ms a step stacked, " in verdict[0], said
        stepped_alone = verdict[0].endswith("they step one by one from here")
        assert stepped_alone == (faster == "one by one")
        assert json.loads((tmp_path / f"auto{i}" / "summary.json").read_text())["stacked_with"] == \
            (0 if stepped_alone else 3)
        close(weights(tmp_path / f"alone{i}"), weights(tmp_path / f"auto{i}"), atol=1e-6)
        for a, b in zip(history(tmp_path / f"alone{i}"), history(tmp_path / f"auto{i}")):  # every step's loss counted
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


def test_stacked_students_resume_after_a_crash_to_the_same_weights(tmp_path, cache):
    # a student that steps alone leads the group (another lr): the stack checkpoints on its own count
    cfgs = stack_configs()[:3]
    cfgs.insert(0, cfgs[0].model_copy(update={"lr": 3e-3}))
    ref = [Run(c, tmp_path / f"ref{i}") for i, c in enumerate(cfgs)]
    train_many(ref, cache)

    runs = [Run(c, tmp_path / f"run{i}") for i, c in enumerate(cfgs)]
    assert all(isinstance(r, Crash) for r in train_many(runs, cache, on_step=crash))
    got = train_many(runs, cache, resume=True)
    assert [r.resumed_from for r in got] == ["epoch 2 (mid-epoch) step 12"] * 4
    for a, b in zip(ref, runs):  # each checkpoint holds its own slice of the stack: bit for bit
        assert same(weights(a.out), weights(b.out)) and history(a.out) == history(b.out)
    # a stacked student's checkpoint is a lone run's: it resumes alone too, to within float rounding
    assert all(isinstance(r, Crash) for r in train_many(runs, cache, on_step=crash, overwrite=True))  # from scratch
    alone = train(cfgs[1], cache, runs[1].out, resume=True)
    assert alone.resumed_from == "epoch 2 (mid-epoch) step 12"
    close(weights(ref[1].out), weights(runs[1].out), atol=1e-6)


def test_a_model_vmap_cannot_run_steps_its_students_one_by_one(tmp_path, cache):
    spec = {"factory": "tests.factories:checked_mlp"}
    cfgs = [TrainConfig(student=spec, epochs=2, batch_size=32, temperature=t) for t in (2.0, 4.0)]
    said: list[str] = []
    got = train_many([Run(c, tmp_path / f's{i}') for i, c in enumerate(cfgs)], Sources(cache, allow_code=True), log=lambda run, m: said.append(m))
    for i, c in enumerate(cfgs):
        assert not isinstance(got[i], BaseException), got[i]
        assert json.loads((tmp_path / f"s{i}" / "summary.json").read_text())["stacked_with"] == 0
        alone = train(c, Sources(cache, allow_code=True), tmp_path / f'alone{i}')
        assert same(weights(tmp_path / f"s{i}"), weights(tmp_path / f"alone{i}"))  # nothing of the try was kept
        assert got[i].final == alone.final
    assert sum(m.startswith("cannot stack this architecture") for m in said) == 2


def test_a_student_the_store_refuses_does_not_stop_the_others(tmp_path, cache):
    bad = TrainConfig(student=MLP, epochs=1, loss="hint", student_layer="net.0", hint_epochs=1)
    good = TrainConfig(student=MLP, epochs=1)
    got = train_many([Run(bad, tmp_path / "bad"), Run(good, tmp_path / "good")], cache)
    assert isinstance(got[0], Exception) and "feature" in str(got[0])
    assert got[1].final and (tmp_path / "good" / "summary.json").exists()
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_learning_rate_schedules():
    f = lr_lambda("cosine", total=100, warmup_steps=10)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    g = lr_lambda("step", total=100, warmup_steps=0)
    assert [g(0), g(49), g(50), g(74), g(75), g(99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    h = lr_lambda("linear", total=100, warmup_steps=0)
    assert [h(0), h(50), h(100)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda("constant", 100, 0)(77) == 1.0
    floor = lr_lambda("cosine", total=100, warmup_steps=0, floor=0.1)  # cosine to a tenth of the peak
    assert [floor(0), floor(50), floor(100)] == pytest.approx([1.0, 0.55, 0.1])
    assert lr_lambda("linear", 100, 0, floor=0.2)(100) == pytest.approx(0.2)


def test_weight_decay_on_matrices_only_spares_biases():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = param_groups(list(net.parameters()), 0.1, "matrices")
    assert [[tuple(p.shape) for p in g["params"]] for g in groups] == [[(4, 3)], [(4,), (4,), (4,)]]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["weight_decay"] for g in param_groups(list(net.parameters()), 0.1, "all")] == [0.1]


def test_a_class_run_keeps_its_optimiser_defaults_and_takes_the_settings_given(tmp_path, cache):
    """Unset, a class student's optimiser is what it always was; set, clipping, β and the floor take effect."""
    train(TrainConfig(student=MLP, epochs=1), cache, tmp_path / "a", final_eval=False)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["optimiser"] == {**CLASS_OPTIMISER, "betas": list(CLASS_OPTIMISER["betas"])}
    assert summary["config"]["max_grad_norm"] is None  # config.json keeps what the user said
    cfg = TrainConfig(student=MLP, epochs=2, max_grad_norm=1e-3, betas="0.8,0.9", lr_floor=0.5, schedule="linear")
    train(cfg, cache, tmp_path / "b", final_eval=False)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["optimiser"]["betas"] == [0.8, 0.9] and summary["optimiser"]["max_grad_norm"] == 1e-3
    assert history(tmp_path / "b")[-1]["lr"] >= 0.5 * cfg.lr - 1e-12


def test_gradient_clipping_bounds_every_step(tmp_path, cache):
    """With SGD, each step moves the weights by at most lr × the clipped norm (momentum: at most 1/(1 − μ)
    times over, Nesterov twice that): against the initial weights (a run whose lr is too small to move them)."""
    from safetensors.torch import load_file

    sgd = dict(student=MLP, epochs=1, optimizer="sgd", schedule="constant", batch_size=32)
    train(TrainConfig(**sgd, lr=1e-12), cache, tmp_path / "init", final_eval=False)
    r = train(TrainConfig(**sgd, lr=0.1, max_grad_norm=1e-6), cache, tmp_path / "clip", final_eval=False)
    w0, w1 = (load_file(tmp_path / n / "student.safetensors") for n in ("init", "clip"))
    moved = torch.sqrt(sum(((w1[k] - w0[k]).double() ** 2).sum() for k in w0))
    steps = json.loads((tmp_path / "clip" / "summary.json").read_text())["steps"]
    assert steps > 1 and r.final is not None
    assert 0 < float(moved) <= steps * 0.1 * 1e-6 * 20


def test_schedule_is_applied_per_step(tmp_path, cache):
    cfg = TrainConfig(student=MLP, epochs=4, batch_size=32, schedule="step", lr=0.01)
    train(cfg, cache, tmp_path / "run", final_eval=False)
    lrs = [r["lr"] for r in history(tmp_path / "run")]
    assert lrs == pytest.approx([0.01, 0.001, 0.0001, 0.0001])  # after epochs 1..4 of 9 steps each


def test_amp(tmp_path, cache):
    r = train(TrainConfig(student=MLP, epochs=2, batch_size=32, amp="bf16"), cache, tmp_path / "bf16",
              final_eval=False)
    assert math.isfinite(r.history[-1]["train_loss"])
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16").values())  # master weights stay fp32
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(TrainConfig(student=MLP, epochs=1, amp="fp16"), cache, tmp_path / "fp16")


@pytest.mark.slow
def test_ddp_two_ranks_under_torchrun(tmp_path, cache):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable, "-m",
                        "darkstore_app.cli", "train", "--store", str(cache), "--student", "mlp", "--arch-kwargs",
                        json.dumps(MLP["arch_kwargs"]), "--epochs", "3", "--batch-size", "16", "--out", str(out)],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2
    # each rank ran the smallest rank's batch count per epoch (the run checks that the ranks' weights agree)
    from student_trainer.loader import make_loader

    reader = open_store(cache)
    rows, _ = split_rows(len(reader.finished_rows()), 0.1)
    per_rank = [[make_loader(reader, reader.finished_rows()[rows], batch_size=16, rank=k, world_size=2)
                 .batches_in_epoch(e) for e in (1, 2, 3)] for k in (0, 1)]
    assert s["steps"] == sum(min(a, b) for a, b in zip(*per_rank))
    assert [h["step"] for h in history(out)] == list(np.cumsum([min(a, b) for a, b in zip(*per_rank)]))
    assert math.isfinite(s["final"]["accuracy"])


# --- evaluation --------------------------------------------------------------------
def _reference_ece(logits: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return float(ece)


def test_eval_matches_a_float64_reference(tmp_path, cache):
    run = tmp_path / "run"
    train(TrainConfig(student=MLP, epochs=3, batch_size=32), Sources(cache, cache_dir=Path(os.environ['DARKSTORE_CACHE'])), run, latency=True)  # the cache the CLI passes
    rep = json.loads((run / "eval.json").read_text())
    # recompute from the saved student, independently of the evaluation code
    reader = open_store(cache)
    _, held = split_rows(len(reader.finished_rows()), 0.1)
    rows = reader.finished_rows()[held]
    data = open_transfer_set(reader.meta.transfer_set.spec)
    spec = ModelSpec.model_validate(json.loads((run / "summary.json").read_text())["student"])
    model = load_model(spec.model_copy(update={"weights": str(run / "student.safetensors")})).module.eval()
    x, y = data.get_batch(rows)
    with torch.no_grad():
        s = model.double()(x.double()).numpy()
    t = reader.read(rows, ["logits"])["logits"].astype(np.float64)
    y = y.numpy()
    logp = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    m = rep["metrics"]
    assert m["accuracy"] == pytest.approx((s.argmax(1) == y).mean(), abs=1e-12)
    assert m["agreement"] == pytest.approx((s.argmax(1) == t.argmax(1)).mean(), abs=1e-6)
    assert m["nll"] == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)
    assert m["ece"] == pytest.approx(_reference_ece(s, y), abs=1e-5)
    assert rep["teacher_metrics"]["accuracy"] == pytest.approx((t.argmax(1) == y).mean())
    ref_conf = np.zeros((5, 5), dtype=int)
    np.add.at(ref_conf, (y, s.argmax(1)), 1)
    assert rep["confusion"] == ref_conf.tolist()
    assert sum(rep["reliability"]["count"]) == len(y)
    comp = rep["compression"]
    assert comp["student"]["params"] == sum(p.numel() for p in model.parameters())
    assert comp["student"]["size_bytes"] == (run / "student.safetensors").stat().st_size
    assert comp["teachers"]["params"] == sum(t.num_params for t in reader.meta.teachers)
    assert comp["teachers"]["size_bytes"] == sum(Path(t.weights).stat().st_size for t in reader.meta.teachers)
    assert comp["student"]["latency_ms_batch1"] > 0 and comp["teachers"]["latency_ms_batch1"] > 0
    assert comp["teachers_over_student"]["params"] == pytest.approx(comp["teachers"]["params"] / comp["student"]["params"])
    # the teachers are timed once per store and CPU setting: a second run of the same store reuses it
    cached = list(Path(os.environ["DARKSTORE_CACHE"]).glob(f"teacher-cost-{reader.meta.job_key[:32]}-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == comp["teachers"]

    # `darkstore eval RUN` reproduces the quality numbers and rewrites eval.json
    r = subprocess.run([*DARKSTORE, "eval", str(run), "--json", "--no-latency"], env=cli_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["metrics"] == rep["metrics"] and again["confusion"] == rep["confusion"]
    r = subprocess.run([*DARKSTORE, "eval", str(tmp_path / "nothing")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "not a finished run" in r.stderr


def test_eval_prints_a_small_confusion_matrix_whole_and_a_large_ones_top_confusions(capsys):
    from darkstore_app.cli_students import CONFUSION_MATRIX_MAX, _print_confusion

    small = [[5, 1], [0, 7]]
    _print_confusion(small, ["cat", "dog"])
    shown = capsys.readouterr().out
    assert "confusion matrix" in shown and "cat" in shown and "dog" in shown
    n = CONFUSION_MATRIX_MAX + 80
    big = [[0] * n for _ in range(n)]
    for i in range(n):
        big[i][i] = 9
    big[3][7], big[50][2] = 4, 6
    _print_confusion(big, [f"c{i}" for i in range(n)])
    shown = capsys.readouterr().out
    assert "the 2 confusions most often made of 100 classes" in shown, shown
    lines = shown.splitlines()
    assert len(lines) < 15 and shown.index("c50") < shown.index("c3 ")  # most often first


def test_teacher_cost_is_kept_in_the_cache_it_is_given(tmp_path, cache, monkeypatch):
    """The teachers' timed cost is kept in the cache the caller passes (the CLI: its own cache folder) and read
    from there the next time; with none it is measured each time — no environment variable read deep down."""
    import student_trainer.eval_report as report
    import student_trainer.runs as ev

    run = tmp_path / "run"
    train(TrainConfig(student=MLP, epochs=1), cache, run, final_eval=False)
    calls = []
    real = report._teacher_cost
    monkeypatch.setattr(report, "_teacher_cost", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = ev.evaluate_run(run, cache_dir=tmp_path / "c", write=False)
    again = ev.evaluate_run(run, cache_dir=tmp_path / "c", write=False)
    assert len(calls) == 1 and list((tmp_path / "c").glob("teacher-cost-*.json"))
    assert first["compression"]["teachers"] == again["compression"]["teachers"]
    ev.evaluate_run(run, write=False)
    assert len(calls) == 2


# --- export --------------------------------------------------------------------------
CNN = {"arch": "small_cnn", "arch_kwargs": {"in_channels": 3, "width": 8},
       "preprocess": {"channels": 3, "resize": 12, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}


@pytest.mark.parametrize("student", [MLP, CNN], ids=["mlp", "cnn-with-preprocess"])
def test_every_export_reloads_and_agrees(tmp_path, cache, student):
    run = tmp_path / "run"
    train(TrainConfig(student=student, epochs=1, batch_size=64), cache, run, final_eval=False)
    r = subprocess.run([*DARKSTORE, "export", str(run), "--format", "safetensors", "--format", "torchscript",
                        "--format", "onnx"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # check each artefact here, independently of the export code, on inputs it was not checked on
    spec = ModelSpec.model_validate(json.loads((run / "summary.json").read_text())["student"])
    model = load_model(spec.model_copy(update={"weights": str(run / "student.safetensors")})).module.eval()
    x = torch.rand(37, 1, 8, 8)
    from darkstore.models import preprocess

    with torch.no_grad():
        ref = model(preprocess(x, spec.preprocess))
    exp = run / "export"
    doc = json.loads((exp / "safetensors" / "student.json").read_text())
    st = load_model(ModelSpec.model_validate(doc), base_dir=exp / "safetensors").module.eval()
    with torch.no_grad():
        assert torch.equal(st(preprocess(x, ModelSpec.model_validate(doc).preprocess)), ref)
        ts = torch.jit.load(str(exp / "torchscript" / "student.torchscript.pt"))
        assert torch.allclose(ts(x), ref, atol=1e-5)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exp / "onnx" / "student.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    assert got.shape == (37, 5) and np.allclose(got, ref.numpy(), atol=1e-4)
    for fmt in ("safetensors", "torchscript", "onnx"):
        e = json.loads((exp / fmt / "export.json").read_text())
        assert e["max_abs_diff"] <= e["tolerance"] and e["batch_sizes"] == [1, 64]


def test_timm_teacher_and_student_end_to_end(tmp_path):
    """arch: timm/<name> as a teacher and as a student, through the CLI: generate -> train -> export, the
    teacher's logits against timm's model run here on the same preprocessing, every export reloaded."""
    pytest.importorskip("timm")
    import timm

    arrays = make_arrays(tmp_path / "a.npz", n=96)
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    (tmp_path / "t").mkdir()
    from darkstore.models import save_weights

    save_weights(teacher, tmp_path / "t" / "r.safetensors")
    pre = {"channels": 3, "resize": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    ens = tmp_path / "t" / "ensemble.yaml"
    ens.write_text(yaml.safe_dump({"num_classes": 5, "members": [{"name": "tr", "arch": "timm/test_resnet", "weights":
                                                "r.safetensors", "preprocess": pre}]}))
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(ens), "--data", str(arrays), "--out",
                        str(tmp_path / "s"), "--dtype", "float32"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from darkstore.models import Preprocess, preprocess

    stored = open_store(tmp_path / "s").read_all()  # rows in the store's (shuffled) order; index says which
    with np.load(arrays) as a, torch.no_grad():
        ref = teacher(preprocess(torch.from_numpy(a["x"][stored.index[:16]]), Preprocess(**pre))).numpy()
    np.testing.assert_allclose(stored.logits[:16], ref - ref.max(-1, keepdims=True), atol=1e-4)
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({"arch": "timm/test_resnet", "preprocess": pre}))
    run = tmp_path / "run"
    r = subprocess.run([*DARKSTORE, "train", "--store", str(tmp_path / "s"), "--out", str(run), "--student-spec",
                        str(student), "--epochs", "1", "--batch-size", "32"], env=cli_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*DARKSTORE, "export", str(run), "--format", "safetensors", "--format", "torchscript",
                        "--format", "onnx"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    spec = ModelSpec.model_validate(json.loads((run / "summary.json").read_text())["student"])
    assert spec.arch == "timm/test_resnet"
    model = load_model(spec.model_copy(update={"weights": str(run / "student.safetensors")})).module.eval()
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        want = model(preprocess(x, spec.preprocess))
        ts = torch.jit.load(str(run / "export" / "torchscript" / "student.torchscript.pt"))
        assert torch.allclose(ts(x), want, atol=1e-4)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(run / "export" / "onnx" / "student.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(None, {"input": x.numpy()})[0], want.numpy(), atol=1e-4)


def test_a_factory_student_exports_only_with_allow_code(tmp_path, cache):
    """A student built by module:function ran that code in training (with --allow-code); export runs it again to
    build and check the student, so it asks for the same permission, in one line, and then exports."""
    run = tmp_path / "run"
    train(TrainConfig(student={'factory': 'tests.factories:tiny_mlp'}, epochs=1), Sources(cache, allow_code=True), run, final_eval=False)
    args = [*DARKSTORE, "export", str(run), "--format", "safetensors", "--format", "onnx"]
    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "--allow-code" in r.stderr and "Traceback" not in r.stderr
    assert not (run / "export" / "onnx" / "student.onnx").exists()
    r = subprocess.run([*args, "--allow-code"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for fmt in ("safetensors", "onnx"):
        e = json.loads((run / "export" / fmt / "export.json").read_text())
        assert e["max_abs_diff"] <= e["tolerance"]


def test_export_refuses_a_bad_format_and_an_unfinished_run(tmp_path, cache):
    run = tmp_path / "run"
    train(TrainConfig(student=MLP, epochs=1), cache, run, final_eval=False)
    r = subprocess.run([*DARKSTORE, "export", str(run), "--format", "pickle"], env=cli_env(), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "unknown export format 'pickle'" in r.stderr
    (run / "summary.json").unlink()
    r = subprocess.run([*DARKSTORE, "export", str(run), "--format", "onnx"], env=cli_env(), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "not a finished run" in r.stderr


# --- sweeps and reports ----------------------------------------------------------------
GRID = {
    "base": {"epochs": 6, "batch_size": 16, "lr": 0.003},
    "students": {"mlp16": {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}}},
    "grid": {"alpha": [0.0, 0.5, 1.0], "temperature": [4.0], "seed": [0, 1]},
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache):
    """A 6-point sweep killed after two points finished, then run again to the end."""
    tmp = tmp_path_factory.mktemp("sweep")
    grid = tmp / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "store": str(cache)}, sort_keys=False))
    out = tmp / "out"
    args = [*DARKSTORE, "sweep", "--grid", str(grid), "--out", str(out), "--parallel", "1"]
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("runs/*/summary.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    finished = {p.parent.name: (p.parent / "student.safetensors").stat().st_mtime_ns
                for p in out.glob("runs/*/summary.json")}
    assert 2 <= len(finished) < 6, finished
    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600)
    return {"out": out, "before": finished, "result": r}


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining(swept):
    r, out = swept["result"], swept["out"]
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p.parent.name for p in out.glob("runs/*/summary.json"))
    assert len(runs) == 6
    for name, mtime in swept["before"].items():  # finished points were not trained again
        assert (out / "runs" / name / "student.safetensors").stat().st_mtime_ns == mtime
        assert (out / "runs" / name / "train.log").read_text().count("== ") == 2  # one start, one finish
    assert f"{len(swept['before'])} already finished" in r.stderr


def test_sweep_points_that_share_batches_train_in_one_process(tmp_path, cache):
    grid = tmp_path / "grid.yaml"
    student = {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}}  # no dropout: a stack draws it once
    grid.write_text(yaml.safe_dump({"store": str(cache), "base": {"epochs": 2, "batch_size": 32, "student": student},
                                    "grid": {"alpha": [0.5, 1.0], "temperature": [2.0, 4.0]}}, sort_keys=False))
    for flag, processes, name in (([], 1, "together"), (["--isolate"], 4, "isolated"), (["--no-stack"], 1, "lockstep")):
        out = tmp_path / name
        r = subprocess.run([*DARKSTORE, "sweep", "--grid", str(grid), "--out", str(out), "--parallel", "2",
                            "--threads", "1", *flag],  # the same threads: the same arithmetic
                           env=cli_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(list((out / "logs").glob("*.log"))) == processes
        assert len(list(out.glob("runs/*/summary.json"))) == 4
    for run in (tmp_path / "together" / "runs").iterdir():
        log = (run / "train.log").read_text()
        assert "with 3 other point(s) in this process" in log and "stacked with 3 other student(s)" in log
        # together (one stacked model) or alone, a point reaches the same weights within float32 rounding
        close(weights(run), weights(tmp_path / "isolated" / "runs" / run.name), atol=1e-6)
        # --no-stack: each student steps alone in the shared loop, bit-identical to its own process
        assert "stacked with" not in (tmp_path / "lockstep" / "runs" / run.name / "train.log").read_text()
        assert same(weights(tmp_path / "lockstep" / "runs" / run.name), weights(tmp_path / "isolated" / "runs" / run.name))


def test_settings_a_run_does_not_use_change_nothing(tmp_path, cache):
    """The rule sweeps deduplicate by: at α = 0 (hard labels only) T changes nothing, nor does it for logit
    matching; trained, such runs reach the same weights bit for bit. Where T is used, the weights differ."""
    from student_trainer.config import effect_key, unused_settings

    base = {"student": MLP, "epochs": 1, "batch_size": 64}
    for kw, identical in [({"alpha": 0.0}, True), ({"loss": "mse", "alpha": 0.5}, True), ({"alpha": 0.5}, False)]:
        a, b = (TrainConfig(**base, **kw, temperature=t) for t in (2.0, 8.0))
        assert (effect_key(a) == effect_key(b)) is identical and ("temperature" in unused_settings(a)) is identical
        for c, name in ((a, "a"), (b, "b")):
            train(c, cache, tmp_path / name, final_eval=False)
        assert same(weights(tmp_path / "a"), weights(tmp_path / "b")) is identical, kw
        for name in ("a", "b"):
            shutil.rmtree(tmp_path / name)
    ce = TrainConfig(**base, loss="ce", alpha=0.3, temperature=3.0)
    assert unused_settings(ce) >= {"alpha", "temperature"}
    assert effect_key(ce) == effect_key(ce.model_copy(update={"alpha": 0.9, "temperature": 1.0}))


def test_sweep_one_process_at_a_time_trains_in_its_own_and_fails_points_alone(tmp_path, cache, monkeypatch):
    """--parallel 1: every group trains in the sweep's process, one after another. A student that cannot run
    fails its point; its group's other student and the next group train on, and the process's torch settings
    are what they were before."""
    from student_trainer.sweep import GridSpec, run_sweep

    wrong = {"arch": "mlp", "arch_kwargs": {"in_features": 65, "hidden": [16]}}  # the store's rows have 64 features
    spec = GridSpec.model_validate({"store": str(cache), "base": {"epochs": 1, "batch_size": 32, "deterministic": True,
                                                                 "threads": 1},
                                    "students": {"ok": {"arch": "mlp", "arch_kwargs": {"in_features": 64}}, "wrong": wrong},
                                    "grid": {"student": ["ok", "wrong"], "seed": [0, 1]}})
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a sweep at --parallel 1 started a process"))
    events = []
    r = run_sweep(spec, tmp_path / "out", parallel=1, on_event=lambda o, done, total: events.append(o.state))
    states = {o.point.name: o.state for o in r.outcomes}
    assert states == {"student=ok_seed=0": "finished", "student=wrong_seed=0": "failed",
                                                  "student=ok_seed=1": "finished", "student=wrong_seed=1": "failed"}
    assert "65" in next(o.error for o in r.outcomes if o.state == "failed")  # the shape error, not an exit code
    assert len(list((tmp_path / "out" / "logs").glob("*.log"))) == 2  # a log per group, as for processes
    assert events.count("epoch") == 2 and events.count("started") == 4
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)


def test_sweep_with_a_job_fills_its_store_first_then_trains(tmp_path):
    """A grid file that names its teacher job: one `darkstore sweep` generates the store (the same bytes as
    `generate`), then trains; run again, it computes nothing and trains nothing."""
    from teacher_service.spec import JobSpec

    make_arrays(tmp_path / "transfer.npz", n=200)
    make_ensemble(tmp_path / "teachers", MEMBERS[1:2])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"teachers": "teachers/ensemble.yaml", "data": "transfer.npz",
                                                       "chunk_rows": 64}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"store": "store", "job": "job.yaml", "grid": {"temperature": [2.0, 4.0]},
                                    "base": {"epochs": 1, "batch_size": 32, "student": MLP}}))
    args = [*DARKSTORE, "sweep", "--grid", str(grid), "--out", str(tmp_path / "out")]
    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("runs/*/summary.json"))) == 2
    reference = generate(JobSpec.from_file(tmp_path / "job.yaml"), tmp_path / "reference")
    swept = open_store(tmp_path / "store")
    assert swept.meta.job_key == open_store(reference.path).meta.job_key
    assert np.array_equal(swept.read_field("logits"), open_store(reference.path).read_field("logits"))
    again = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete: nothing to compute" in again.stderr and "2 already finished" in again.stderr


def test_sweep_trains_points_identical_in_effect_once(tmp_path, cache):
    """α = 0 × two temperatures is one run: the second point's directory links to the first's, the CLI says so,
    and the results still list every point (T's line is flat at α = 0, as it is)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"store": str(cache), "base": {"epochs": 2, "batch_size": 32},
                                    "students": {"mlp": {"arch": "mlp", "arch_kwargs": {"in_features": 64,
                                                                                        "hidden": [8]}}},
                                    "grid": {"alpha": [0.0, 0.5], "temperature": [2.0, 4.0]}}))
    out = tmp_path / "out"
    r = subprocess.run([*DARKSTORE, "sweep", "--grid", str(grid), "--out", str(out)], env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "same run alpha=0_T=4 = alpha=0_T=2 (temperature, topk_loss unused there)" in r.stderr
    assert "3 trained now" in r.stderr and "1 the same run as another" in r.stderr
    # not a terminal: each point says where its lines go, then a line per epoch
    assert f"training alpha=0.5_T=4: its lines go to {out / 'runs' / 'alpha=0.5_T=4' / 'train.log'}" in r.stderr
    assert "alpha=0.5_T=4 epoch 1/2: loss " in r.stderr and "alpha=0.5_T=4 epoch 2/2: loss " in r.stderr, r.stderr
    link = out / "runs" / "alpha=0_T=4"
    assert link.is_symlink() and link.resolve() == (out / "runs" / "alpha=0_T=2").resolve()
    with (out / "results.csv").open() as f:
        rows = {(float(x["alpha"]), float(x["temperature"])): x for x in csv.DictReader(f)}
    assert len(rows) == 4 and rows[(0.0, 2.0)]["accuracy"] == rows[(0.0, 4.0)]["accuracy"]
    for x in rows.values():  # each point's training wall time, and whom it stepped with
        summary = json.loads((out / "runs" / x["run"] / "summary.json").read_text())
        assert float(x["seconds"]) == summary["seconds"] > 0
        assert int(x["stacked_with"]) == summary["stacked_with"]
    again = subprocess.run([*DARKSTORE, "sweep", "--grid", str(grid), "--out", str(out)], env=cli_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 trained now, 3 already finished, 1 the same run" in again.stderr
    # the report shows the run once (naming its twin) and α = 0 as one band across T
    r = subprocess.run([*DARKSTORE, "report", str(out), "--format", "md"], env=cli_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "report" / "report.json").read_text())
    assert sorted(data["runs"]) == ["alpha=0.5_T=2", "alpha=0.5_T=4", "alpha=0_T=2"]
    assert data["curves"]["alpha=0_T=2"]["same_as"] == ["alpha=0_T=4"]
    band = data["hyper"]["temperature"]["alpha=0"]
    assert band["n"] == 1 and band["mean"] == pytest.approx(float(rows[(0.0, 2.0)]["accuracy"]))
    assert [p["value"] for p in data["hyper"]["temperature"]["alpha=0.5"]] == [2.0, 4.0]


@pytest.mark.slow
def test_sweep_table_is_mean_and_std_of_the_runs(swept):
    out = swept["out"]
    res = json.loads((out / "results.json").read_text())
    assert len(res["table"]) == 3
    for row in res["table"]:
        finals = [json.loads((out / "runs" / f"alpha={row['alpha']:g}_T=4_seed={s}" / "summary.json").read_text())["final"]
                  for s in (0, 1)]
        for m in ("accuracy", "agreement", "nll", "ece"):
            vals = [f[m] for f in finals]
            assert row[m + "_mean"] == pytest.approx(statistics.fmean(vals), abs=1e-12)
            assert row[m + "_std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
    assert "| 0.5 | 4.0 | 2 |" in (out / "results.md").read_text()
    assert swept["result"].stdout.count("\n|") >= 4  # the table is printed too


@pytest.mark.slow
def test_report_plots_show_the_runs_numbers(swept, tmp_path):
    out = swept["out"]
    for fmt in ("html", "md"):
        r = subprocess.run([*DARKSTORE, "report", str(out), "--format", fmt, "--out", str(tmp_path / fmt)],
                           env=cli_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    import matplotlib.image

    for png in ("curves.png", "hyper.png", "reliability.png"):
        img = matplotlib.image.imread(tmp_path / "md" / png)
        assert img.shape[0] > 300 and img.shape[1] > 300 and img.std() > 0.01  # a real, non-blank picture
        assert f"]({png})" in (tmp_path / "md" / "report.md").read_text()
    html_text = (tmp_path / "html" / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") == 3 and "<table>" in html_text
    data = json.loads((tmp_path / "md" / "report.json").read_text())
    assert len(data["runs"]) == 6
    for name, series in data["curves"].items():
        hist = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert series["eval_accuracy"] == [h["eval_accuracy"] for h in hist]
        assert series["train_loss"] == [h["train_loss"] for h in hist]
    finals = {p.parent.name: json.loads(p.read_text())["final"] for p in out.glob("runs/*/summary.json")}
    for pt in data["hyper"]["alpha"]["T=4"]:  # one line per T (one T here)
        accs = [f["accuracy"] for n, f in finals.items() if n.startswith(f"alpha={pt['value']:g}_")]
        assert pt["mean"] == pytest.approx(statistics.fmean(accs)) and pt["n"] == 2
    # losses of different objectives sit in different panels
    assert {s["objective"] for n, s in data["curves"].items() if n.startswith("alpha=0_")} == {"hard-label CE"}
    assert {s["objective"] for n, s in data["curves"].items() if n.startswith("alpha=1_")} == {"α·T²·KL + (1−α)·CE"}
    # the best setting is the best mean over seeds, and its run nearest that mean is the one shown
    by_alpha = {a: [f["accuracy"] for n, f in finals.items() if n.startswith(f"alpha={a:g}_")] for a in (0, 0.5, 1)}
    top = max(by_alpha, key=lambda a: statistics.fmean(by_alpha[a]))
    assert data["best_setting"]["alpha"] == top and data["best_setting"]["n"] == 2
    assert data["best_setting"]["accuracy_mean"] == pytest.approx(statistics.fmean(by_alpha[top]))
    mine = {n: f for n, f in finals.items() if n.startswith(f"alpha={top:g}_")}
    best = min(mine, key=lambda n: abs(mine[n]["accuracy"] - statistics.fmean(by_alpha[top])))
    assert data["best"] == best and f"**alpha={top:g}**" in (tmp_path / "md" / "report.md").read_text()
    assert "ece (mean ± std)" in (tmp_path / "md" / "report.md").read_text()
    assert all(row["ece_mean"] <= 1 for row in data["table"])  # a fraction in the data, a percentage in tables
    ev = json.loads((out / "runs" / best / "eval.json").read_text())
    assert data["reliability"]["reliability"]["ece"] == ev["reliability"]["ece"]
    assert sum(data["reliability"]["reliability"]["count"]) == sum(ev["reliability"]["count"]) > 0  # rows per bin
    table = {r[""]: r for r in data["student_vs_teachers"]}
    assert table["held-out accuracy (%)"]["student"] == f"{100 * ev['metrics']['accuracy']:.2f}"
    assert "CPU latency, batch 1 (ms, threads not recorded)" in table  # a sweep's runs time nothing by default
    # timed by `darkstore eval` (all the cores), the report says with how many threads
    r = subprocess.run([*DARKSTORE, "eval", str(out / "runs" / best)], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    threads = json.loads((out / "runs" / best / "eval.json").read_text())["compression"]["threads"]
    r = subprocess.run([*DARKSTORE, "report", str(out), "--format", "md", "--out", str(tmp_path / "again")],
                       env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    again = {r[""]: r for r in json.loads((tmp_path / "again" / "report.json").read_text())["student_vs_teachers"]}
    label = f"CPU latency, batch 1 (ms, {threads} torch thread{'s' if threads != 1 else ''})"
    assert label in again and float(again[label]["student"]) > 0
    assert table["parameters"]["student"] == f"{ev['compression']['student']['params']:,}"


def test_bad_grid_files_are_refused(tmp_path, cache):
    cases = {
        "unknown axis": ({"grid": {"alpah": [0, 1]}, "base": {"student": MLP}}, "grid axis 'alpah' is not a training option"),
        "unknown student": ({"grid": {"student": ["big"]}}, "student 'big' is not one of the named students"),
        "no student": ({"grid": {"alpha": [0]}}, "name the student"),
        "bad value": ({"grid": {"alpha": [2.0]}, "base": {"student": MLP}}, "alpha"),
    }
    for what, (doc, msg) in cases.items():
        f = tmp_path / f"{what.replace(' ', '_')}.yaml"
        f.write_text(yaml.safe_dump(doc))
        r = subprocess.run([*DARKSTORE, "sweep", "--grid", str(f), "--store", str(cache), "--out", str(tmp_path / "o")],
                           env=cli_env(), capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr, (what, r.stderr)
