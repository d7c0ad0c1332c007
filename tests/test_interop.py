"""interop: a sequence store's targets written in other tools' formats and read back with their own code
(datasets; DistillKit's LogprobCompressor, vendored in tests/peers; axolotl's KD collator and loss, installed
into .peers by ./dev)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from darkstore.errors import SpecError
from interop import FORMATS, MANIFEST, export_store
from storage import open_store
from teacher_service.generate import generate
from teacher_service.spec import JobSpec

from .conftest import DARKSTORE, MEMBERS, ROOT, cli_env, job, make_arrays, make_ensemble
from .procs import one_error

PEERS = ROOT / "tests" / "peers"


def _generate(spec_path: Path, out: Path) -> str:
    return generate(JobSpec.from_file(spec_path), out).path


@pytest.fixture(scope="module")
def stores(lm_kit, chat_kit, tmp_path_factory) -> dict[str, str]:
    """A packed top-8 store of two GPTs, the same as dense targets, and a chat store (padded rows, loss on the
    assistant's turns)."""
    root = tmp_path_factory.mktemp("interop")
    members = [lm_kit["members"][0], lm_kit["members"][2]]
    out = {}
    for name, targets in (("topk", "topk:8"), ("dense", "dense")):
        out[name] = _generate(lm_kit["job"](root / f"{name}.yaml", members, targets=targets, chunk_rows=64),
                              root / f"{name}.zarr")
    out["chat"] = _generate(chat_kit["job"](root / "chat.yaml"), root / "chat.zarr")
    return out


def reference(store: str, k: int | None = None) -> dict[str, np.ndarray]:
    """float64, from the stored fields by hand: each position's K ids (most likely first), their normalised
    log-probabilities and the log of the mass left out; tokens and mask."""
    r = open_store(store)
    tokens, mask = r.read_field("tokens").astype(np.int64), r.read_field("loss_mask").astype(bool)
    if r.meta.target_form == "dense":
        ell = r.read_field("logits").astype(np.float64)
        logp = ell - np.logaddexp.reduce(ell, axis=-1, keepdims=True)
        ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
        head = np.take_along_axis(logp, ids, -1)
        rest = np.exp(logp).sum(-1) - np.exp(head).sum(-1)
        return {"tokens": tokens, "mask": mask, "ids": ids, "logp": head, "tail": np.log(np.maximum(rest, 1e-300))}
    head = -r.read_field("topk_logits").astype(np.float64) * r.meta.targets.step
    idx = r.read_field("topk_index").astype(np.int64)
    tail = r.read_field("tail_lse").astype(np.float64)
    log_z = np.logaddexp(np.logaddexp.reduce(head, axis=-1), tail)
    order = np.argsort(-head, axis=-1, kind="stable")
    return {"tokens": tokens, "mask": mask, "ids": np.take_along_axis(idx, order, -1),
            "logp": np.take_along_axis(head, order, -1) - log_z[..., None], "tail": tail - log_z}


def loaded(out: Path):
    import datasets

    return datasets.load_dataset(str(out), split="train")


def _same_ids(got: np.ndarray, want: np.ndarray, logp: np.ndarray) -> None:
    """Equal ids, up to the order of tied values (a quantised store has ties)."""
    same = got == want
    if not same.all():
        ties = np.isclose(np.take_along_axis(logp, np.argsort(got, -1), -1),
                          np.take_along_axis(logp, np.argsort(want, -1), -1))
        assert (np.sort(got, -1) == np.sort(want, -1)).all() and ties.all()


def test_hf_layout_holds_the_stores_targets_and_masks(stores, tmp_path):
    ref = reference(stores["chat"])
    report = export_store(stores["chat"], "hf", tmp_path / "hf")
    ds = loaded(tmp_path / "hf")
    assert len(ds) == report.rows == len(ref["tokens"])
    trimmed = 0
    for row in ds:
        r, n = row["row"], len(row["tail_logprob"])
        trimmed += ref["tokens"].shape[1] - 1 - n
        assert row["input_ids"] == ref["tokens"][r, :n + 1].tolist()
        assert not ref["mask"][r, n:].any(), "only positions without a loss are dropped"
        labels = np.array(row["labels"])
        assert labels[0] == -100 and (labels[1:][ref["mask"][r, :n]] == ref["tokens"][r, 1:n + 1][ref["mask"][r, :n]]).all()
        assert (labels[1:][~ref["mask"][r, :n]] == -100).all()
        logp = np.array(row["topk_logprobs"])
        np.testing.assert_allclose(logp, ref["logp"][r, :n], rtol=0, atol=2e-6)
        _same_ids(np.array(row["topk_ids"]), ref["ids"][r, :n], ref["logp"][r, :n])
        np.testing.assert_allclose(row["tail_logprob"], ref["tail"][r, :n], rtol=0, atol=2e-5)
        total = np.exp(logp.astype(np.float64)).sum(-1) + np.exp(np.array(row["tail_logprob"], np.float64))
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert trimmed > 0, "the chat rows' trailing padding is dropped"
    assert report.positions == sum(len(r) for r in ds["tail_logprob"])
    manifest = json.loads((tmp_path / "hf" / MANIFEST).read_text())
    assert manifest["format"] == "hf" and manifest["tokenizer"]["fingerprint"] == open_store(
        stores["chat"]).meta.sequence.tokenizer.fingerprint


def test_exported_tokenizer_loads_with_its_template_and_padding(stores, tmp_path):
    from transformers import AutoTokenizer

    export_store(stores["chat"], "hf", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf" / "tokenizer")
    meta = open_store(stores["chat"]).meta
    assert tok.chat_template == meta.sequence.chat.template
    assert tok.pad_token_id == meta.sequence.tokenizer.pad_id or tok.pad_token_id == meta.sequence.tokenizer.eos_id


def test_dense_store_exports_its_top_k(stores, tmp_path):
    ref = reference(stores["dense"], k=5)
    export_store(stores["dense"], "hf", tmp_path / "hf", k=5)
    ds = loaded(tmp_path / "hf").with_format("numpy")
    for row in ds.select(range(0, len(ds), 97)):
        r = row["row"]
        np.testing.assert_allclose(np.stack(row["topk_logprobs"]), ref["logp"][r], atol=2e-6)
        _same_ids(np.stack(row["topk_ids"]), ref["ids"][r], ref["logp"][r])
        np.testing.assert_allclose(row["tail_logprob"], ref["tail"][r], atol=2e-5)


def test_distillkits_own_compressor_reads_the_export(stores, tmp_path):
    sys.path.insert(0, str(PEERS))
    try:
        from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor
    finally:
        sys.path.remove(str(PEERS))
    ref = reference(stores["chat"])
    export_store(stores["chat"], "distillkit", tmp_path / "dk", rows_per_file=5)
    out = tmp_path / "dk"
    assert len(list((out / "data").glob("*.parquet"))) > 1
    config = DistributionQuantizationConfig.model_validate(yaml.safe_load((out / "compression_config.yaml").read_text()))
    compressor = LogprobCompressor(config)
    ds = loaded(out).with_format("torch")
    for row in ds:
        ids, logp = compressor.decompress_to_sparse({k: v[None] for k, v in row.items()})
        n = ids.shape[1]
        r = int(np.flatnonzero((ref["tokens"][:, :n + 1] == row["input_ids"].numpy()).all(1))[0])
        np.testing.assert_allclose(logp[0].double().numpy(), ref["logp"][r, :n], atol=2e-6)
        _same_ids(ids[0].numpy(), ref["ids"][r, :n], ref["logp"][r, :n])
        labels = row["labels"].numpy()
        assert ((labels[:n] >= 0) == ref["mask"][r, :n]).all() and labels[n] == -100, \
            "DistillKit masks position t by labels[t] >= 0"


AXOLOTL_CHECK = r"""
import json, sys
import datasets, torch
from axolotl.integrations.kd.collator import DataCollatorForKD
from axolotl.integrations.kd.topk_logprob.forward_kl import loss
from transformers import AutoTokenizer

out, logits = sys.argv[1], sys.argv[2]
ds = datasets.load_dataset(out, split="train")
tok = AutoTokenizer.from_pretrained(out + "/tokenizer")
batch = DataCollatorForKD(tokenizer=tok, return_tensors="pt")([ds[i] for i in range(len(ds))])
student = torch.load(logits)
value = loss(student[:, :batch["input_ids"].shape[1]], batch["target_token_ids"], batch["target_logprobs"],
             batch["target_mask"])
print(json.dumps({"loss": float(value), "shape": list(batch["input_ids"].shape)}))
"""


def test_axolotls_collator_and_loss_read_the_export(stores, tmp_path):
    peers = ROOT / ".peers"
    if not (peers / "axolotl").is_dir():
        pytest.skip("axolotl is not installed in .peers (./dev installs it without its dependencies)")
    ref = reference(stores["chat"])
    export_store(stores["chat"], "axolotl", tmp_path / "ax")
    ds = loaded(tmp_path / "ax")
    assert {"input_ids", "attention_mask", "labels"} <= set(ds.column_names), "axolotl takes it as tokenized"
    n_rows, width = len(ds), max(len(x) for x in ds["input_ids"])
    student = torch.randn(n_rows, width, open_store(stores["chat"]).meta.num_classes, generator=torch.Generator().manual_seed(0))
    torch.save(student, tmp_path / "student.pt")
    env = {**cli_env(), "PYTHONPATH": str(peers), "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run([sys.executable, "-c", AXOLOTL_CHECK, str(tmp_path / "ax"), str(tmp_path / "student.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # float64: the forward KL over the renormalised top K at every position with a loss, averaged over them
    s = torch.log_softmax(student.double(), dim=-1).numpy()
    total, count = 0.0, 0
    for j, row in enumerate(ds):
        n = len(row["input_ids"]) - 1
        r = int(np.flatnonzero((ref["tokens"][:, :n + 1] == np.array(row["input_ids"])).all(1))[0])
        m = ref["mask"][r, :n]
        t = ref["logp"][r, :n][m]
        t = t - np.logaddexp.reduce(t, axis=-1, keepdims=True)
        q = np.take_along_axis(s[j, :n][m], ref["ids"][r, :n][m], -1)
        total += (np.exp(t) * (t - q)).sum()
        count += m.sum() * t.shape[-1]
    assert got["loss"] == pytest.approx(total / count, rel=1e-4)


def test_refusals_are_one_line(stores, tmp_path, lm_kit):
    with pytest.raises(SpecError, match="say how many to write"):
        export_store(stores["dense"], "hf", tmp_path / "a")
    with pytest.raises(SpecError, match="keeps the top 8"):
        export_store(stores["topk"], "axolotl", tmp_path / "b", k=9)
    with pytest.raises(SpecError, match="unknown format"):
        export_store(stores["topk"], "megatron", tmp_path / "c")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SpecError, match="not an empty folder"):
        export_store(stores["topk"], "hf", tmp_path / "full")
    assert not any((tmp_path / p).exists() for p in "abc")
    ens, data = make_ensemble(tmp_path / "ens", MEMBERS[1:2]), make_arrays(tmp_path / "d.npz", n=64)
    classes = generate(job(ens, data), tmp_path / "classes.zarr").path
    with pytest.raises(SpecError, match="one target per row"):
        export_store(classes, "distillkit", tmp_path / "d")
    sampled = _generate(lm_kit["job"](tmp_path / "s.yaml", [lm_kit["members"][0]], targets="sampled:4",
                                      data={"glob": "decoder.py"}), tmp_path / "sampled.zarr")
    done = subprocess.run([*DARKSTORE, "targets", "export", sampled, "-f", "axolotl", "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, env=cli_env())
    one_error(done, tmp_path / "e", "keep no top-K log-probabilities")


def test_cli_writes_every_format_and_says_what_is_not_kept(stores, tmp_path):
    for name, fmt in FORMATS.items():
        out = tmp_path / name
        done = subprocess.run([*DARKSTORE, "targets", "export", stores["topk"], "-f", name, "--out", str(out)],
                              capture_output=True, text=True, env={**cli_env(), "DARKSTORE_PROGRESS": "1"})
        assert done.returncode == 0, done.stderr
        assert f"as {fmt.title}" in done.stderr and "B a position" in done.stderr
        assert all(line in done.stderr.replace("\n", " ") for line in fmt.not_kept) or not fmt.not_kept
        assert "export " + name in done.stderr, "a progress bar"
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["rows"] == open_store(stores["topk"]).rows_done and manifest["not_kept"] == list(fmt.not_kept)
    assert os.path.isfile(tmp_path / "distillkit" / "compression_config.yaml")


def test_the_trl_example_distils_from_an_export(stores, tmp_path):
    """examples/trl_distill.py as users run it: TRL's SFTTrainer with the export's top-K columns in its loss
    (α = 1) ends far closer to the teachers on held-out rows than it started."""
    export_store(stores["topk"], "hf", tmp_path / "hf")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_distill.py"), "--data", str(tmp_path / "hf"),
                        "--max-steps", "60", "--alpha", "1"], env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kl_after"] < out["kl_before"] / 4, out
