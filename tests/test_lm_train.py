"""Language-model students (student_trainer/lm_train.py, lm_eval.py): trained from per-token stores, resumed
mid-epoch to the same weights, evaluated against a float64 recomputation, and every bad setting refused."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from darkstore.errors import SpecError
from darkstore.gpt import GPT
from darkstore.lm import TokenizerMismatchError
from darkstore.models import ModelSpec
from storage import open_store
from storage.errors import SchemaError
from student_trainer import objectives
from student_trainer.config import TrainConfig
from student_trainer.kinds import default_temperature
from student_trainer.errors import ExportError
from student_trainer.runs import evaluate_run
from student_trainer.runs import export_run
from student_trainer.config import TOKEN_OPTIMISER
from student_trainer.lm_eval import check_eval_store, sequence_split
from student_trainer.train import Sources, train
from teacher_service.generate import generate
from teacher_service.spec import JobSpec

V = 512
GPT_KW = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}


@pytest.fixture(scope="module")
def stores(lm_kit, tmp_path_factory) -> dict:
    """A top-k and a dense store of the json package (32-token rows, 64-row chunks), made in this process."""
    root = tmp_path_factory.mktemp("lm-stores")
    out = {}
    for name, targets in (("topk", "topk:8"), ("dense", "dense")):
        generate(JobSpec.from_file(lm_kit["job"](root / f"{name}.yaml", targets=targets, chunk_rows=64)),
                 root / name)
        out[name] = root / name
    return out


def gpt(**kw) -> ModelSpec:
    return ModelSpec(arch="gpt", arch_kwargs={**GPT_KW, **kw})


def weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "student.safetensors"))


def test_a_gpt_student_resumes_mid_epoch_to_the_same_weights(stores, tmp_path):
    cfg = TrainConfig(student=gpt(), temperature=1.0, epochs=2, batch_size=16, lr=3e-3, checkpoint_every=3,
                      deterministic=True, shuffle_buffer_mb=0.1)
    ref = train(cfg, stores["topk"], tmp_path / "ref")

    def crash(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, stores["topk"], tmp_path / "run", on_step=crash)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6
    again = train(cfg, stores["topk"], tmp_path / "run", resume=True)
    assert again.resumed_from == "epoch 1 (mid-epoch) step 6"
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kind"] == "tokens" and summary["target_form"] == "topk" and summary["topk_loss"] == "bucket"
    # the language models' optimiser recipe where the run leaves it unset (clipping, β2 0.95, matrices decay)
    assert summary["optimiser"] == {**TOKEN_OPTIMISER, "betas": list(TOKEN_OPTIMISER["betas"])}
    assert summary["retemper"]["exact"] is True
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    n_train = len(sequence_split(open_store(stores["topk"]), 0.1, None)[0])
    mask = open_store(stores["topk"]).read(np.arange(open_store(stores["topk"]).meta.num_rows), ["loss_mask"])
    assert rows[0]["tokens"] < mask["loss_mask"].sum() and rows[0]["tokens"] > 0.8 * mask["loss_mask"].sum()
    assert n_train and ref.final["perplexity"] > 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for fmt in ("safetensors", "transformers"):  # `darkstore export`: reloaded and compared by the export itself
        e = export_run(tmp_path / "run", fmt)
        assert e.max_abs_diff <= e.tolerance
    hf = AutoModelForCausalLM.from_pretrained(str(e.path), local_files_only=True)
    model = GPT(V, **GPT_KW).eval()
    model.load_state_dict(b)
    x = torch.from_numpy(open_store(stores["topk"]).read(np.arange(4), ["tokens"])["tokens"][:, :-1].astype(np.int64))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(e.path)).vocab_size == V
    with pytest.raises(ExportError, match="exports as safetensors or transformers"):
        export_run(tmp_path / "run", "onnx")


def test_lm_evaluation_matches_a_float64_recomputation(stores, tmp_path):
    """Perplexity, top-1, agreement and the teachers' perplexity on the held-out rows of a dense store, from
    the saved student run in float64 over the stored tokens and targets."""
    cfg = TrainConfig(student=gpt(), temperature=1.0, epochs=1, batch_size=16, lr=3e-3, holdout=0.2)
    r = train(cfg, stores["dense"], tmp_path / "run")
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluate_run(tmp_path / "run", write=False) == written  # `darkstore eval` of the finished run
    got, teachers = written["metrics"], written["teacher_metrics"]
    reader = open_store(stores["dense"])
    _, ev = sequence_split(reader, 0.2, None)
    f = reader.read(ev, ["tokens", "loss_mask", "logits"])
    model = GPT(V, **GPT_KW)
    model.load_state_dict(weights(tmp_path / "run"))
    with torch.no_grad():
        logq = torch.log_softmax(model.double()(torch.from_numpy(f["tokens"][:, :-1].astype(np.int64))), -1)
    keep = f["loss_mask"].astype(bool)
    y = torch.from_numpy(f["tokens"][:, 1:].astype(np.int64))[torch.from_numpy(keep)]
    logq = logq[torch.from_numpy(keep)]
    logp = torch.log_softmax(torch.from_numpy(f["logits"]).double(), -1)[torch.from_numpy(keep)]
    nll = -logq.gather(1, y[:, None]).mean().item()
    assert written["positions"] == int(keep.sum()) and written["rows"] == len(ev)
    assert math.isclose(got["perplexity"], math.exp(nll), rel_tol=1e-5)
    assert math.isclose(got["top1"], (logq.argmax(1) == y).double().mean().item(), abs_tol=1e-9)
    assert math.isclose(got["agreement"], (logq.argmax(1) == logp.argmax(1)).double().mean().item(), abs_tol=1e-9)
    assert math.isclose(teachers["perplexity"], math.exp(-logp.gather(1, y[:, None]).mean().item()),
                        rel_tol=1e-5)
    seq = reader.meta.sequence
    assert math.isclose(got["bits_per_byte"], nll / math.log(2) / (seq.text_bytes / seq.positions), rel_tol=1e-5)
    assert r.final["perplexity"] == pytest.approx(got["perplexity"], rel=1e-9)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert written["compression"]["teachers"]["params"] > written["compression"]["student"]["params"]


def test_a_transformers_student_built_from_its_config_trains_on_jsd(lm_kit, stores, tmp_path):
    """A transformers directory with config.json and the tokenizer but no weights: built at random; judged
    on an eval store (the dense one), whose generation gives the teachers' exact perplexity."""
    from transformers import GPT2Config

    folder = tmp_path / "student"
    GPT2Config(vocab_size=V + 8, n_positions=32, n_embd=32, n_layer=1, n_head=2).save_pretrained(str(folder))
    for f in lm_kit["tokenizer"].iterdir():
        shutil.copy(f, folder / f.name)
    spec = ModelSpec(format="transformers", weights=str(folder))
    cfg = TrainConfig(student=spec, temperature=1.0, loss="jsd", alpha=0.5, epochs=1, batch_size=16)
    r = train(cfg, Sources(stores['topk'], eval_store=stores['dense']), tmp_path / 'run')
    got = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert got["teacher_metrics"]["source"].startswith("the eval store's generation")
    assert got["teacher_metrics"]["perplexity"] == pytest.approx(open_store(stores["dense"]).perplexity()["ensemble"])
    assert got["positions"] == int(open_store(stores["dense"]).meta.sequence.positions)
    assert evaluate_run(tmp_path / "run", write=False)["metrics"] == got["metrics"]  # reloaded from student/
    assert r.num_params > 0 and json.loads((tmp_path / "run" / "summary.json").read_text())["loss_divergence"] == "jsd"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = weights(tmp_path / "run")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "student"), local_files_only=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.items())
    assert AutoTokenizer.from_pretrained(str(tmp_path / "run" / "student")).vocab_size == V


