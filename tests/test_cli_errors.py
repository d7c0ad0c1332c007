"""Every user mistake the CLI meets ends in one `error:` line on stderr and exit 2 — no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import DARKSTORE, cli_env, make_arrays, make_ensemble

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    ens = make_ensemble(tmp / "teachers", [{"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}}])
    data = make_arrays(tmp / "transfer.npz", n=80)
    unlabeled = make_arrays(tmp / "unlabeled.npz", n=80, labeled=False)
    whole = data.read_bytes()
    (tmp / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    for name, d in (("store", data), ("unlabeled_store", unlabeled)):
        run(["generate", "--teachers", str(ens), "--data", str(d), "--out", str(tmp / name), "--chunk-rows", "32"],
            expect=0)
    return {"tmp": tmp, "ens": ens, "data": data}


def run(args: list[str], expect: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([*DARKSTORE, *args], env=env or cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == expect, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


def one_error_line(p: subprocess.CompletedProcess, *words: str) -> str:
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, p.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def student(*extra: str) -> list[str]:
    return ["--student", "mlp", "--arch-kwargs", '{"in_features": 64, "hidden": [8]}', "--epochs", "1", *extra]


def test_truncated_transfer_set(made):
    p = run(["generate", "--teachers", str(made["ens"]), "--data", str(made["tmp"] / "truncated.npz"),
             "--out", str(made["tmp"] / "never")])
    one_error_line(p, "cannot read transfer set", "truncated.npz")


def test_bad_json_in_arch_kwargs(made):
    p = run(["train", "--store", str(made["tmp"] / "store"), "--out", str(made["tmp"] / "r1"), "--student", "mlp",
             "--arch-kwargs", "{in_features: 64"])
    one_error_line(p, "--arch-kwargs", "JSON")


def test_student_that_does_not_fit_the_inputs(made):
    p = run(["train", "--store", str(made["tmp"] / "store"), "--out", str(made["tmp"] / "r2"), "--student", "mlp",
             "--arch-kwargs", '{"in_features": 100, "hidden": [8]}', "--epochs", "1"])
    one_error_line(p, "student", "(2, 1, 8, 8)")
    assert not (made["tmp"] / "r2" / "summary.json").exists()


def test_cuda_without_a_gpu(made):
    p = run(["train", "--store", str(made["tmp"] / "store"), "--out", str(made["tmp"] / "r3"), *student(),
             "--device", "cuda"], env={**cli_env(), "CUDA_VISIBLE_DEVICES": ""})
    one_error_line(p, "cuda", "no CUDA device")


def test_generate_on_cuda_without_a_gpu(made):
    p = run(["generate", "--teachers", str(made["ens"]), "--data", str(made["data"]), "--out",
             str(made["tmp"] / "never_cuda"), "--device", "cuda"], env={**cli_env(), "CUDA_VISIBLE_DEVICES": ""})
    one_error_line(p, "--device cuda", "no CUDA device")
    assert not (made["tmp"] / "never_cuda").exists()


def test_a_transfer_set_that_does_not_exist(made):
    p = run(["generate", "--teachers", str(made["ens"]), "--data", str(made["tmp"] / "trian"), "--out",
             str(made["tmp"] / "never_typo")])
    one_error_line(p, "trian", "does not exist")


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_archs_lists_layers_with_or_without_arch_kwargs(arch):
    for extra in ([], ["--arch-kwargs", '{"num_classes": 100}']):
        p = run(["archs", "--layers", arch, *extra], expect=0)
        assert "Conv2d" in p.stdout and "Traceback" not in p.stderr, p.stderr


def test_fp16_on_the_cpu(made):
    p = run(["train", "--store", str(made["tmp"] / "store"), "--out", str(made["tmp"] / "r4"), *student(),
             "--amp", "fp16"])
    one_error_line(p, "fp16", "bf16")


def test_missing_option_is_one_line_too(made):
    p = run(["train", "--store", str(made["tmp"] / "store")])
    one_error_line(p, "--out")


def test_corrupt_zarr_json(made):
    s = copy_store(made["tmp"] / "store", made["tmp"] / "corrupt_meta")
    (s / "zarr.json").write_text((s / "zarr.json").read_text()[:40])
    one_error_line(run(["inspect", str(s), "--verify"]), "corrupt_meta")


def test_truncated_chunk(made):
    s = copy_store(made["tmp"] / "store", made["tmp"] / "truncated_chunk")
    chunk = next(p for p in (s / "logits").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:5])
    one_error_line(run(["inspect", str(s), "--verify"]), "chunk", "logits")


def test_full_disk(made, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC
    p = run(["train", "--store", str(made["tmp"] / "store"), "--out", str(out), *student()])
    one_error_line(p, "No space left on device")


def test_alpha_zero_without_labels_warns(made):
    p = run(["train", "--store", str(made["tmp"] / "unlabeled_store"), "--out", str(made["tmp"] / "r5"), *student(),
             "--alpha", "0"], expect=0)
    assert "warning:" in p.stderr and "no training row has a label" in p.stderr, p.stderr
    assert "accuracy n/a (no labels)" in p.stdout, p.stdout
    assert "nan" not in p.stdout.split("held-out:")[-1].split("NLL")[0]


def test_holdout_zero_without_an_eval_store_trains_on_every_row_and_exits_0(made):
    """Nothing held out is not a mistake: the student is saved, not evaluated, and the run is finished."""
    import json

    out = made["tmp"] / "all_rows"
    p = run(["train", "--store", str(made["tmp"] / "store"), "--out", str(out), "--holdout", "0", *student()],
            expect=0)
    assert "not evaluated" in p.stdout + p.stderr and "Traceback" not in p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_rows"] == 0 and s["final"] == {} and (out / "student.safetensors").exists()
    assert not (out / "eval.json").exists()


def test_help_loads_no_torch():
    """`darkstore --help` and every command's --help answer without importing torch (a second or more of
    start-up): only a command that runs does."""
    probe = ("import sys\nfrom darkstore_app.cli import main\nsys.argv = ['darkstore', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    for args in (["--help"], ["train", "--help"], ["generate", "--help"], ["worker-ping", "--help"]):
        p = subprocess.run([sys.executable, "-c", probe, *args], env=cli_env(), capture_output=True, text=True)
        assert p.returncode == 0 and "Usage" in p.stdout, p.stderr
        assert p.stderr.strip().splitlines()[-1] == "False", args


def test_help_of_every_command_shows_flags_without_a_value_and_choices_as_choices():
    """A flag takes no value, so its help shows no type (typer would print `<bool>`); a choice lists its
    values; a value outside them is one error line."""
    from typer.main import get_command

    from darkstore_app.cli import app

    names = sorted(get_command(app).commands)
    assert {"generate", "train", "sweep", "eval", "serve"} <= set(names)
    for name in names:
        p = subprocess.run([*DARKSTORE, name, "--help"], env={**cli_env(), "COLUMNS": "200"}, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "<bool>" not in p.stdout, (name, [ln for ln in p.stdout.splitlines() if "<bool>" in ln])
        if name in ("generate", "train", "sweep", "eval"):
            assert "<quick|full>" in p.stdout, name
    p = run(["train", "--store", "x", "--student", "mlp", "--out", "y", "--verify-data", "sometimes"])
    assert "sometimes" in one_error_line(p, "verify-data")


def _interrupt(args: list[str], ready, tmp_path: Path) -> subprocess.CompletedProcess:
    """Start ``darkstore ARGS``, press Ctrl-C (SIGINT) once ``ready()`` holds, and return what it said."""
    import signal
    import time

    def as_from_a_terminal():  # SIGINT handled, whatever this test process inherited or set (an ignored SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # passes to children: Python then installs no handler)

    err = tmp_path / "stderr.txt"
    with err.open("w") as fh:
        p = subprocess.Popen([*DARKSTORE, *args], env=cli_env(), stdout=subprocess.PIPE, stderr=fh, text=True,
                             preexec_fn=as_from_a_terminal)
        deadline = time.monotonic() + 120
        while not ready() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert p.poll() is None, err.read_text()
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    return subprocess.CompletedProcess(args, p.returncode, out, err.read_text())


def test_ctrl_c_says_what_was_kept_and_the_command_that_continues(made, tmp_path):
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump({"num_classes": 5, "members": [
        {"name": "slow", "factory": "tests.factories:slow_mlp", "arch_kwargs": {"delay": 1.0}}]}))
    store = tmp_path / "store"
    args = ["generate", "--teachers", str(slow), "--data", str(made["data"]), "--out", str(store),
            "--chunk-rows", "8", "--batch-size", "8", "--allow-code"]
    p = _interrupt(args, lambda: len(list((store / "done" / "c").glob("*"))) >= 2, tmp_path)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(said) == 1 and "of 80 rows are committed" in said[0], p.stderr
    again = said[0].split("continue with: ", 1)[1]
    assert again.startswith("darkstore generate") and str(store) in again
    run = tmp_path / "run"
    args = ["train", "--store", str(made["tmp"] / "store"), "--out", str(run), "--student", "mlp",
            "--arch-kwargs", '{"in_features": 64, "hidden": [8]}', "--epochs", "100000", "--overwrite"]
    p = _interrupt(args, lambda: (run / "checkpoint.pt").exists(), tmp_path)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(said) == 1 and "keeps its checkpoint after epoch" in said[0], p.stderr
    assert said[0].endswith("--resume") and "--overwrite" not in said[0], said[0]
