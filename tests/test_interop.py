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

from darkstore.errors import DataError, SpecError
from darkstore.lm import TokenizerMismatchError
from darkstore_app.lmkit import stdlib, train_tokenizer
from interop import FORMATS, MANIFEST, export_store, import_capture
from interop.capture import plan_import, write_capture
from storage import open_store
from storage.forms import form_of
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
    DistributionQuantizationConfig, LogprobCompressor = distillkit()
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

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_store(stores["topk"], "hf", tmp_path / "stopped", progress=stop, rows_per_file=64)
    assert not (tmp_path / "stopped").exists() and not list(tmp_path.glob(".stopped*")), "nothing half-written"
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
    for name, fmt in ((n, f) for n, f in FORMATS.items() if f.writes):
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
    done = subprocess.run([*DARKSTORE, "targets", "export", stores["topk"], "-f", "vllm", "--out", str(tmp_path / "v")],
                          capture_output=True, text=True, env=cli_env())
    one_error(done, tmp_path / "v", "does not write it")


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


# --- imports ----------------------------------------------------------------------------------------------


def imported(store: str) -> dict[str, np.ndarray]:
    """An imported store's targets as the top-K formats read them (through the form), with tokens and mask."""
    r = open_store(store)
    names = ["tokens", "loss_mask", "topk_logits", "topk_index", "tail_lse"]
    got = r.read_chunks(r.finished_chunks(), names)
    parts = {n: torch.from_numpy(got[n].astype(np.int64) if got[n].dtype == np.uint16 else got[n]) for n in names[2:]}
    ids, logp, tail = form_of(r.meta).top_logprobs(parts, r.meta, None)
    return {"tokens": got["tokens"].astype(np.int64), "mask": got["loss_mask"].astype(bool), "ids": ids.numpy(),
            "logp": logp.numpy(), "tail": tail.numpy()}


@pytest.mark.parametrize("fmt", ["hf", "distillkit", "axolotl"])
def test_round_trips_keep_what_the_format_keeps(stores, tmp_path, chat_kit, fmt):
    ref = reference(stores["chat"])
    export_store(stores["chat"], fmt, tmp_path / "x")
    report = import_capture(fmt, tmp_path / "x", tmp_path / "back.zarr", chat_kit["tokenizer"])
    back = imported(report.store)
    assert report.rows == len(ref["tokens"]) and report.k == 8
    assert (back["tokens"] == ref["tokens"]).all() and (back["mask"] == ref["mask"]).all()
    m = ref["mask"]
    _same_ids(back["ids"][m], ref["ids"][m], ref["logp"][m])
    if fmt == "axolotl":  # renormalised over the K: the head's shape is kept, its mass and the tail are not
        want = ref["logp"][m] - np.logaddexp.reduce(ref["logp"][m], axis=-1, keepdims=True)
        np.testing.assert_allclose(back["logp"][m], want, atol=2e-6)
        assert report.positions == int(m.sum())
    else:
        np.testing.assert_allclose(back["logp"][m], ref["logp"][m], atol=2e-6)
        np.testing.assert_allclose(back["tail"][m], ref["tail"][m], atol=1e-4)
    meta = open_store(report.store).meta
    assert meta.engine.members[0].engine == f"{fmt} capture" and meta.teachers[0].sha256 == meta.transfer_set.fingerprint


