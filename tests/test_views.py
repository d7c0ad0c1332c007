"""Augmentation-aware soft targets: K recorded views per sample, replayed exactly."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from darkstore.transfer import open_transfer_set
from darkstore.views import AugmentSpec, ReplayError, ViewSet, select_views
from storage import open_store
from storage.schema import RowLayout
from student_trainer import losses
from student_trainer.loader import make_loader
from student_trainer.eval_cache import eval_split
from student_trainer.train import TrainConfig, train
from teacher_service.generate import generate
from teacher_service.spec import JobSpec

from .conftest import DARKSTORE, MEMBERS, cli_env, job, make_arrays, make_ensemble, reference_member_logits

K = 4
RECIPE = {"views": K, "ops": [
    {"op": "affine", "degrees": 15, "translate": 0.125, "scale": [0.9, 1.1]},
    {"op": "hflip", "p": 0.5},
    {"op": "resized_crop", "scale": [0.5, 1.0]},
    {"op": "color_jitter", "brightness": 0.3, "contrast": 0.3},
    {"op": "cutmix", "alpha": 1.0},
]}
N = 60


@pytest.fixture(scope="module")
def vstore(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    arrays = make_arrays(tmp / "x.npz", n=N)
    ens = make_ensemble(tmp / "teachers", MEMBERS)
    w = generate(job(ens, arrays, chunk_rows=50, augment=RECIPE), tmp / "store")  # chunks cut across samples
    return {"store": w.path, "arrays": arrays, "ensemble": ens, "tmp": tmp}


def test_replayed_views_are_the_pixels_the_teachers_saw(tmp_path):
    """A recording teacher keeps what generation fed it; the loader's replay must match it bit for bit."""
    arrays = make_arrays(tmp_path / "x.npz", n=N)
    rec = tmp_path / "seen"
    spec = JobSpec.model_validate({
        "teachers": {"members": [{"name": "rec", "factory": "tests.factories:recording_mlp",
                                  "arch_kwargs": {"folder": str(rec)}}], "num_classes": 5},
        "data": {"kind": "arrays", "path": str(arrays)}, "chunk_rows": 64, "augment": RECIPE,
    })
    store = generate(spec, tmp_path / "store", allow_code=True, batch_size=32).path
    calls = [torch.load(p) for p in sorted(rec.glob("*.pt"))]
    seen = torch.cat(calls[1:])  # the first call is the 2-sample class-count probe
    reader = open_store(store)
    assert len(seen) == reader.meta.num_rows == N * K
    batches = list(make_loader(reader, np.arange(N * K), batch_size=37, shuffle=True, seed=5).epoch(1))
    for b in batches:
        assert torch.equal(b.x, seen[b.rows])  # bit for bit
    # the views really are augmented: view 0 is the clean input, the others differ from it
    with np.load(arrays) as z:  # the store's rows are in its (default: shuffled) sample order
        clean = torch.from_numpy(z["x"])[torch.from_numpy(reader.read_field("index")[0::K])]
    assert reader.meta.row_order == "shuffled"
    assert torch.equal(seen[0::K], clean)
    assert all(not torch.equal(seen[v::K], clean) for v in range(1, K))


def test_teachers_rerun_on_replayed_views_reproduce_the_stored_targets(vstore):
    reader = open_store(vstore["store"])
    batch = next(iter(make_loader(reader, np.arange(N * K), batch_size=N * K, shuffle=False).epoch(0)))
    x = batch.x.double()
    # float64 reference: each member on the replayed pixels, geometric mean, row-centred
    from darkstore.models import ModelSpec, load_model

    doc = yaml.safe_load(vstore["ensemble"].read_text())
    z = []
    for m in doc["members"]:
        spec = ModelSpec(**{**m, "weights": str(vstore["ensemble"].parent / m["weights"])})
        with torch.no_grad():
            z.append(load_model(spec, num_classes=5).module.double().eval()(x).numpy())
    ell = np.mean(z, axis=0)
    ell = ell - ell.max(axis=1, keepdims=True)
    stored = batch.logits.double().numpy()
    assert np.allclose(stored, ell, rtol=2 ** -10, atol=2 ** -10 * np.abs(ell).max())
    # and not merely close to the clean-input targets: the views changed the targets
    clean = reference_member_logits(vstore["ensemble"], vstore["arrays"]).mean(0)
    clean = clean - clean.max(1, keepdims=True)
    assert not np.allclose(stored[K - 1::K], clean, atol=1e-2)


