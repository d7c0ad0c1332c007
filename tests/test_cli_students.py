"""`darkstore train --config FILE --set KEY=VALUE` (darkstore_app/cli_students.py): the file's settings, the
overrides over them and the options given on the command line, in that order of precedence."""

from __future__ import annotations

import json
import subprocess

import yaml

from .conftest import DARKSTORE, MEMBERS, cli_env, job, make_arrays, make_ensemble


def test_a_run_file_sets_the_run_and_the_command_line_wins(tmp_path):
    from teacher_service.generate import generate

    arrays = make_arrays(tmp_path / "x.npz", n=120)
    generate(job(make_ensemble(tmp_path / "t", MEMBERS), arrays, chunk_rows=64), tmp_path / "store")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "store": "store", "epochs": 3, "batch_size": 32, "lr": 0.01, "alpha": 0.5,
        "student": {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}}}))
    r = subprocess.run([*DARKSTORE, "train", "--config", str(tmp_path / "run.yaml"), "--set", "epochs=1",
                        "--set", "student.arch_kwargs.hidden=[8]", "--lr", "0.02", "--out", str(tmp_path / "run")],
                       env=cli_env(), capture_output=True, text=True, cwd=tmp_path.parent)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["alpha"]) == (1, 32, 0.02, 0.5)  # --set, file, option
    assert cfg["student"]["arch_kwargs"]["hidden"] == [8] and cfg["temperature"] == 4.0  # a class store's default
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["store"].endswith("store") and str(tmp_path) in summary["store"]  # relative to the file

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"store": "store", "learning_rate": 0.1}))
    r = subprocess.run([*DARKSTORE, "train", "--config", str(tmp_path / "bad.yaml"), "--student", "mlp",
                        "--out", str(tmp_path / "bad")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "unknown setting(s) learning_rate" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
