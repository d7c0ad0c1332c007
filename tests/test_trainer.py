"""Student training from a store: the data join, the outputs, and the refusals."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from darkstore.transfer import open_transfer_set
from darkstore.models import ModelSpec, build_model
from storage import StoreWriter, open_store
from storage.errors import IncompleteStoreError, TransferSetMismatchError
from student_trainer.train import Sources, TrainConfig, train
from teacher_service.generate import generate

from .conftest import DARKSTORE, MEMBERS, cli_env, job, make_arrays, make_ensemble

STUDENT = ModelSpec(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [16]})


@pytest.fixture
def store(tmp_path, ensemble, arrays):
    return generate(job(ensemble, arrays, chunk_rows=64), tmp_path / "store").path


def test_mismatched_transfer_set_is_refused(tmp_path, store):
    other = make_arrays(tmp_path / "other.npz", n=300, seed=99)  # same size, other samples
    with pytest.raises(TransferSetMismatchError, match="fingerprint"):
        train(TrainConfig(student=STUDENT, epochs=1), Sources(store, data=open_transfer_set(other)), tmp_path / 'run')
    smaller = make_arrays(tmp_path / "small.npz", n=200)
    with pytest.raises(TransferSetMismatchError, match="200 samples"):
        train(TrainConfig(student=STUDENT, epochs=1), Sources(store, data=open_transfer_set(smaller)), tmp_path / 'run')


def test_an_eval_store_of_the_training_inputs_or_of_other_teachers_is_warned_about(tmp_path, ensemble, store):
    held_out = make_arrays(tmp_path / "held_out.npz", n=100, seed=5)
    same_teachers = generate(job(ensemble, held_out, chunk_rows=64), tmp_path / "ev_ok").path
    others = make_ensemble(tmp_path / "others", MEMBERS[:1], seed=7)
    other_teachers = generate(job(others, held_out, chunk_rows=64), tmp_path / "ev_others").path
    said = {}
    for name, ev in (("itself", store), ("held out", same_teachers), ("other teachers", other_teachers)):
        lines: list[str] = []
        train(TrainConfig(student=STUDENT, epochs=1), Sources(store, eval_store=ev), tmp_path / name, log=lines.append)
        said[name] = [ln for ln in lines if ln.startswith("warning")]
    assert len(said["itself"]) == 1 and "training store's own transfer set" in said["itself"][0]
    assert said["held out"] == []
    assert len(said["other teachers"]) == 1 and "teachers (t0) are not the training store's" in \
        said["other teachers"][0]


def test_incomplete_store_needs_explicit_consent(tmp_path, ensemble, arrays):
    spec = job(ensemble, arrays, chunk_rows=64)
    from teacher_service.generate import prepare, run_chunks

    p = prepare(spec)
    w = StoreWriter.open_or_create(tmp_path / "part", p.meta)
    run_chunks(p, w, [0, 1])
    with pytest.raises(IncompleteStoreError):
        train(TrainConfig(student=STUDENT, epochs=1), tmp_path / "part", tmp_path / "run")
    r = train(TrainConfig(student=STUDENT, epochs=1, holdout=0.25), Sources(tmp_path / 'part', allow_incomplete=True), tmp_path / 'run')
    assert r.final["rows"] == 32  # a quarter of the 128 committed rows


def test_training_is_deterministic_and_outputs_reload(tmp_path, store, arrays):
    cfg = TrainConfig(student=STUDENT, epochs=3, seed=7, batch_size=32)
    a = train(cfg, store, tmp_path / "a")
    b = train(cfg, store, tmp_path / "b")
    wa, wb = load_file(str(tmp_path / "a" / "student.safetensors")), load_file(str(tmp_path / "b" / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.final == b.final
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["retemper"]["exact"] is True and summary["final"] == a.final
    # reloading the saved student reproduces the reported held-out accuracy
    model = build_model("mlp", 5, in_features=64, hidden=[16])
    model.load_state_dict(wa)
    from student_trainer.eval_cache import evaluate, split_rows

    reader = open_store(store)
    _, held = split_rows(reader.meta.num_rows, cfg.holdout)
    assert evaluate(model, STUDENT, reader, open_transfer_set(arrays), held, "cpu") == a.final

    # streaming from DataLoader worker processes: another (seeded) order, just as reproducible
    two = cfg.model_copy(update={"num_workers": 2})
    c, d = train(two, store, tmp_path / "c"), train(two, store, tmp_path / "d")
    wc, wd = (load_file(str(tmp_path / r / "student.safetensors")) for r in "cd")
    assert all(torch.equal(wc[k], wd[k]) for k in wc) and c.final == d.final
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_soft_targets_teach_unlabeled_rows(tmp_path, ensemble):
    data = make_arrays(tmp_path / "u.npz", n=256, labeled=False)
    store = generate(job(ensemble, data, chunk_rows=64), tmp_path / "s").path
    r = train(TrainConfig(student=STUDENT, epochs=30, lr=1e-2, holdout=0.25, temperature=1.0), store, tmp_path / "run")
    assert "accuracy" not in r.final  # no labels, so no accuracy to report
    # the soft term alone drives learning: the KL to the teacher falls by far
    assert r.history[-1]["train_loss"] < 0.3 * r.history[0]["train_loss"]


def test_approximate_retemperature_is_reported(tmp_path, ensemble, arrays):
    store = generate(job(ensemble, arrays, combine="arithmetic", temperature=1.0), tmp_path / "a").path
    train(TrainConfig(student=STUDENT, epochs=1, temperature=3.0), store, tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["retemper"]["exact"] is False and "APPROXIMATE" in s["retemper"]["description"]


def test_cli_generate_inspect_train(tmp_path, ensemble, arrays):
    env = cli_env()
    st = tmp_path / "store"
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(ensemble), "--data", str(arrays), "--out", str(st),
                        "--chunk-rows", "100"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # output is not a terminal here (as in a log file or CI): progress comes as lines, not a bar
    assert "generating: 300 of 300 rows (100 %)" in r.stderr, r.stderr
    r = subprocess.run([*DARKSTORE, "inspect", str(st), "--json", "--verify"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["complete"] and info["rows"] == 300 and info["chunks"] == 3 and info["dtype"] == "float16"
    assert [t["name"] for t in info["teachers"]] == ["t0", "t1", "t2"] and all(len(t["sha256"]) == 64 for t in info["teachers"])
    r = subprocess.run([*DARKSTORE, "inspect", str(st)], env=env, capture_output=True, text=True)
    assert "complete" in r.stdout and "sha256" in r.stdout and "B/sample" in r.stdout
    run = tmp_path / "run"
    r = subprocess.run([*DARKSTORE, "train", "--store", str(st), "--student", "mlp", "--arch-kwargs",
                        '{"in_features": 64, "hidden": [8]}', "--epochs", "2", "--out", str(run)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "held-out: accuracy" in r.stdout and "agreement" in r.stdout and "NLL" in r.stdout
    assert "epoch 1/2: loss " in r.stderr and "epoch 2/2: loss " in r.stderr, r.stderr  # a line an epoch
    assert (run / "student.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    # a folder holding a run is never replaced unasked: refused, with the ways forward, and left as it was
    train = [*DARKSTORE, "train", "--store", str(st), "--student", "mlp", "--arch-kwargs",
             '{"in_features": 64, "hidden": [8]}', "--epochs", "3", "--out", str(run)]
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    r = subprocess.run(train, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "holds a finished run" in r.stderr and "--resume" in r.stderr, r.stderr
    assert "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    r = subprocess.run([*train, "--overwrite"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "epoch 3/3" in r.stderr, r.stderr  # started over, on purpose
    assert json.loads((run / "summary.json").read_text())["config"]["epochs"] == 3
