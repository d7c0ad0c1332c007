"""Objectives as named pure functions, their trainable heads, and FitNets' two-stage hint training from stored
teacher features: stage 1 moves only the guided part of the student and its regressor, stage 2 is KD;
a run killed in either stage resumes to the same weights."""

from __future__ import annotations

import json
import subprocess
import typing

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from darkstore.errors import SpecError
from student_trainer import losses, objectives
from student_trainer.train import TrainConfig, train
from teacher_service.generate import generate

from .conftest import DARKSTORE, cli_env, job, make_arrays, make_ensemble
from .procs import kill_after_checkpoint

TEACHER = {"name": "wide", "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 12}}
THIN = {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 4}}


@pytest.fixture(scope="module")
def hinted(tmp_path_factory):
    """A store keeping the wide teacher's second conv stage, pooled to 4x4, beside its logits."""
    tmp = tmp_path_factory.mktemp("hints")
    ens = make_ensemble(tmp / "teachers", [TEACHER])
    data = make_arrays(tmp / "x.npz", n=200)
    w = generate(job(ens, data, chunk_rows=64, features=[{"teacher": "wide", "layer": "features.9", "pool": 4}]),
                 tmp / "store")
    return {"tmp": tmp, "store": w.path, "data": data, "ens": ens}


def test_every_training_loss_is_a_registered_objective():
    names = set(typing.get_args(TrainConfig.model_fields["loss"].annotation))
    assert names == set(objectives.OBJECTIVES)
    with pytest.raises(SpecError, match="unknown objective"):
        objectives.get("nope")


