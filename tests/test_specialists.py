"""Generalist + specialists (teacher_service.specialists): the combination against an independent float64
minimisation of the same objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_service.specialists import SpecialistSets, active_specialists, combine_specialists, objective

SUBSETS = [[0, 1, 2], [3, 4, 5, 6], [2, 7], [9, 10]]
C = 12


def _problem(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    pg = rng.dirichlet(np.full(C, 0.5), rows)
    ps = [rng.dirichlet(np.full(len(s) + 1, 0.7), rows) for s in SUBSETS]
    active = rng.random((rows, len(SUBSETS))) < 0.6
    active[0] = False  # a row no specialist takes part in
    active[1] = True  # and one where every one does
    return pg, ps, active


def _definition(q: np.ndarray, pg: np.ndarray, ps: list[np.ndarray], active: np.ndarray) -> float:
    """KL(p_g ‖ q) + Σ_active KL(p_m ‖ q_m) for one row, written out from the paper's definition."""
    def kl(p, r):
        return float(np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(r, 1e-300))), 0)))

    total = kl(pg, q)
    for m, s in enumerate(SUBSETS):
        if active[m]:
            qm = np.append(q[s], 1.0 - q[s].sum())
            total += kl(ps[m], qm)
    return total


def _reference(pg, ps, active) -> np.ndarray:
    """An independent minimiser: SLSQP over the simplex, in float64, from the definition above."""
    from scipy.optimize import minimize

    out = []
    for b in range(len(pg)):
        row = [p[b] for p in ps]
        res = minimize(lambda q: _definition(q, pg[b], row, active[b]), pg[b], method="SLSQP",
                       bounds=[(1e-12, 1.0)] * C, constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1.0}],
                       options={"ftol": 1e-15, "maxiter": 2000})
        assert res.success, res.message
        out.append(res.x / res.x.sum())
    return np.array(out)


def test_the_combination_minimises_the_papers_objective_against_an_independent_float64_solver():
    pg, ps, active = _problem(rows=8, seed=0)
    sets = SpecialistSets.of(SUBSETS, C)
    q = combine_specialists(torch.from_numpy(pg), [torch.from_numpy(p) for p in ps], sets,
                            torch.from_numpy(active), iterations=20_000, tol=1e-13).numpy()
    ref = _reference(pg, ps, active)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(q, ref, atol=2e-5)
    for b in range(len(pg)):  # at least as good as the reference's minimum
        ours, theirs = (_definition(x[b], pg[b], [p[b] for p in ps], active[b]) for x in (q, ref))
        assert ours <= theirs + 1e-9, (b, ours, theirs)
    np.testing.assert_allclose(q[0], pg[0], atol=1e-15)  # no active specialist: the generalist's own
    # the library's objective is the definition
    got = objective(torch.from_numpy(q), torch.from_numpy(pg), [torch.from_numpy(p) for p in ps], sets,
                    torch.from_numpy(active)).numpy()
    want = [_definition(q[b], pg[b], [p[b] for p in ps], active[b]) for b in range(len(pg))]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_float32_on_a_batch_is_the_float64_result_within_rounding():
    pg, ps, active = _problem(rows=256, seed=1)
    sets = SpecialistSets.of(SUBSETS, C)
    q64 = combine_specialists(torch.from_numpy(pg), [torch.from_numpy(p) for p in ps], sets,
                              torch.from_numpy(active), iterations=20_000, tol=1e-13)
    q32 = combine_specialists(torch.from_numpy(pg).float(), [torch.from_numpy(p).float() for p in ps], sets,
                              torch.from_numpy(active))
    assert (q32.double() - q64).abs().max() < 1e-4


def test_specialists_that_agree_with_the_generalist_change_nothing_and_confident_ones_move_mass():
    pg, ps, _ = _problem(rows=4, seed=2)
    sets = SpecialistSets.of(SUBSETS, C)
    agree = []
    for s in SUBSETS:  # each specialist reports exactly the generalist's view of its classes
        inside = pg[:, s]
        agree.append(np.concatenate([inside, 1 - inside.sum(1, keepdims=True)], axis=1))
    on = torch.ones(4, len(SUBSETS), dtype=torch.bool)
    q = combine_specialists(torch.from_numpy(pg), [torch.from_numpy(p) for p in agree], sets, on,
                            iterations=5000, tol=1e-14)
    np.testing.assert_allclose(q.numpy(), pg, atol=1e-9)
    sure = [np.tile(np.eye(len(s) + 1)[0], (4, 1)) for s in SUBSETS]  # each sure of its first class
    q = combine_specialists(torch.from_numpy(pg), [torch.from_numpy(p) for p in sure], sets, on).numpy()
    for s in (SUBSETS[0], SUBSETS[1]):
        assert (q[:, s[0]] > pg[:, s[0]]).all() and (q[:, s[1]] < pg[:, s[1]]).all()