def test_store_records_the_recipe_and_per_row_parameters(vstore):
    reader = open_store(vstore["store"])
    m = reader.meta
    assert m.num_rows == N * K and m.transfer_set.num_samples == N and m.views_per_sample == K
    assert m.views.recipe["ops"][0]["op"] == "affine" and m.views.param_names[:2] == ["view", "clean"]
    assert np.array_equal(reader.read_field("index"), np.arange(N * K) // K)
    params = reader.read_field("view_params")
    assert np.array_equal(params[:, 0], np.arange(N * K) % K) and np.array_equal(params[:, 1], np.arange(N * K) % K == 0)
    # the parameters are a pure function of (seed, sample, view): drawn again, they are the same
    data = open_transfer_set(m.transfer_set.spec)
    assert np.array_equal(ViewSet(data, AugmentSpec.model_validate(RECIPE), RowLayout(K)).params(np.arange(N * K)), params)
    s = reader.summary()
    assert s["views_per_sample"] == K and s["bytes_per_sample"] == pytest.approx(s["bytes_per_row"] * K)
    r = subprocess.run([*DARKSTORE, "inspect", str(vstore["store"])], env=cli_env(), capture_output=True, text=True)
    assert "4 per sample (60 samples × 4 = 240 rows; view 0 clean)" in r.stdout and "B/sample" in r.stdout


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_draws_views_per_epoch_and_resumes_the_same_draw(vstore, workers):
    reader = open_store(vstore["store"])
    rows = np.arange(N * K)

    def epoch(e, per, **kw):
        loader = make_loader(reader, rows, batch_size=16, seed=3, views_per_epoch=per, num_workers=workers, **kw)
        return loader, [b.rows.numpy() for b in loader.epoch(e)]

    _, one = epoch(1, 1)
    got = np.concatenate(one)
    assert np.array_equal(np.sort(got // K), np.arange(N))  # each sample exactly once per epoch
    _, again = epoch(1, 1)
    assert np.array_equal(np.concatenate(again), got)  # seeded
    _, other = epoch(2, 1)
    assert not np.array_equal(np.sort(np.concatenate(other)), np.sort(got))  # another draw of views next epoch
    _, two = epoch(1, 2)
    got2 = np.concatenate(two)
    assert np.array_equal(np.bincount(got2 // K), np.full(N, 2)) and len(np.unique(got2)) == 2 * N
    _, every = epoch(1, None)
    assert np.array_equal(np.sort(np.concatenate(every)), rows)
    # interrupted after 2 batches, a new loader continues with exactly the rest of the same draw
    loader = make_loader(reader, rows, batch_size=16, seed=3, views_per_epoch=1, num_workers=workers)
    it = loader.epoch(1)
    first = [next(it).rows.numpy() for _ in range(2)]
    state = loader.state_dict()
    fresh = make_loader(reader, rows, batch_size=16, seed=3, views_per_epoch=1, num_workers=workers)
    fresh.load_state_dict(state)
    rest = [b.rows.numpy() for b in fresh.epoch(1)]
    assert np.array_equal(np.sort(np.concatenate(first + rest)), np.sort(got))


def test_a_views_loader_streams_the_parameters_it_replays_with(vstore, monkeypatch):
    """Each batch's recorded parameters arrive with its targets, a window of chunks at a time — no loader process
    reads the store's whole [N·K, P] parameters (about 1 GB for ImageNet with 8 views) — and replay from them
    gives the pixels generation made from the same rows' parameters."""
    from storage.reader import StoreReader

    reader = open_store(vstore["store"])
    whole, index = reader.read_field("view_params"), reader.read_field("index")
    read_whole = []
    real = StoreReader.read_field
    monkeypatch.setattr(StoreReader, "read_field", lambda self, name: read_whole.append(name) or real(self, name))
    aug = AugmentSpec.model_validate(reader.meta.views.recipe).at_version(reader.meta.views.version)
    base = open_transfer_set(reader.meta.transfer_set.spec)
    batches = list(make_loader(reader, np.arange(N * K), batch_size=16, seed=5, views_per_epoch=2).epoch(0))
    assert "view_params" not in read_whole and {"labels", "index"} <= set(read_whole)
    for b in batches:
        rows = b.rows.numpy()
        assert torch.equal(b.x, aug.apply(base, index[rows], whole[rows]))


@pytest.mark.parametrize("workers", [0, 2])
def test_views_deferred_to_the_training_device_are_the_loaders_views(vstore, workers):
    """replay_device: batches leave the loader (and its worker processes, pinned or not) as the inputs the views
    are made from, and Batch.to makes them on that device: the same pixels, bit for bit, as the loader makes
    (here the device is the CPU; on a GPU the same path runs its kernels there, checked against the store's
    probe on that device), with the same targets, labels and mix labels."""
    reader = open_store(vstore["store"])
    rows = np.arange(N * K)
    made = list(make_loader(reader, rows, batch_size=16, seed=3, num_workers=workers).epoch(1))
    later = list(make_loader(reader, rows, batch_size=16, seed=3, num_workers=workers, replay_device="cpu",
                             pin_memory=False).epoch(1))
    assert len(made) == len(later) and all(b.x is None and b.deferred is not None for b in later)
    for a, b in zip(made, later):
        b = b.to("cpu")
        assert torch.equal(a.x, b.x) and torch.equal(a.rows, b.rows) and torch.equal(a.logits, b.logits)
        assert torch.equal(a.mix_labels, b.mix_labels) and torch.equal(a.mix_lam, b.mix_lam)
    assert any(bool((b.mix_labels >= 0).any()) for b in made)  # cutmix rows were among them


def test_select_views_is_exact():
    rows = np.arange(40)  # 10 samples × 4 views
    for per in (1, 3):
        s = select_views(rows, RowLayout(4), per, seed=0, epoch=1)
        assert np.array_equal(np.bincount(s // 4), np.full(10, per))
    part = np.array([0, 1, 5, 9, 10, 11])  # a sample may have fewer rows (a split): take what it has
    s = select_views(part, RowLayout(4), 2, seed=0, epoch=1)
    assert np.array_equal(np.bincount(s // 4, minlength=3), [2, 1, 2])


def test_holdout_is_by_sample_and_evaluates_clean_views(vstore, tmp_path):
    reader = open_store(vstore["store"])
    tr, ev = eval_split(reader, 0.2, None)
    assert set(tr // K).isdisjoint(set(ev // K)) and np.all(ev % K == 0) and len(ev) == round(0.2 * N)
    r = train(TrainConfig(student={"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}}, epochs=2,
                          views_per_epoch=1, holdout=0.2, batch_size=16), vstore["store"], tmp_path / "run",
              final_eval=False)
    assert r.final["rows"] == len(ev)
    assert r.history[-1]["step"] == 2 * int(np.ceil(len(tr) / K / 16))  # one view of each training sample per epoch


def _tamper(store: Path, edit) -> None:
    g = zarr.open_group(str(store), mode="r+")
    attrs = dict(g.attrs["darkstore"])
    edit(attrs["views"])
    g.attrs["darkstore"] = attrs


def test_an_unreplayable_recipe_is_refused(vstore, tmp_path):
    import shutil

    cases = {
        "unknown op": (lambda v: v["recipe"]["ops"].__setitem__(0, {"op": "elastic", "alpha": 50.0}),
                       "cannot replay the store's augmentation recipe"),
        "other pixels": (lambda v: v.update(pixel_digest="0" * 64, pixel_sketch=[s + 0.01 for s in v["pixel_sketch"]],
                                            device="cuda (a GPU)"),
                         "rebuilds the store's views differently from the cuda (a GPU) that made them"),
        "recipe version": (lambda v: v.update(version=99), "recipe version 99"),
    }
    for what, (edit, msg) in cases.items():
        store = tmp_path / what.replace(" ", "_")
        shutil.copytree(vstore["store"], store)
        _tamper(store, edit)
        with pytest.raises(ReplayError, match=re.escape(msg)):
            make_loader(open_store(store), np.arange(10), batch_size=4)
        r = subprocess.run([*DARKSTORE, "train", "--store", str(store), "--student", "mlp", "--arch-kwargs",
                            '{"in_features": 64, "hidden": [8]}', "--epochs", "1", "--out", str(tmp_path / "run")],
                           env=cli_env(), capture_output=True, text=True)
        assert r.returncode == 2 and msg.split(" (")[0] in r.stderr, (what, r.stderr)


def test_bad_recipes_are_refused():
    with pytest.raises(ValueError, match="must be the last op"):
        AugmentSpec.model_validate({"views": 2, "ops": [{"op": "mixup"}, {"op": "hflip"}]})
    with pytest.raises(ValueError, match="elastic"):
        AugmentSpec.model_validate({"views": 2, "ops": [{"op": "elastic"}]})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        AugmentSpec.model_validate({"views": 0, "ops": [{"op": "hflip"}]})


def test_views_change_the_job_key(tmp_path, ensemble, arrays):
    plain = job(ensemble, arrays)
    viewed = job(ensemble, arrays, augment=RECIPE)
    other_seed = job(ensemble, arrays, augment={**RECIPE, "seed": 1})
    keys = {j.job_key(["a"], "f") for j in (plain, viewed, other_seed)}
    assert len(keys) == 3
    assert plain.job_key(["a"], "f") == job(ensemble, arrays).job_key(["a"], "f")  # old keys stay valid


def test_mixed_hard_term_against_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, -1])
    y2 = torch.tensor([4, -1, 0, 1, 2, 3])
    lam = torch.tensor([0.3, 0.5, 1.0, 0.0, 0.9, 0.2], dtype=torch.float64)
    got = losses.hard_ce_mixed(s, y, y2, lam)
    logp = s - torch.logsumexp(s, 1, keepdim=True)
    ref = []
    for i in range(6):
        ce1 = -logp[i, y[i]] if y[i] >= 0 else torch.tensor(0.0, dtype=torch.float64)
        ref.append(lam[i] * ce1 - (1 - lam[i]) * logp[i, y2[i]] if y2[i] >= 0 else ce1)
    assert torch.allclose(got, torch.stack(ref), atol=1e-12)


def test_cli_generate_with_views(tmp_path, ensemble, arrays):
    aug = tmp_path / "aug.yaml"
    aug.write_text(yaml.safe_dump({"ops": [{"op": "affine", "translate": 0.125}]}))
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(ensemble), "--data", str(arrays), "--views", "3",
                        "--augment", str(aug), "--out", str(tmp_path / "s")], env=cli_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert open_store(tmp_path / "s").meta.num_rows == 3 * 300
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(ensemble), "--data", str(arrays), "--views", "3",
                        "--out", str(tmp_path / "t")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "--views needs --augment" in r.stderr


def test_views_of_a_jpeg_folder_by_two_shard_processes_replay_in_loader_workers(tmp_path):
    """The ImageNet-shaped path, small: JPEGs of several shapes resized by their shorter side and centre-cropped
    (8-bit resampling), views with a crop to another size and mixup made by two `generate --shard` processes at
    once, then replayed in DataLoader worker processes: the teachers rerun on the replayed views reproduce the
    stored targets (float64 reference), and `train` runs on it through the CLI."""
    from PIL import Image

    from darkstore.models import ModelSpec, load_model

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            w, h = [(50, 40), (40, 50), (64, 48), (44, 44)][i % 4]
            pixels = (rng.random((h, w, 3)) * 90 + np.array([70 * c, 60, 150 - 50 * c])).clip(0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.jpg", quality=90)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"kind": "image_folder", "root": "imgs", "short_side": 36,
                                                        "crop": 36, "resample": "uint8"}))
    ens = make_ensemble(tmp_path / "teachers", [{"arch": "small_cnn", "arch_kwargs": {"in_channels": 3, "width": 4}}],
                        num_classes=3)
    (tmp_path / "aug.yaml").write_text(yaml.safe_dump({"views": 3, "ops": [
        {"op": "resized_crop", "scale": [0.4, 1.0], "size": [32, 32]}, {"op": "hflip", "p": 0.5},
        {"op": "color_jitter", "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05},
        {"op": "mixup", "alpha": 0.4}]}))
    gen = [*DARKSTORE, "generate", "--teachers", str(ens), "--data", "data.yaml", "--augment", "aug.yaml",
           "--chunk-rows", "16", "--out", "store"]
    shards = [subprocess.Popen([*gen, "--shard", f"{i}/2"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in shards:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    reader = open_store(tmp_path / "store")
    assert reader.complete and reader.meta.num_rows == 24 * 3 and reader.meta.views.version == 2

    batches = list(make_loader(reader, np.arange(72), batch_size=16, shuffle=False, num_workers=2).epoch(0))
    x = torch.cat([b.x for b in batches]).double()
    assert x.shape == (72, 3, 32, 32)
    m = yaml.safe_load(ens.read_text())["members"][0]
    spec = ModelSpec(**{**m, "weights": str(ens.parent / m["weights"])})
    with torch.no_grad():
        ell = load_model(spec, num_classes=3).module.double().eval()(x).numpy()
    ell -= ell.max(axis=1, keepdims=True)
    stored = torch.cat([b.logits for b in batches]).double().numpy()
    assert np.allclose(stored, ell, rtol=2 ** -10, atol=2 ** -10 * np.abs(ell).max())
    assert any(bool((b.mix_labels >= 0).any()) for b in batches)

    r = subprocess.run([*DARKSTORE, "train", "--store", "store", "--student", "small_cnn", "--arch-kwargs",
                        '{"in_channels": 3, "width": 4}', "--epochs", "2", "--batch-size", "16", "--num-workers", "2",
                        "--views-per-epoch", "1", "--out", "run"], cwd=tmp_path, env=cli_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "student.safetensors").exists()


@pytest.mark.parametrize("row_order", ["natural", "shuffled"])
def test_a_mixed_view_carries_its_partner_samples_label_in_any_row_order(tmp_path, row_order):
    """The partner a mix op draws is a transfer-set sample; its hard label is that sample's, wherever the
    store's row order put the sample's rows."""
    arrays = make_arrays(tmp_path / "x.npz", n=40, classes=5)
    ens = make_ensemble(tmp_path / "teachers", MEMBERS[:1])
    recipe = {"views": 3, "ops": [{"op": "mixup", "alpha": 1.0}]}
    store = generate(job(ens, arrays, chunk_rows=16, augment=recipe, row_order=row_order), tmp_path / "s").path
    reader = open_store(store)
    assert reader.meta.row_order == row_order
    y = np.load(arrays)["y"]
    params = reader.read_field("view_params")
    col = AugmentSpec.model_validate(recipe).partner_column()
    seen = 0
    for b in make_loader(reader, np.arange(reader.meta.num_rows), batch_size=16, seed=0).epoch(0):
        partner = params[b.rows.numpy(), col].astype(np.int64)
        mixed = partner >= 0
        assert np.array_equal(b.mix_labels.numpy(), np.where(mixed, y[np.where(mixed, partner, 0)], -1))
        assert np.array_equal(b.labels.numpy(), y[reader.read(b.rows.numpy(), ["index"])["index"]])
        seen += int(mixed.sum())
    assert seen == 40 * 2  # every view but the clean view 0 is mixed


def test_clean_view_targets_ablation_pairs_views_with_their_samples_clean_targets(vstore):
    reader = open_store(vstore["store"])
    all_logits = reader.read_field("logits")
    matched = list(make_loader(reader, np.arange(N * K), batch_size=23, seed=1).epoch(1))
    clean = list(make_loader(reader, np.arange(N * K), batch_size=23, seed=1, view_targets="clean").epoch(1))
    for a, b in zip(matched, clean):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.x, b.x)  # the same views, in the same order
        assert np.array_equal(a.logits.numpy(), all_logits[a.rows.numpy()])
        assert np.array_equal(b.logits.numpy(), all_logits[(b.rows.numpy() // K) * K])  # view 0's targets
    with pytest.raises(ValueError, match="view_targets"):
        make_loader(reader, np.arange(8), batch_size=4, view_targets="stale")


def test_affine_shift_draws_whole_pixels_uniformly_translate_does_not():
    from darkstore.views import AugmentSpec

    def shifts(op):
        aug = AugmentSpec.model_validate({"views": 2, "ops": [op], "clean_view0": False})
        p = aug.draw(np.arange(20000), np.zeros(20000, dtype=np.int64), (1, 8, 8), 20000)
        tx = p[:, aug.param_names().index("affine0.tx")]
        return np.bincount(tx.astype(int) + 2, minlength=5) / len(p)

    uniform = shifts({"op": "affine", "shift": 2})
    np.testing.assert_allclose(uniform, [0.2] * 5, atol=0.015)
    fraction = shifts({"op": "affine", "translate": 0.25})  # 0.25 · 8 px = 2 px: the documented, uneven law
    np.testing.assert_allclose(fraction, [0.125, 0.25, 0.25, 0.25, 0.125], atol=0.015)
    with pytest.raises(Exception, match="not both"):
        AugmentSpec.model_validate({"views": 2, "ops": [{"op": "affine", "shift": 1, "translate": 0.1}]})


ONE_OP = [
    {"op": "affine", "degrees": 30, "translate": 0.2, "scale": [0.8, 1.2]},
    {"op": "affine", "shift": 2},
    {"op": "hflip", "p": 0.5},
    {"op": "resized_crop", "scale": [0.3, 1.0], "size": [6, 6]},
    {"op": "color_jitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 17, 12)])
@pytest.mark.parametrize("ops", [[o] for o in ONE_OP] + [RECIPE["ops"], ONE_OP[:3] + [{"op": "mixup", "alpha": 0.4}]],
                         ids=lambda ops: "+".join(o["op"] for o in ops))
def test_batch_replay_is_bit_exact_with_the_per_row_definition(ops, shape, threads):
    """Version 1's batch form (one op call per batch) must give the very pixels of apply_one row by row."""
    if shape[0] == 1 and any(o["op"] == "color_jitter" and o.get("saturation") for o in ops):
        pytest.skip("saturation and hue need 3 channels")
    aug = AugmentSpec.model_validate({"views": 6, "ops": ops, "seed": 3}).at_version(1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((40, *shape), dtype=np.float32))

    class Base:
        def get_batch(self, rows):
            return x[torch.as_tensor(np.asarray(rows))], None

    samples = np.repeat(np.arange(20), 6)[:100]
    views = np.tile(np.arange(6), 20)[:100]
    params = aug.draw(samples, views, shape, 40)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = aug.apply(Base(), samples, params)
        want = []
        for s, p in zip(samples, params):
            partner = x[int(p[aug.partner_column()])] if aug.mix_op and p[1] == 0 else None
            want.append(aug.apply_one(x[s], p, partner))
    finally:
        torch.set_num_threads(old)
    want = torch.stack(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max |Δ| {(got - want).abs().max()}"
    if got.shape[1:] == x.shape[1:]:  # the ops really changed the augmented rows
        assert not torch.equal(got[views != 0], x[samples[views != 0]])


# --- recipe version 2: batched draws and kernels; version 1 stores as they were made ----------------

V1_STORE = Path(__file__).parent / "data" / "views_v1_store"
V1_RECIPE = {"views": 3, "ops": RECIPE["ops"]}


def test_version2_draws_are_a_pure_function_of_seed_sample_and_view():
    aug = AugmentSpec.model_validate({**RECIPE, "views": 6, "seed": 7})
    assert aug.version == 2
    samples, views = np.repeat(np.arange(50), 6), np.tile(np.arange(6), 50)
    whole = aug.draw(samples, views, (3, 16, 16), 50)
    pick = np.random.default_rng(0).permutation(len(samples))[:77]
    np.testing.assert_array_equal(aug.draw(samples[pick], views[pick], (3, 16, 16), 50), whole[pick])
    # each op draws from its own stream: another option of one op leaves the others' parameters alone
    other = AugmentSpec.model_validate({**RECIPE, "views": 6, "seed": 7, "ops": [
        {**RECIPE["ops"][0], "degrees": 5}, *RECIPE["ops"][1:]]})
    redrawn = other.draw(samples, views, (3, 16, 16), 50)
    names = aug.param_names()
    for j, name in enumerate(names):
        same = np.array_equal(redrawn[:, j], whole[:, j])
        assert same != (name == "affine0.angle"), name
    assert not np.array_equal(AugmentSpec.model_validate({**RECIPE, "views": 6, "seed": 8}).draw(
        samples, views, (3, 16, 16), 50), whole)


def test_version2_draws_follow_the_same_laws_as_version1():
    from scipy import stats

    recipe = {"views": 2, "clean_view0": False, "ops": [{"op": "resized_crop", "scale": [0.2, 1.0]},
                                                          {"op": "hflip", "p": 0.3}, {"op": "mixup", "alpha": 0.4}]}
    n = 6000
    samples, views = np.arange(n), np.zeros(n, dtype=np.int64)
    p1 = AugmentSpec.model_validate(recipe).at_version(1).draw(samples, views, (3, 24, 20), 100)
    p2 = AugmentSpec.model_validate(recipe).draw(samples, views, (3, 24, 20), 100)
    area = lambda p: p[:, 4] * p[:, 5] / (24 * 20)  # noqa: E731 — height · width / image
    assert stats.ks_2samp(area(p1), area(p2)).pvalue > 1e-3
    assert stats.ks_2samp(p1[:, 4] / p1[:, 5], p2[:, 4] / p2[:, 5]).pvalue > 1e-3
    assert ((p2[:, 2] >= 0) & (p2[:, 2] + p2[:, 4] <= 24) & (p2[:, 3] >= 0) & (p2[:, 3] + p2[:, 5] <= 20)).all()
    assert abs(p2[:, 6].mean() - 0.3) < 0.02
    assert stats.kstest(p2[:, 8], stats.beta(0.4, 0.4).cdf).pvalue > 1e-3  # λ ~ Beta(α, α)
    assert set(np.unique(p2[:, 7])) <= set(range(100)) and len(np.unique(p2[:, 7])) == 100


@pytest.mark.parametrize("mix", ["mixup", "cutmix", None])
def test_version2_views_made_in_blocks_are_the_whole_batchs_pixels(monkeypatch, mix):
    """On a CPU the views are made a block of rows at a time; any block size gives the same bits."""
    import darkstore.views as views_mod

    ops = [{"op": "resized_crop", "scale": [0.35, 1.0], "size": [12, 12]}, {"op": "hflip", "p": 0.5},
           {"op": "color_jitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}]
    aug = AugmentSpec.model_validate({"views": 5, "seed": 2, "ops": ops + ([{"op": mix, "alpha": 0.4}] if mix else [])})
    x = torch.from_numpy(np.random.default_rng(1).random((30, 3, 16, 16), dtype=np.float32))

    class Base:
        def get_batch(self, rows):
            return x[torch.as_tensor(np.asarray(rows))], None

    samples, views = np.repeat(np.arange(30), 5)[7:110], np.tile(np.arange(5), 30)[7:110]
    params = aug.draw(samples, views, (3, 16, 16), 30)
    made = {}
    for block in (1, 3 * 16 * 16 * 4 * 7, 1 << 40):  # one row, 7 rows (or fewer with partners), all of them
        monkeypatch.setattr(views_mod, "CPU_BLOCK_BYTES", block)
        made[block] = aug.apply(Base(), samples, params)
    whole = made.pop(1 << 40)
    assert whole.shape == (len(samples), 3, 12, 12)
    for block, got in made.items():
        assert torch.equal(got, whole), block
    assert not torch.equal(whole[views != 0], aug.apply(Base(), samples, aug.draw(samples, views + 5, (3, 16, 16), 30))[
        views != 0])


def test_a_version2_store_records_how_its_views_were_made(vstore):
    v = open_store(vstore["store"]).meta.views
    assert v.version == 2 and v.device == "cpu" and v.torch == torch.__version__
    assert len(v.pixel_sketch) == 64 and v.pixel_rms > 0


def test_views_made_in_loader_workers_or_inline_are_the_same_store(tmp_path, ensemble, arrays):
    spec = job(ensemble, arrays, chunk_rows=64, augment={**RECIPE, "views": 3})
    a = open_store(generate(spec, tmp_path / "inline", num_workers=0).path)
    b = open_store(generate(spec, tmp_path / "workers", num_workers=2).path)
    for field in ("logits", "view_params", "index"):
        np.testing.assert_array_equal(a.read_field(field), b.read_field(field), err_msg=field)


@pytest.fixture
def v1_views(tmp_path):
    import shutil

    shutil.copytree(V1_STORE, tmp_path / "v1")
    return tmp_path / "v1"


def test_a_version1_store_replays_its_recorded_pixels(v1_views):
    reader = open_store(v1_views / "store")
    assert reader.meta.views.version == 1
    data = open_transfer_set({"kind": "arrays", "path": str(v1_views / "transfer.npz")})
    x = torch.from_numpy(np.load(v1_views / "transfer.npz")["x"])
    aug = AugmentSpec.model_validate(V1_RECIPE).at_version(1)
    params, index = reader.read_field("view_params"), reader.read_field("index")
    col = aug.partner_column()
    for b in make_loader(reader, np.arange(reader.meta.num_rows), batch_size=16, data=data, seed=2).epoch(0):
        rows = b.rows.numpy()
        want = torch.stack([aug.apply_one(x[index[r]], params[r], x[int(params[r, col])] if params[r, 1] == 0 else None)
                            for r in rows])
        assert torch.equal(b.x, want)  # torchvision row by row, as the store was made


def test_a_version1_store_resumes_as_version1(v1_views):
    store = v1_views / "store"
    before = open_store(store)
    old = {f: before.read_field(f) for f in ("logits", "view_params")}
    zarr.open_group(str(store), mode="r+")["done"][1] = 0  # as if the run had stopped before chunk 1's commit
    spec = job(v1_views / "teachers" / "ensemble.yaml", v1_views / "transfer.npz", chunk_rows=16, augment=V1_RECIPE)
    written = []
    w = generate(spec, store, on_rows=written.append)
    assert sum(written) == 16 and w.meta.views.version == 1 and w.pending_chunks() == []
    after = open_store(store)
    for f, a in old.items():
        np.testing.assert_array_equal(after.read_field(f), a, err_msg=f)  # chunk 1 recomputed, bit for bit


def _perturb(monkeypatch, how: str) -> None:
    """Another device type's rounding (the contrast mean summed in float32), or another image (brightness 1 %
    off): what replay must accept, and what it must refuse."""
    from darkstore import kernels

    if how == "rounding":
        def contrast(x, factor):
            mean = kernels.grayscale(x).mean(dim=(-3, -2, -1), keepdim=True) * (1 + 2 ** -22)
            return kernels._keep_where(np.asarray(factor) == 1, x, kernels._mix(x, mean, kernels._rows(factor, x)))
        monkeypatch.setattr(kernels, "contrast", contrast)
    else:
        brightness = kernels.brightness
        monkeypatch.setattr(kernels, "brightness", lambda x, f: brightness(x, np.asarray(f) * 1.01))


def test_replay_elsewhere_is_accepted_within_rounding_and_checked_against_the_stored_targets(vstore, monkeypatch,
                                                                                             caplog):
    _perturb(monkeypatch, "rounding")
    reader = open_store(vstore["store"])
    with caplog.at_level("INFO", logger="darkstore.views"):
        batch = next(iter(make_loader(reader, np.arange(N * K), batch_size=N * K, shuffle=False).epoch(0)))
    assert "within rounding" in caplog.text
    from darkstore.models import ModelSpec, load_model

    doc = yaml.safe_load(vstore["ensemble"].read_text())
    z = []
    for m in doc["members"]:
        spec = ModelSpec(**{**m, "weights": str(vstore["ensemble"].parent / m["weights"])})
        with torch.no_grad():
            z.append(load_model(spec, num_classes=5).module.double().eval()(batch.x.double()).numpy())
    ell = np.mean(z, axis=0)
    ell = ell - ell.max(axis=1, keepdims=True)
    # the teachers on these pixels give the stored targets, within the same bound as on the exact replay
    assert np.allclose(batch.logits.double().numpy(), ell, rtol=2 ** -10, atol=2 ** -10 * np.abs(ell).max())


def test_replay_of_other_pixels_is_refused(vstore, monkeypatch):
    _perturb(monkeypatch, "image")
    with pytest.raises(ReplayError, match="rebuilds the store's views differently from the cpu that made them"):
        make_loader(open_store(vstore["store"]), np.arange(10), batch_size=4)
