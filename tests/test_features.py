"""Teacher features in the store (FitNets' hints): what generation keeps equals the teacher's own layer output
after the recorded reduction, computed here in float64 without darkstore's code; bad requests fail clearly."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from darkstore.errors import SpecError
from darkstore.models import MLP, SmallCNN
from storage import open_store
from storage.errors import NonFiniteLogitsError
from teacher_service.generate import generate

from .conftest import DARKSTORE, cli_env, job, make_arrays, make_ensemble

CNN = {"name": "cnn", "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 4}}
DENSE = {"name": "mlp", "arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    return {"tmp": tmp, "ens": make_ensemble(tmp / "teachers", [CNN, DENSE]),
            "data": make_arrays(tmp / "x.npz", n=150)}


def float64_teachers(ens) -> dict[str, torch.nn.Module]:
    """The teachers rebuilt from their weights files, in float64 (independent of darkstore's loader)."""
    doc = yaml.safe_load(ens.read_text())
    out = {}
    for m in doc["members"]:
        cls = SmallCNN if m["arch"] == "small_cnn" else MLP
        net = cls(num_classes=5, **m["arch_kwargs"])
        net.load_state_dict(load_file(str(ens.parent / m["weights"])))
        out[m["name"]] = net.double().eval()
    return out


def layer_output(net: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    h = net.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        net(x)
    h.remove()
    return seen[0]


def test_stored_features_equal_the_teachers_layers_after_their_reduction(made, tmp_path):
    feats = ["cnn:features.5", {"teacher": "cnn", "layer": "features.7", "pool": 2},
             {"teacher": "mlp", "layer": "net.2", "project": 6, "seed": 11},
             {"teacher": "cnn", "layer": "features.4", "pool": 1, "project": 3}]
    w = generate(job(made["ens"], made["data"], chunk_rows=64, features=feats), tmp_path / "s")
    r = open_store(w.path)
    r.verify()
    recs = r.meta.features
    assert [f.name for f in recs] == ["cnn:features.5", "cnn:features.7", "mlp:net.2", "cnn:features.4"]
    assert [f.shape for f in recs] == [[4, 8, 8], [8, 2, 2], [6], [3]]
    got = r.read(np.arange(150), ["features"])["features"]
    assert got.shape == (150, 256 + 32 + 6 + 3) and got.dtype == np.float16
    with np.load(made["data"]) as z:
        x = torch.from_numpy(z["x"]).double()
    nets = float64_teachers(made["ens"])

    def proj(seed: int, n: int, d: int) -> torch.Tensor:
        return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) / math.sqrt(d)).double()

    want = [
        layer_output(nets["cnn"], "features.5", x).flatten(1),
        F.adaptive_avg_pool2d(layer_output(nets["cnn"], "features.7", x), 2).flatten(1),
        layer_output(nets["mlp"], "net.2", x) @ proj(11, 16, 6),
        F.adaptive_avg_pool2d(layer_output(nets["cnn"], "features.4", x), 1).flatten(1) @ proj(0, 4, 3),
    ]
    for (name, (cols, shape)), ref in zip(r.meta.feature_slices().items(), want):
        ref = ref.numpy()
        np.testing.assert_allclose(got[:, cols].astype(np.float64), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max(),
                                   err_msg=name)
    s = r.summary()
    assert [f["raw_bytes_per_row"] for f in s["features"]] == [512, 64, 12, 6]
    assert s["raw_bytes_per_row"] == 2 * 5 + 2 * 297 + 16  # targets + features (float16) + label and index
    plain = generate(job(made["ens"], made["data"], chunk_rows=64), tmp_path / "plain")
    assert plain.meta.job_key != w.meta.job_key and plain.meta.features is None


def test_views_stores_keep_each_views_own_features(made, tmp_path):
    from darkstore.data import parse_data_spec
    from darkstore.transfer import open_transfer_set
    from darkstore.views import AugmentSpec, ViewSet
    from storage.schema import RowLayout

    aug = {"views": 3, "ops": [{"op": "affine", "shift": 1}], "clean_view0": True, "seed": 0}
    w = generate(job(made["ens"], made["data"], chunk_rows=64, augment=aug, features=["mlp:net.1"]), tmp_path / "v")
    r = open_store(w.path)
    rows = np.arange(r.meta.num_rows)
    got = r.read(rows, ["features"])["features"].astype(np.float64)
    vs = ViewSet(open_transfer_set(parse_data_spec(str(made["data"]))), AugmentSpec.model_validate(aug), RowLayout(3))
    x, _ = vs.get_batch(rows)
    ref = layer_output(float64_teachers(made["ens"])["mlp"], "net.1", x.double()).numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    assert not np.allclose(got[0::3], got[1::3])  # shifted views have features of their own


@pytest.mark.parametrize("feature, error, says", [
    ("nobody:features.5", ValueError, "no teacher named 'nobody'"),
    ("cnn", ValueError, "write TEACHER:LAYER"),
    ({"teacher": "cnn", "layer": "features.5", "shape": [4, 8, 8]}, ValueError, "measured when the job is prepared"),
    ("cnn:features.99", SpecError, "has no layer 'features.99'; its modules: features, features.0"),
    ({"teacher": "mlp", "layer": "net.1", "pool": 2}, SpecError, "pool needs a \\[B, C, H, W\\] output"),
])
def test_bad_feature_requests_fail_before_any_chunk(made, tmp_path, feature, error, says):
    with pytest.raises(error, match=says):
        generate(job(made["ens"], made["data"], chunk_rows=64, features=[feature]), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_features_beyond_float16_are_refused_not_clipped(tmp_path):
    ens = make_ensemble(tmp_path / "t", [DENSE])
    sd = load_file(str(tmp_path / "t" / "mlp.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v * (1e5 if k == "net.1.weight" else 1) for k, v in sd.items()}, str(tmp_path / "t" / "mlp.safetensors"))
    data = make_arrays(tmp_path / "x.npz", n=64)
    with pytest.raises(NonFiniteLogitsError, match="beyond float16"):
        generate(job(ens, data, chunk_rows=32, features=["mlp:net.1"]), tmp_path / "s")
    r = open_store(tmp_path / "s", allow_incomplete=True)
    assert r.done.sum() == 0  # nothing marked complete
    w = generate(job(ens, data, chunk_rows=32, features=["mlp:net.1"], dtype="float32"), tmp_path / "s32")
    assert np.abs(open_store(w.path).read_field("features")).max() > 65504


def test_cli_keeps_features_and_inspect_shows_their_bytes(made, tmp_path):
    out = tmp_path / "s"
    p = subprocess.run([*DARKSTORE, "generate", "--teachers", str(made["ens"]), "--data", str(made["data"]),
                        "--out", str(out), "--keep-features", "cnn:features.7", "--feature-pool", "2"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([*DARKSTORE, "inspect", str(out)], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "features cnn:features.7" in p.stdout and "8 × 2 × 2 float16" in p.stdout
    assert "avgpool 2x2" in p.stdout
    s = json.loads(subprocess.run([*DARKSTORE, "inspect", str(out), "--json"], env=cli_env(), capture_output=True,
                                  text=True, timeout=120).stdout)
    assert s["features"][0]["raw_bytes_per_row"] == 64
    p = subprocess.run([*DARKSTORE, "generate", "--teachers", str(made["ens"]), "--data", str(made["data"]),
                        "--out", str(tmp_path / "bad"), "--feature-pool", "2"], env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "--keep-features" in p.stderr and "Traceback" not in p.stderr