def test_active_specialists_are_those_meeting_the_generalists_top_n():
    sets = SpecialistSets.of(SUBSETS, C)
    pg = torch.full((3, C), 0.01)
    pg[0, 4], pg[0, 8] = 0.5, 0.3  # top-1 class 4 (specialist 1), top-2 adds 8 (no specialist)
    pg[1, 2], pg[1, 10] = 0.5, 0.3  # class 2 is in specialists 0 and 2; 10 in 3
    pg[2, 11] = 0.9  # a class no specialist covers
    assert active_specialists(pg, sets, 1).tolist() == [[False, True, False, False], [True, False, True, False],
                                                        [False, False, False, False]]
    assert active_specialists(pg, sets, 2)[1].tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="every class"):
        SpecialistSets.of([list(range(C))], C)
    with pytest.raises(ValueError, match="distinct"):
        SpecialistSets.of([[1, 1]], C)


# --- planning ----------------------------------------------------------------------------------------------
GROUPS = [[0, 4, 7], [1, 2, 8, 11], [3, 6], [5, 9, 10]]  # classes the generalist confuses, interleaved


def _confusing_generalist(tmp_path):
    """A real generalist through the CLI: a linear teacher whose logits for a sample of class c rise for c and,
    less, for c's group — the planted confusion — over an arrays set of noisy one-hot inputs."""
    import subprocess

    import yaml

    from darkstore.models import build_model, save_weights

    from .conftest import DARKSTORE, cli_env

    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 600)
    x = (np.eye(C)[y] + rng.normal(0, 0.3, (600, C))).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x, y=y, class_names=np.array([f"c{k}" for k in range(C)]))
    w = 4.0 * np.eye(C)
    for g in GROUPS:
        w[np.ix_(g, g)] += 3.0
    model = build_model("mlp", C, in_features=C, hidden=[])
    with torch.no_grad():
        model.net[1].weight.copy_(torch.from_numpy(w))
        model.net[1].bias.zero_()
    save_weights(model, tmp_path / "g.safetensors")
    (tmp_path / "ens.yaml").write_text(yaml.safe_dump({"members": [
        {"name": "generalist", "arch": "mlp", "arch_kwargs": {"in_features": C, "hidden": []},
         "weights": "g.safetensors"}]}))
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(tmp_path / "ens.yaml"), "--data",
                        str(tmp_path / "x.npz"), "--out", str(tmp_path / "store"), "--chunk-rows", "128"],
                       env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return tmp_path / "store"