def test_an_import_resumes_where_it_stopped(stores, tmp_path, chat_kit):
    """A crash after the first chunk: the same import again writes only the rest, and the store is the one an
    uninterrupted import writes."""
    export_store(stores["chat"], "hf", tmp_path / "x")
    fmt = FORMATS["hf"]
    files, rows = fmt.capture(tmp_path / "x", None)

    def crashing():
        for j, row in enumerate(rows()):
            if j == 5:
                raise RuntimeError("killed")
            yield row

    meta = plan_import("hf", tmp_path / "x", files, rows, chat_kit["tokenizer"], chunk_rows=4)
    with pytest.raises(RuntimeError):
        write_capture(meta, tmp_path / "a.zarr", crashing)
    assert int(open_store(tmp_path / "a.zarr", allow_incomplete=True).done.sum()) == 1
    again = import_capture("hf", tmp_path / "x", tmp_path / "a.zarr", chat_kit["tokenizer"], chunk_rows=4)
    whole = import_capture("hf", tmp_path / "x", tmp_path / "b.zarr", chat_kit["tokenizer"], chunk_rows=4)
    assert again.written_chunks == whole.written_chunks - 1
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    for name in ("tokens", "loss_mask", "topk_logits", "topk_index", "tail_lse"):
        assert (a.read_field(name) == b.read_field(name)).all(), name


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_bad_captures_are_refused_in_one_line(stores, tmp_path, chat_kit):
    tok = chat_kit["tokenizer"]
    export_store(stores["chat"], "hf", tmp_path / "hf")
    export_store(stores["chat"], "distillkit", tmp_path / "dk")
    good = loaded(tmp_path / "hf")[:3]

    def refused(fmt, src, match, error=DataError, tokenizer=tok):
        with pytest.raises(error, match=match):
            import_capture(fmt, src, tmp_path / "never.zarr", tokenizer)
        assert not (tmp_path / "never.zarr").exists()

    refused("distillkit", tmp_path / "hf", "has no column compressed_logprobs")
    refused("vllm", tmp_path / "hf" / "data", "no .jsonl or .json files")
    (tmp_path / "dk" / "compression_config.yaml").unlink()
    refused("distillkit", tmp_path / "dk", "has no compression_config.yaml")
    other = train_tokenizer(sorted((stdlib() / "email").glob("*.py"))[:4], tmp_path / "other", vocab_size=600)
    refused("hf", tmp_path / "hf", "does not give back the capture's token ids", TokenizerMismatchError,
            tokenizer=other)
    ids = [[list(p) for p in r] for r in good["topk_ids"]]
    ids[1][2][0] = 600
    refused("hf", write_parquet(tmp_path / "wide.parquet", {**good, "topk_ids": ids}),
            "top-K token id 600 is outside the tokenizer's vocabulary", TokenizerMismatchError)
    fewer = {k: v[:1] for k, v in good.items()}
    fewer["topk_ids"] = [[p[:4] for p in fewer["topk_ids"][0]]]
    fewer["topk_logprobs"] = [[p[:4] for p in fewer["topk_logprobs"][0]]]
    folder = tmp_path / "mixed"
    write_parquet(folder / "a.parquet", {k: v[:1] for k, v in good.items()})
    write_parquet(folder / "b.parquet", fewer)
    refused("hf", folder, "keeps 4 tokens a position where the rows before it keep 8")
    ragged_k = {k: v[:1] for k, v in good.items()}
    ragged_k["topk_ids"] = [[p[:4] if j == 3 else p for j, p in enumerate(ragged_k["topk_ids"][0])]]
    refused("hf", write_parquet(tmp_path / "ragged.parquet", ragged_k), "every position must keep the same K")
    logits = {**good, "topk_logprobs": [[[v + 5 for v in p] for p in r] for r in good["topk_logprobs"]]}
    refused("hf", write_parquet(tmp_path / "logits.parquet", logits), "logits cannot be imported")
    (tmp_path / "v.jsonl").write_text('{"prompt_logprobs": [null, {"5": {"logprob": -0.1, "rank": 1}}]}\n')
    refused("vllm", tmp_path / "v.jsonl", "no prompt_token_ids")
    (tmp_path / "w.jsonl").write_text("not json\n")
    refused("vllm", tmp_path / "w.jsonl", "is not JSON")
    done = subprocess.run([*DARKSTORE, "targets", "import", str(tmp_path / "hf"), "-f", "axolotl", "--tokenizer",
                           str(tok), "--out", str(tmp_path / "cli.zarr")], capture_output=True, text=True, env=cli_env())
    one_error(done, tmp_path / "cli.zarr", "has no column target_token_ids")


def test_an_imported_store_trains_evaluates_and_inspects(stores, tmp_path, chat_kit):
    """What a user does after an import: inspect the store, train a student on it and evaluate the run."""
    export_store(stores["chat"], "distillkit", tmp_path / "dk")
    gpt = json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 40})
    for args in (["targets", "import", str(tmp_path / "dk"), "-f", "distillkit", "--tokenizer",
                  str(chat_kit["tokenizer"]), "--out", str(tmp_path / "s.zarr")],
                 ["inspect", str(tmp_path / "s.zarr")],
                 ["train", "--store", str(tmp_path / "s.zarr"), "--student", "gpt", "--arch-kwargs", gpt, "--epochs",
                  "1", "--batch-size", "4", "--out", str(tmp_path / "run")],
                 ["eval", str(tmp_path / "run")]):
        done = subprocess.run([*DARKSTORE, *args], env=cli_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (args[:2], done.stderr[-3000:])
        if args[0] == "inspect":
            assert "distillkit capture" in done.stdout, done.stdout
        if args[0] == "targets":
            assert "imported" in done.stderr and "rows of 40" in done.stderr
    assert (tmp_path / "run" / "student.safetensors").is_file()


def distillkit():
    """DistillKit's compression package (tests/peers, unchanged)."""
    sys.path.insert(0, str(PEERS))
    try:
        from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor
    finally:
        sys.path.remove(str(PEERS))
    return DistributionQuantizationConfig, LogprobCompressor


LOSSY = {"d": 514, "k": 8, "exact_k": 2, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, "sqrt"],
         "term_dtype": "float16", "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 4},
                                                    {"scale_dtype": "bfloat16", "element_bits": 1, "num_elements": 2}],
         "delta_encoding": True, "error_diffusion": True, "normalize_t": True}


