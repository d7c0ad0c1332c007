"""Ship a trained student: safetensors, TorchScript or ONNX, each checked by reloading it.

Every format takes the same input as the transfer set (``[B, ...]`` float32, before the
student's preprocessing) and returns logits ``[B, C]``: TorchScript and ONNX have the
preprocessing (channel expansion, resize, normalisation) built in; the safetensors export
is weights plus a model spec (``student.json``) that ``darkstore`` loads with the same
preprocessing. An export counts only when the reloaded artefact agrees with the PyTorch
student on real inputs of the run's transfer set:

    max |reloaded − student| ≤ ATOL + RTOL · max |student|      (ATOL = RTOL = 1e-4)

ONNX is reloaded with onnxruntime (CPU), with a dynamic batch axis checked at batch 1 and
at a full batch.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from darkstore.lm import load_student, quiet_transformers
from darkstore.models import ModelSpec, load_model, logits_of, preprocess
from darkstore.transfer import open_transfer_set
from storage import open_store
from student_trainer.errors import ExportError

from .lm_train import TokenStudent, copy_tokenizer, load_run_lm

FORMATS = ("safetensors", "torchscript", "onnx")
ATOL = 1e-4
RTOL = 1e-4
CHECK_ROWS = 64


class Deployable(torch.nn.Module):
    """The student with its preprocessing, returning a logits tensor."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(preprocess(x, self.spec.preprocess)))


@dataclass
class ExportResult:
    format: str
    path: Path
    max_abs_diff: float
    tolerance: float
    batch_sizes: list[int]
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def load_run_student(run: Path, allow_code: bool = False) -> tuple[torch.nn.Module, ModelSpec, dict[str, Any]]:
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise ExportError(f"{run} is not a finished run (no summary.json): train it, or resume it, first")
    s = json.loads(summary_path.read_text())
    spec = ModelSpec.model_validate(s["student"]).model_copy(update={"weights": str(run / "student.safetensors")})
    model = load_model(spec, allow_code=allow_code).module.eval()
    return model, spec, s


def check_inputs(summary: dict[str, Any], rows: int = CHECK_ROWS, allow_code: bool = False) -> torch.Tensor:
    """Real inputs from the run's transfer set (the first ``rows`` samples)."""
    meta = open_store(summary["store"], allow_incomplete=True).meta
    data = open_transfer_set(meta.transfer_set.spec, allow_code=allow_code)
    x, _ = data.get_batch(np.arange(min(rows, len(data))))
    return x.float()


def _compare(ref_fn: Callable[[torch.Tensor], torch.Tensor], got_fn: Callable[[torch.Tensor], torch.Tensor],
             x: torch.Tensor, what: str) -> tuple[float, float, list[int]]:
    worst, tol, sizes = 0.0, 0.0, sorted({1, len(x)})
    with torch.inference_mode():
        for n in sizes:
            ref = ref_fn(x[:n]).float()
            got = torch.as_tensor(got_fn(x[:n])).float()
            if got.shape != ref.shape:
                raise ExportError(f"{what}: reloaded output has shape {tuple(got.shape)}, the student {tuple(ref.shape)}")
            diff = float((got - ref).abs().max())
            t = ATOL + RTOL * float(ref.abs().max())
            worst, tol = max(worst, diff), max(tol, t)
            if not diff <= t:
                raise ExportError(f"{what}: reloaded output differs from the student by {diff:.3g} at batch {n} "
                                  f"(tolerance {t:.3g})")
    return worst, tol, sizes