def test_hint_loss_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    r, u = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g).half()
    ref = 0.5 * ((r.double() - u.double()) ** 2).reshape(5, -1).mean(1).mean()
    assert torch.allclose(losses.hint_loss(r, u).double(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="regressor gives"):
        losses.hint_loss(r, u[:, :2])


@pytest.mark.parametrize("student, target", [([8, 6, 6], [12, 4, 4]), ([8, 6, 6], [5]), ([16], [7]),
                                             ([8, 6, 6], [3, 1, 1])])
def test_regressors_map_any_student_layer_to_the_hints_shape(student, target):
    head = objectives.regressor(student, target)
    assert head(torch.randn(2, *student)).shape == (2, *target)


def test_a_flat_student_layer_cannot_guide_a_spatial_hint():
    with pytest.raises(SpecError, match="guide a convolutional layer"):
        objectives.regressor([16], [3, 2, 2])


def test_heads_see_the_layer_and_train_with_the_student():
    from darkstore.models import SmallCNN

    net = SmallCNN(5, in_channels=1, width=4)
    w = objectives.WithHeads(net, {"t:l": "features.4"}, {"t:l": objectives.regressor([4, 8, 8], [6, 2, 2])})
    x = torch.randn(3, 1, 8, 8)
    out, heads = w(x)
    assert out.shape == (3, 5) and heads["t:l"].shape == (3, 6, 2, 2)
    losses.hint_loss(heads["t:l"], torch.zeros(3, 6, 2, 2)).backward()
    assert net.features[0].weight.grad is not None  # before the guided layer: trained
    assert net.head[1].weight.grad is None  # after it: untouched by the hint
    assert all(p.grad is not None for p in w.heads.parameters())
    w.heads_on = False
    assert w(x)[1] == {}


def run_cfg(**kw) -> TrainConfig:
    base = dict(student=THIN, loss="hint", student_layer="features.4", hint_epochs=2, epochs=2, batch_size=32,
                lr=5e-3, deterministic=True)
    return TrainConfig(**{**base, **kw})


def test_hint_stage_moves_only_the_guided_part_then_kd_trains_the_whole_student(hinted, tmp_path):
    from darkstore.models import ModelSpec, load_model

    run = tmp_path / "run"
    snaps = {}

    def on_epoch(row):  # each epoch's checkpoint is written before on_epoch is called
        snaps[row["epoch"]] = torch.load(run / "checkpoint.pt", weights_only=True)["model"]

    r = train(run_cfg(), hinted["store"], run, on_epoch=on_epoch)
    torch.manual_seed(0)  # the recipe seeds, then builds the student
    fresh = load_model(ModelSpec(**THIN), num_classes=5, require_weights=False).module.state_dict()
    after_hint = snaps[2]
    assert torch.equal(after_hint["head.1.weight"], fresh["head.1.weight"])  # past the guided layer: waits
    assert torch.equal(after_hint["features.7.weight"], fresh["features.7.weight"])
    assert not torch.equal(after_hint["features.0.weight"], fresh["features.0.weight"])  # guided part: trained
    assert not torch.equal(snaps[4]["head.1.weight"], after_hint["head.1.weight"])  # stage 2 trains it all
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == ["hint", "hint", "kd", "kd"]
    assert hist[1]["train_loss"] < hist[0]["train_loss"]  # the regressor and the guided layers learn the hint
    s = json.loads((run / "summary.json").read_text())
    assert s["hint"] == {"teacher_layer": "wide:features.9", "student_layer": "features.4",
                         "regressor_params": 4 * 24 + 24}  # 1x1 conv from 4 student channels to 24
    assert [st["epochs"] for st in s["stages"]] == [[1, 2], [3, 4]]
    # the exported student is the student alone: no regressor in its weights
    assert set(load_file(str(run / "student.safetensors"))) == set(fresh)
    assert r.final["rows"] > 0


@pytest.mark.parametrize("crash_at, stage", [(3, 0), (13, 0), (15, 1)])  # mid hint; at the boundary; mid KD
def test_hint_training_resumes_to_the_same_weights_in_either_stage(hinted, tmp_path, crash_at, stage):
    """6 steps an epoch, 2 epochs a stage: step 12 ends the hint stage."""
    cfg = run_cfg(checkpoint_every=2)
    train(cfg, hinted["store"], tmp_path / "ref")

    class Crash(Exception):
        pass

    def crash(step):
        if step == crash_at:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, hinted["store"], tmp_path / "run", on_step=crash)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["stage"] == stage and ck["heads"] and ck["step"] == crash_at - 1
    train(cfg, hinted["store"], tmp_path / "run", resume=True)
    a, b = (load_file(str(tmp_path / d / "student.safetensors")) for d in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_hint_run_resumes_bit_identically_from_the_cli(hinted, tmp_path):
    args = [*DARKSTORE, "train", "--store", str(hinted["store"]), "--student", "small_cnn", "--arch-kwargs",
            json.dumps(THIN["arch_kwargs"]), "--objective", "hint", "--student-layer", "features.4",
            "--hint-epochs", "15", "--epochs", "15", "--batch-size", "8", "--checkpoint-every", "5",
            "--deterministic"]
    p = subprocess.run([*args, "--out", str(tmp_path / "ref")], env=cli_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "run"
    kill_after_checkpoint([*args, "--out", str(run)], run, cli_env(), grace=0.5)
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists(), "killed too late"
    r = subprocess.run([*args, "--out", str(run), "--resume"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = (load_file(str(d / "student.safetensors")) for d in (tmp_path / "ref", run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                      for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert hist(tmp_path / "ref") == hist(run)


def test_hint_training_under_two_ddp_ranks(hinted, tmp_path):
    """The regressor sits inside the DDP module: the run's end-of-training check (every rank holds the same
    student and heads) passes, through a stage whose heads are idle."""
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable, "-m",
                        "darkstore_app.cli", "train", "--store", str(hinted["store"]), "--student", "small_cnn",
                        "--arch-kwargs", json.dumps(THIN["arch_kwargs"]), "--objective", "hint", "--student-layer",
                        "features.4", "--hint-epochs", "2", "--epochs", "1", "--batch-size", "16", "--out", str(out)],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and [st["name"] for st in s["stages"]] == ["hint", "kd"]
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == ["hint", "hint", "kd"] and np.isfinite(hist[-1]["train_loss"])


@pytest.mark.parametrize("kw, says", [
    ({"student_layer": None}, "needs student_layer"),
    ({"hint_epochs": 0}, "needs hint_epochs"),
])
def test_hint_config_is_checked(kw, says):
    with pytest.raises(ValueError, match=says):
        run_cfg(**kw)
    with pytest.raises(ValueError, match="belong to loss hint"):
        TrainConfig(student=THIN, student_layer="features.4")


def test_hint_runs_refuse_stores_and_layers_that_do_not_fit(hinted, tmp_path):
    plain = generate(job(hinted["ens"], hinted["data"], chunk_rows=64), tmp_path / "plain").path
    with pytest.raises(SpecError, match="keeps none"):
        train(run_cfg(), plain, tmp_path / "a")
    with pytest.raises(SpecError, match="no layer 'features.99'"):
        train(run_cfg(student_layer="features.99"), hinted["store"], tmp_path / "b")
    with pytest.raises(SpecError, match="--hint-layer 'wide:nope'"):
        train(run_cfg(hint_layer="wide:nope"), hinted["store"], tmp_path / "c")
    with pytest.raises(SpecError, match="guide a convolutional layer"):
        train(run_cfg(student=THIN | {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [8]}},
                      student_layer="net.1"), hinted["store"], tmp_path / "d")


def test_hard_label_objective_ignores_the_targets(hinted, tmp_path):
    a = train(TrainConfig(student=THIN, loss="ce", epochs=1, batch_size=32, deterministic=True), hinted["store"],
              tmp_path / "a")
    b = train(TrainConfig(student=THIN, loss="kl", alpha=0.0, epochs=1, batch_size=32, deterministic=True),
              hinted["store"], tmp_path / "b")
    wa, wb = (load_file(str(p / "student.safetensors")) for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)  # every row labeled: the same loss
    assert np.isfinite(a.final["nll"]) and b.final["rows"] == a.final["rows"]


def test_hard_label_runs_do_not_ask_what_the_targets_allow(hinted, tmp_path):
    """A sampled store refuses any T but its own for KD; a hard-label run reads no targets and is not refused."""
    store = generate(job(hinted["ens"], hinted["data"], chunk_rows=64, targets="sampled:8@2"), tmp_path / "s").path
    with pytest.raises(SpecError, match="sampled at T=2"):
        train(TrainConfig(student=THIN, loss="kl", temperature=4.0, epochs=1), store, tmp_path / "kd")
    r = train(TrainConfig(student=THIN, loss="ce", temperature=4.0, epochs=1), store, tmp_path / "ce")
    s = json.loads((tmp_path / "ce" / "summary.json").read_text())
    assert s["retemper"]["mode"] == "unused" and r.final["rows"] > 0