def test_a_lossy_distillkit_capture_imports_as_distillkit_decodes_it(stores, tmp_path, chat_kit):
    """A capture as DistillKit's sampler writes it (its compressor, a lossy configuration: bfloat16 exact values,
    a polynomial with a square-root term, quantised residuals, deltas), imported: the values DistillKit's own
    decompressor gives back, the ids it packed."""
    import pyarrow as pa

    Config, Compressor = distillkit()
    config = Config.model_validate(LOSSY)
    compressor = Compressor(config)
    ref = reference(stores["chat"])
    rows = {"input_ids": [], "compressed_logprobs": [], "bytepacked_indices": []}
    want = []
    for r in range(len(ref["tokens"])):
        packed = compressor.compress_from_sparse(torch.from_numpy(ref["ids"][r])[None],
                                                 torch.from_numpy(ref["logp"][r]).float()[None])
        ids, logp = compressor.decompress_to_sparse({k: v for k, v in packed.items()})
        want.append((ids[0].numpy(), logp[0].double().numpy()))
        rows["input_ids"].append(ref["tokens"][r].tolist())
        rows["compressed_logprobs"].append(packed["compressed_logprobs"][0].tolist())
        rows["bytepacked_indices"].append(packed["bytepacked_indices"][0].tolist())
    schema = pa.schema([("input_ids", pa.list_(pa.uint64())),
                        ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    (tmp_path / "cap").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(pa.table(rows, schema=schema), tmp_path / "cap" / "part-0.parquet")
    (tmp_path / "cap" / "compression_config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    report = import_capture("distillkit", tmp_path / "cap", tmp_path / "s.zarr", chat_kit["tokenizer"])
    back = imported(report.store)
    assert report.k == 8 and report.length == ref["tokens"].shape[1] - 1
    for r, (ids, logp) in enumerate(want):  # compared by token: ties may be listed in either order
        got_order, want_order = np.argsort(back["ids"][r], -1), np.argsort(ids, -1)
        np.testing.assert_array_equal(np.take_along_axis(back["ids"][r], got_order, -1),
                                      np.take_along_axis(ids, want_order, -1))
        got = np.take_along_axis(back["logp"][r], got_order, -1)
        norm = np.take_along_axis(logp, want_order, -1)
        # the store normalises the K values with the tail log1p(-Σp): the values less one shift per position
        np.testing.assert_allclose(got - got.max(-1, keepdims=True), norm - norm.max(-1, keepdims=True), atol=2e-5)


def test_an_axolotl_dataset_of_conversations_imports_as_axolotl_aligns_it(stores, tmp_path, chat_kit):
    """Conversations beside per-position log-probabilities, as axolotl's KD chat strategies read them (v2:
    values with target_token_ids; legacy: token_id:N entries): rendered with the tokenizer's template, the
    targets right-aligned, the assistant's tokens carrying the loss: the chat store back, where the values
    and the mask come from two different code paths."""
    ref = reference(stores["chat"])
    export_store(stores["chat"], "hf", tmp_path / "hf")
    asked = [json.loads(line) for line in (chat_kit["root"] / "p.jsonl").read_text().splitlines()]
    v2, legacy = [], []
    for row in loaded(tmp_path / "hf"):
        k = len(row["topk_ids"][0])
        ids = row["topk_ids"] + [list(range(k))]  # one entry per token: the last token's predicts nothing
        values = row["topk_logprobs"] + [[0.0] + [-30.0] * (k - 1)]
        v2.append({**asked[row["index"]], "logprobs": values, "target_token_ids": ids})
        legacy.append({**asked[row["index"]], "llm_logprobs": [
            [{"token": f"token_id:{i}", "logprob": v} for i, v in zip(pi, pv)] for pi, pv in zip(ids, values)]})
    for name, recs in (("v2", v2), ("legacy", legacy)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        report = import_capture("axolotl", tmp_path / f"{name}.jsonl", tmp_path / f"{name}.zarr",
                                chat_kit["tokenizer"], length=ref["tokens"].shape[1] - 1)
        back = imported(report.store)
        assert (back["tokens"] == ref["tokens"]).all() and (back["mask"] == ref["mask"]).all(), name
        m = ref["mask"]
        _same_ids(back["ids"][m], ref["ids"][m], ref["logp"][m])
        np.testing.assert_allclose(back["logp"][m], ref["logp"][m], atol=2e-6)
        assert report.label_kept == pytest.approx(float(np.mean((ref["ids"] == ref["tokens"][:, 1:, None]).any(-1)[m])))
    short = [{**r, "logprobs": r["logprobs"][2:], "target_token_ids": r["target_token_ids"][2:]} for r in v2]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    shifted = imported(import_capture("axolotl", tmp_path / "short.jsonl", tmp_path / "short.zarr",
                                      chat_kit["tokenizer"]).store)
    assert not shifted["mask"][:, :2].any(), "positions before the log-probabilities carry no loss"
    with pytest.raises(DataError, match="every position must keep the same K"):
        bad = [{**v2[0], "logprobs": [p[:3] for p in v2[0]["logprobs"]]}]
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad[0]) + "\n")
        import_capture("axolotl", tmp_path / "bad.jsonl", tmp_path / "bad.zarr", chat_kit["tokenizer"])
