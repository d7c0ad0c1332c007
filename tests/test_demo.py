"""The main job: `darkstore demo` on real handwritten digits."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import DARKSTORE, cli_env


@pytest.mark.slow
def test_demo_distilled_student_beats_baseline(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([*DARKSTORE, "demo", "--out", str(out)], env=cli_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = {row["model"].split(",")[0] if row["model"].startswith("student") else row["model"]: row for row in res["rows"]}
    base = res["runs"]["baseline"]
    dist = res["runs"]["distilled"]
    assert len(base) == len(dist) == 3
    mean = lambda runs: sum(x["accuracy"] for x in runs) / len(runs)  # noqa: E731
    assert mean(dist) > mean(base), (mean(dist), mean(base))
    views = res["runs"]["views"]  # targets recorded per view: beats clean-target distillation
    assert len(views) == 3 and mean(views) > mean(dist), (mean(views), mean(dist))
    stale = res["runs"]["stale"]  # the same views paired with clean-input targets
    assert len(stale) == 3 and mean(views) > mean(stale), (mean(views), mean(stale))
    ens = next(row for row in res["rows"] if row["model"].startswith("ensemble"))
    assert ens["accuracy_mean"] > 0.95  # real teachers on real digits
    assert "| student, distilled" in r.stdout and "± " in r.stdout
    for sub in ("stores/train", "stores/test", "stores/train_views", "teachers/ensemble.yaml", "runs", "results.md"):
        assert (out / sub).exists(), sub
    assert rows