def test_the_plan_recovers_a_planted_confusion_structure_the_same_way_for_a_seed(tmp_path):
    import subprocess

    import yaml

    from .conftest import DARKSTORE, cli_env

    store = _confusing_generalist(tmp_path)
    plans = []
    for name in ("a", "b"):
        r = subprocess.run([*DARKSTORE, "specialists", "plan", "--store", str(store), "--num", "4", "--seed", "3",
                            "--out", str(tmp_path / f"{name}.yaml")], env=cli_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        plans.append(yaml.safe_load((tmp_path / f"{name}.yaml").read_text()))
    assert plans[0] == plans[1]  # deterministic for a seed
    got = sorted(sp["classes"] for sp in plans[0]["specialists"])
    assert got == sorted(sorted(g) for g in GROUPS) and plans[0]["uncovered"] == []
    assert plans[0]["specialists"][0]["class_names"][0].startswith("c")
    # the most confused pairs are pairs within a planted group
    pairs = [tuple(p["classes"]) for p in plans[0]["confused_pairs"]]
    assert pairs and all(any(a in g and b in g for g in GROUPS) for a, b in pairs[:5])
    assert "most confused pairs" in r.stdout and "c0" in r.stdout
    # groups below --min-size stay uncovered, and say so
    r = subprocess.run([*DARKSTORE, "specialists", "plan", "--store", str(store), "--num", "4", "--min-size", "3",
                        "--out", str(tmp_path / "c.yaml")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["uncovered"] == [3, 6]
    r = subprocess.run([*DARKSTORE, "specialists", "plan", "--store", str(store), "--num", "99"], env=cli_env(),
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--num 99" in r.stderr


# --- the combined teacher in a generation job ------------------------------------------------------------------
def test_a_specialists_job_stores_the_combination_of_its_members(tmp_path):
    """--combine specialists through the CLI: the store holds log q for every row, q computed here from the members
    run directly (generalist softmax, specialists' classes + dustbin) with the float64 combination; the store
    records the rule; the trainer calls it exact at T=1 only."""
    import subprocess

    import yaml

    from darkstore import SoftTargets
    from darkstore.models import ModelSpec, build_model, load_model, save_weights
    from storage import open_store

    from .conftest import DARKSTORE, cli_env

    _confusing_generalist(tmp_path)
    subsets = {"sp0": GROUPS[1], "sp1": GROUPS[3]}
    members = [{"name": "generalist", "arch": "mlp", "arch_kwargs": {"in_features": C, "hidden": []},
                "weights": "g.safetensors"}]
    for i, (name, classes) in enumerate(subsets.items()):
        torch.manual_seed(10 + i)
        sp = build_model("mlp", len(classes) + 1, in_features=C, hidden=[8])
        save_weights(sp, tmp_path / f"{name}.safetensors")
        members.append({"name": name, "arch": "mlp", "arch_kwargs": {"in_features": C, "hidden": [8]},
                        "weights": f"{name}.safetensors"})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"members": members, "specialists": subsets}))
    args = [*DARKSTORE, "generate", "--teachers", str(tmp_path / "spec.yaml"), "--data", str(tmp_path / "x.npz"),
            "--combine", "specialists", "--top-n", "2", "--dtype", "float32", "--chunk-rows", "128"]
    r = subprocess.run([*args, "--out", str(tmp_path / "combined")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    store = open_store(tmp_path / "combined")
    rec = store.meta.specialists
    assert rec.generalist == "generalist" and rec.top_n == 2 and [s.classes for s in rec.specialists] == \
        [GROUPS[1], GROUPS[3]] and store.meta.combine == "specialists"
    rows = store.read_all()
    x = torch.from_numpy(np.load(tmp_path / "x.npz")["x"][rows.index])
    out = {}
    with torch.no_grad():
        for m in members:
            model = load_model(ModelSpec(**{**m, "weights": str(tmp_path / m["weights"])}),
                               num_classes=C if m["name"] == "generalist" else len(subsets[m["name"]]) + 1
                               ).module.eval()
            out[m["name"]] = torch.softmax(model(x).double(), -1)
    sets = SpecialistSets.of(list(subsets.values()), C)
    active = active_specialists(out["generalist"], sets, 2)
    q = combine_specialists(out["generalist"], [out["sp0"], out["sp1"]], sets, active, iterations=20_000, tol=1e-13)
    ref = torch.log(q).numpy()
    np.testing.assert_allclose(rows.logits, ref - ref.max(1, keepdims=True), atol=2e-4)
    assert 0 < int(active.any(1).sum()) < len(x)  # some rows take specialists, some none
    r = subprocess.run([*DARKSTORE, "inspect", str(tmp_path / "combined")], env=cli_env(), capture_output=True,
                       text=True)
    assert "specialists: generalist + 2 specialists over 7 classes" in r.stdout and "top 2" in r.stdout
    assert "exact" in SoftTargets(tmp_path / "combined", temperature=1.0).describe()
    assert SoftTargets(tmp_path / "combined", temperature=4.0).describe().startswith("APPROXIMATE")
    # a specialist whose outputs do not match its classes, and a rule without specialists: one clear line each
    bad = {"sp0": GROUPS[1][:-1], "sp1": GROUPS[3]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"members": members, "specialists": bad}))
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(tmp_path / "bad.yaml"), "--data",
                        str(tmp_path / "x.npz"), "--combine", "specialists", "--out", str(tmp_path / "no")],
                       env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "sp0" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(tmp_path / "ens.yaml"), "--data",
                        str(tmp_path / "x.npz"), "--combine", "specialists", "--out", str(tmp_path / "no")],
                       env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "combine specialists needs" in r.stderr