def test_bad_language_model_settings_get_one_clear_error(lm_kit, stores, tmp_path):
    from darkstore_app.lmkit import train_tokenizer

    def refused(cfg, match, exc=SpecError, **kw):
        with pytest.raises(exc, match=match):
            train(cfg, stores["topk"], tmp_path / "run", **kw)
        assert not (tmp_path / "run" / "summary.json").exists()

    other = train_tokenizer(sorted(lm_kit["corpus"].glob("*.py"))[:2], tmp_path / "other", vocab_size=300)
    refused(TrainConfig(student=gpt().model_copy(update={"tokenizer": str(other)}), temperature=1.0),
            "another tokenizer than the store's", TokenizerMismatchError)
    refused(TrainConfig(student=gpt(block_size=16), temperature=1.0), "takes at most 16 positions")
    refused(TrainConfig(student=gpt(), loss="mse"), "is for stores of classes")
    refused(TrainConfig(student=ModelSpec(arch="mlp"), temperature=1.0), "not a language model")
    meta = open_store(stores["topk"]).meta
    seq = meta.sequence.model_copy(update={"tokenizer": meta.sequence.tokenizer.model_copy(
        update={"fingerprint": "0" * 64})})
    with pytest.raises(SchemaError, match="another tokenizer"):
        check_eval_store(meta, meta.model_copy(update={"sequence": seq}), "elsewhere")
    with pytest.raises(SpecError, match="per-token targets .* holds classes"):
        objectives.get("reverse_kl").check(meta.model_copy(update={"sequence": None}), "a class store")
    sampled = meta.model_copy(update={"targets": meta.targets.model_copy(update={"form": "sampled",
                                                                                 "temperature": 2.0})})
    assert default_temperature(sampled) == 2.0 and default_temperature(meta) == 1.0