def export_class_run(run: str | Path, fmt: str, out: str | Path | None = None, allow_code: bool = False
                     ) -> ExportResult:
    """Export a finished class run's student as ``fmt``, reload the file and compare it with the student on the
    run's own inputs. ``allow_code`` as for training: a student built by a factory (or a transfer set made by
    one) runs that code here too."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run = Path(run)
    model, spec, summary = load_run_student(run, allow_code)
    out = Path(out) if out is not None else run / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    x = check_inputs(summary, allow_code=allow_code)
    wrapped = Deployable(model, spec).eval()

    if fmt == "safetensors":
        path = out / "student.safetensors"
        shutil.copyfile(run / "student.safetensors", path)
        doc = spec.model_dump(mode="json", exclude_none=True)
        doc["weights"] = path.name
        (out / "student.json").write_text(json.dumps(doc, indent=2))
        reloaded = load_model(ModelSpec.model_validate(doc), base_dir=out, allow_code=allow_code).module.eval()
        got = Deployable(reloaded, spec).eval()
    elif fmt == "torchscript":
        path = out / "student.torchscript.pt"
        with warnings.catch_warnings():  # torch ≥ 2.9 marks torch.jit deprecated; it still serves C++/mobile runtimes
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(wrapped, x[:2], check_trace=False)
            traced.save(str(path))
            got = torch.jit.load(str(path), map_location="cpu")
    else:
        path = out / "student.onnx"
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({exc}); "
                              "pip install 'darkstore[onnx]'") from exc
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(wrapped, (x[:2],), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, verbose=False,
                          external_data=False)
        onnx.checker.check_model(str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = (lambda b: sess.run(None, {"input": b.numpy()})[0])  # noqa: E731
    diff, tol, sizes = _compare(wrapped, got, x, f"{fmt} export {path}")
    result = ExportResult(fmt, path, diff, tol, sizes, path.stat().st_size)
    (out / "export.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


#: what a language-model student exports as: its weights with a darkstore spec, or a directory transformers loads
LM_FORMATS = ("safetensors", "transformers")


def export_lm_run(run: Path, fmt: str, out: str | Path | None = None, allow_code: bool = False) -> ExportResult:
    """A language-model run's student as safetensors (weights and ``student.json``, which ``darkstore`` loads)
    or as a ``transformers`` directory (``AutoModelForCausalLM`` and ``AutoTokenizer`` load it; the built-in GPT
    becomes a ``GPT2LMHeadModel``), reloaded and compared with the student's logits on the store's first
    rows. A transformers student exports as its directory in both formats."""
    if fmt not in LM_FORMATS:
        raise ExportError(f"a language-model run exports as {' or '.join(LM_FORMATS)}; {fmt!r} is for class "
                          "students")
    quiet_transformers()
    summary = json.loads((run / "summary.json").read_text())
    reader = open_store(summary["store"], allow_incomplete=True)
    seq = reader.meta.sequence
    student = load_run_lm(run, summary, seq.tokenizer, seq.length, allow_code=allow_code)
    rows = reader.finished_rows()[:CHECK_ROWS]
    x = torch.from_numpy(reader.read(rows, ["tokens"])["tokens"][:, :-1].astype(np.int64))
    out = Path(out) if out is not None else run / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    v = seq.tokenizer.vocab_size
    if fmt == "safetensors" and student.lm.kind == "gpt":
        path = out / "student.safetensors"
        shutil.copyfile(run / "student.safetensors", path)
        doc = {**summary["student"], "weights": path.name}
        (out / "student.json").write_text(json.dumps(doc, indent=2))
        spec = ModelSpec.model_validate(doc).rebased(out)
        again = TokenStudent(load_student(spec, seq.tokenizer, length=seq.length, allow_code=allow_code), v).eval()
        got = (lambda b: again.head(again(b)))  # noqa: E731
    else:
        path = out
        if student.lm.kind == "gpt":
            from darkstore.gpt import to_gpt2

            to_gpt2(student.student, eos_id=seq.tokenizer.eos_id).save_pretrained(str(out), safe_serialization=True)
        else:
            student.student.save_pretrained(str(out), safe_serialization=True)
        copy_tokenizer(seq.tokenizer.path, out, seq.chat)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, use_safetensors=True,
                                                  dtype=torch.float32).eval()
        got = (lambda b: hf(input_ids=b).logits[..., :v])  # noqa: E731
    diff, tol, sizes = _compare(lambda b: student.head(student(b)), got, x, f"{fmt} export {path}")
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    result = ExportResult(fmt, path, diff, tol, sizes, size)
    (out / "export.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