# --- training specialists ------------------------------------------------------------------------------------
def test_specialists_train_from_the_generalist_resume_after_a_kill_and_feed_the_combined_job(tmp_path):
    """plan -> specialists train -> generate --combine specialists, through the CLI. Each specialist's derived
    store holds the generalist's targets collapsed onto its classes + dustbin (against a float64 reference),
    labels remapped and its classes repeated to about half the rows; it starts as the generalist's head cut to
    its classes; training killed after a checkpoint resumes to the weights an uninterrupted run reaches; the
    dustbin is corrected by log(repeat); the ensemble file it writes makes a combined store."""
    import subprocess

    import yaml
    from safetensors.torch import load_file

    from darkstore.models import ModelSpec, load_model
    from storage import open_store

    from .conftest import DARKSTORE, cli_env
    from .procs import kill_after_checkpoint

    gstore = _confusing_generalist(tmp_path)
    r = subprocess.run([*DARKSTORE, "specialists", "plan", "--store", str(gstore), "--num", "4", "--out",
                        str(tmp_path / "plan.yaml")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    sp0 = plan["specialists"][0]
    S = sp0["classes"]
    train = [*DARKSTORE, "specialists", "train", "--plan", str(tmp_path / "plan.yaml"), "--epochs", "30",
             "--batch-size", "32", "--checkpoint-every", "3"]
    # killed mid-run, then run again: it resumes; an uninterrupted run elsewhere reaches the same weights
    kill_after_checkpoint([*train, "--out", str(tmp_path / "sp"), "--only", sp0["name"]],
                          tmp_path / "sp" / "runs" / sp0["name"], cli_env(), grace=0.0)
    assert not (tmp_path / "sp" / "runs" / sp0["name"] / "summary.json").exists()
    r = subprocess.run([*train, "--out", str(tmp_path / "sp"), "--parallel", "2"], env=cli_env(), capture_output=True,
                       text=True)  # every specialist, two processes at a time
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("trained (in its own process)") == len(plan["specialists"])
    assert "resumed from" in (tmp_path / "sp" / "logs" / f"{sp0['name']}.log").read_text()
    r = subprocess.run([*train, "--out", str(tmp_path / "clean"), "--only", sp0["name"]], env=cli_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "sp" / "runs" / sp0["name"] / "student.safetensors"))
    b = load_file(str(tmp_path / "clean" / "runs" / sp0["name"] / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the derived store: collapsed targets, remapped labels, the specialist's classes about half the rows
    derived = open_store(tmp_path / "sp" / "stores" / sp0["name"])
    rec = derived.meta.specialist_of
    g = open_store(gstore).read_all()
    by_sample = np.empty_like(g.logits, dtype=np.float64)
    by_sample[g.index] = g.logits
    labels = np.empty_like(g.labels)
    labels[g.index] = g.labels
    d = derived.read_all()
    z = by_sample[d.index]
    rest = [k for k in range(C) if k not in S]
    ref = np.concatenate([z[:, S], np.log(np.exp(z[:, rest]).sum(1, keepdims=True))], axis=1)
    np.testing.assert_allclose(d.logits, ref - ref.max(1, keepdims=True), rtol=1e-3, atol=2e-3)  # float16 store
    want = np.array([S.index(y) if y in S else len(S) for y in labels[d.index]])
    assert np.array_equal(d.labels, want) and rec.classes == S and rec.repeat > 1
    assert 0.4 < float(np.mean(d.labels < len(S))) < 0.65 and len(d.labels) > len(g.labels)

    # the start: the generalist's head cut to S; the end: log(repeat) added to the dustbin's bias
    spec = ModelSpec(arch="mlp", arch_kwargs={"in_features": C, "hidden": []}, num_classes=len(S) + 1)
    init = load_model(spec.model_copy(update={"weights": str(tmp_path / "sp" / "init" / f"{sp0['name']}.safetensors")})
                      ).module
    gen = load_model(ModelSpec(arch="mlp", arch_kwargs={"in_features": C, "hidden": []},
                               weights=str(tmp_path / "g.safetensors")), num_classes=C).module
    x = torch.randn(5, C)
    with torch.no_grad():
        assert torch.allclose(init(x)[:, :-1], gen(x)[:, S])
    final = load_file(str(tmp_path / "sp" / f"{sp0['name']}.safetensors"))
    assert torch.allclose(final["net.1.bias"][-1], a["net.1.bias"][-1] + np.log(rec.repeat))
    assert torch.equal(final["net.1.bias"][:-1], a["net.1.bias"][:-1]) and torch.equal(final["net.1.weight"],
                                                                                           a["net.1.weight"])

    # the ensemble file it wrote feeds the combined job
    ens = yaml.safe_load((tmp_path / "sp" / "ensemble.yaml").read_text())
    assert set(ens["specialists"]) == {sp["name"] for sp in plan["specialists"]}
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(tmp_path / "sp" / "ensemble.yaml"), "--data",
                        str(tmp_path / "x.npz"), "--combine", "specialists", "--out", str(tmp_path / "combined")],
                       env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert open_store(tmp_path / "combined").complete


def test_a_specialist_is_not_derived_from_an_unfinished_generalist(tmp_path):
    """Half a generalist's store (one of two shards) would derive a store from half the rows, silently."""
    from darkstore.errors import SpecError
    from storage import open_store
    from student_trainer.specialists import derive_store
    from teacher_service.generate import Shard, generate

    from .conftest import MEMBERS, job, make_arrays, make_ensemble

    spec = job(make_ensemble(tmp_path / "t", MEMBERS[1:]), make_arrays(tmp_path / "x.npz", n=100), chunk_rows=20)
    generate(spec, tmp_path / "g", shard=Shard(0, 2))
    half = open_store(tmp_path / "g", allow_incomplete=True)
    assert 0 < half.rows_done < 100
    with pytest.raises(SpecError, match="not complete"):
        derive_store(half, [0, 1], tmp_path / "d")
    assert not (tmp_path / "d").exists()