def test_a_sweep_of_lm_students_trains_them_together_and_tables_perplexity(stores, tmp_path):
    """Two LM students that see the same batches (they differ in α and the loss) train in one group of the
    sweep's own process, each as it would alone; the tables show perplexity, not accuracy."""
    from student_trainer.sweep import GridSpec, run_sweep

    spec = GridSpec.model_validate({"base": {"student": gpt().model_dump(mode="json"), "epochs": 1,
                                             "batch_size": 16, "deterministic": True},
                                    "grid": {"loss": ["kl", "reverse_kl"], "alpha": [0.5]}})
    r = run_sweep(spec, tmp_path / "out", store=stores["topk"], parallel=1)
    assert [o.state for o in r.outcomes] == ["finished", "finished"]
    header = (tmp_path / "out" / "results.md").read_text().splitlines()[2]
    assert "perplexity (mean ± std)" in header and "accuracy" not in header
    alone = train(TrainConfig(student=gpt(), epochs=1, batch_size=16, deterministic=True, temperature=1.0,
                              loss="reverse_kl", alpha=0.5), stores["topk"], tmp_path / "alone")
    point = json.loads((tmp_path / "out" / "runs" / "loss=reverse-kl_alpha=0.5" / "summary.json").read_text())
    assert point["config"]["temperature"] == 1.0  # the store's default T
    assert point["final"]["perplexity"] == pytest.approx(alone.final["perplexity"], rel=1e-6)
    from student_trainer.report import make_report

    page = make_report(tmp_path / "out", fmt="md").read_text()
    assert "Best setting by mean held-out perplexity" in page and "| held-out perplexity |" in page
    best = json.loads((tmp_path / "out" / "report" / "report.json").read_text())["best_setting"]
    ppl = {o.point.config.loss: json.loads((tmp_path / "out" / "runs" / o.point.name / "summary.json").read_text())
           ["final"]["perplexity"] for o in r.outcomes}
    assert best["loss"] == min(ppl, key=ppl.get)  # the lower perplexity is the better


@pytest.mark.slow
def test_an_lm_student_trains_on_two_ranks_under_torchrun(stores, tmp_path):
    """DDP: each rank reads its own chunks and steps the smallest rank's batch count; the run itself checks
    that the ranks end with the same weights."""
    import subprocess
    import sys
    from pathlib import Path

    from student_trainer.loader import make_loader

    from .conftest import cli_env

    out = tmp_path / "ddp"
    r = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                        "--no-python", sys.executable, "-m", "darkstore_app.cli", "train", "--store",
                        str(stores["topk"]), "--student", "gpt", "--arch-kwargs", json.dumps(GPT_KW), "--epochs", "1",
                        "--batch-size", "8", "--out", str(out)], env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    reader = open_store(stores["topk"])
    rows, _ = sequence_split(reader, 0.1, None)
    per_rank = [make_loader(reader, rows, batch_size=8, rank=k, world_size=2).batches_in_epoch(1) for k in (0, 1)]
    assert s["world_size"] == 2 and s["steps"] == min(per_rank)
    assert math.isfinite(s["final"]["perplexity"])
