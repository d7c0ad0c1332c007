"""Students of classes: a classifier per row, its inputs from the store's transfer set (checked by fingerprint),
Hinton's loss against the row's targets, judged by held-out accuracy."""

from __future__ import annotations

from typing import Any

import json

from darkstore.models import ModelSpec, load_model
from storage import open_store
from storage.errors import SchemaError
from storage.kinds import Classes

from .. import objectives
from ..eval_cache import EvalRows, eval_split, teacher_view
from ..eval_report import evaluate_student
from ..export import export_class_run
from ..forms import soft_term
from ..recipe import Recipe, open_checked
from ..tables import num, pct
from .base import StudentKind


class ClassStudents(StudentKind):
    name = Classes.name
    recipe = Recipe
    metrics = ("accuracy", "agreement", "nll", "ece")
    headline = ("accuracy", "held-out accuracy", True, True)
    epoch_metric = ("accuracy", "acc", ".4f")

    def default_temperature(self, meta):
        """4, in Hinton's range."""
        return 4.0

    def open_data(self, reader, data, *, allow_code, roots, fingerprints):
        return open_checked(reader, data, allow_code=allow_code, roots=roots, fingerprints=fingerprints)

    def check_eval_store(self, meta, ev_reader):
        super().check_eval_store(meta, ev_reader)
        if ev_reader.meta.num_classes != meta.num_classes:
            raise SchemaError("the eval store has a different class count from the training store")

    def split(self, reader, holdout, ev_reader, ev_data):
        tr, ev = eval_split(reader, holdout, ev_reader)
        return tr, ev, EvalRows(ev_reader or reader, ev_data, ev)

    def loss(self, targets, student_logits, batch, *, alpha, topk_loss):
        soft = soft_term(targets.meta, targets.plan, topk_loss=topk_loss)
        return objectives.kd(objectives.Step(student_logits, batch, alpha, soft))

    def teacher_argmax(self, batch, meta):
        return teacher_view(batch, meta).argmax(-1)

    def evaluate_run(self, run, summary, *, store=None, data=None, device="cpu", latency=True, write=True,
                     allow_code=False, roots=None, fingerprints=None, cache_dir=None):
        """The student on its held-out rows (the eval store, or the same holdout it trained with) or on every row
        of another labeled ``store``, through its transfer set."""
        s = summary
        weights = run / "student.safetensors"
        spec = ModelSpec.model_validate(s["student"]).model_copy(update={"weights": str(weights)})
        model = load_model(spec, allow_code=allow_code).module.to(device)
        if store is not None:  # another labeled store: all its rows
            reader = open_store(store)
            self.check_eval_store(open_store(s["store"], allow_incomplete=True).meta, reader)
            rows = reader.finished_rows()
        else:
            train_reader = open_store(s["store"], allow_incomplete=True)
            ev = open_store(s["eval_store"]) if s.get("eval_store") else None
            _, rows = eval_split(train_reader, s.get("holdout") or 0.0, ev)
            reader = ev or train_reader
        data = open_checked(reader, data, allow_code=allow_code, roots=roots, fingerprints=fingerprints)
        report = evaluate_student(model, spec, reader, data, rows, device=device, weights_path=weights,
                                  latency=latency, allow_code=allow_code, roots=roots, cache_dir=cache_dir)
        if store is None and len(rows) != s.get("eval_rows", len(rows)):
            report["note"] = (f"the run was evaluated on {s['eval_rows']} rows at training time; the store now "
                              f"gives {len(rows)} (it was incomplete then)")
        if write and store is None:
            (run / "eval.json").write_text(json.dumps(report, indent=2))
        return report

    def held_out_text(self, final):
        def value(key: str) -> str:
            v = final.get(key)
            return "n/a (no labels)" if v is None or v != v else f"{v:.4f}"

        return (f"held-out: accuracy {value('accuracy')}  agreement {value('agreement')}  NLL {value('nll')}  "
                f"({final.get('rows', 0)} rows)")

    def export_run(self, run, fmt, out, allow_code):
        return export_class_run(run, fmt, out, allow_code)

    def vs_teachers(self, run: dict[str, Any]) -> list[dict[str, str]]:
        ev = run["eval"]
        m, tm, comp = ev["metrics"], ev["teacher_metrics"], ev["compression"]
        st, te = comp["student"], comp["teachers"]
        # timings depend on the torch threads they ran with (a sweep's runs get a share of the cores; `darkstore eval`
        # all of them): say how many
        threads = f"{comp['threads']} torch thread{'s' if comp['threads'] != 1 else ''}" if comp.get("threads") else "threads not recorded"
        rows = [
            {"": "held-out accuracy (%)", "student": pct(m.get("accuracy")), "teachers": pct(tm.get("accuracy"))},
            {"": "agreement with teachers (%)", "student": pct(m.get("agreement")), "teachers": "100.00"},
            {"": "NLL", "student": num(m.get("nll"), ".4f"), "teachers": num(tm.get("nll"), ".4f")},
            {"": "ECE (%)", "student": pct(m.get("ece")), "teachers": pct(tm.get("ece"))},
            {"": "parameters", "student": f"{st['params']:,}", "teachers": f"{te['params']:,} ({te['members']} members)"},
            {"": "size on disk (KiB)", "student": num(st.get("size_bytes") and st["size_bytes"] / 1024, ".1f"),
             "teachers": num(te.get("size_bytes") and te["size_bytes"] / 1024, ".1f")},
            {"": f"CPU latency, batch 1 (ms, {threads})", "student": num(st.get("latency_ms_batch1"), ".3f"),
             "teachers": num(te.get("latency_ms_batch1"), ".3f")},
            {"": f"CPU throughput (samples/s, {threads})", "student": num(st.get("throughput_per_s"), ",.0f"),
             "teachers": num(te.get("throughput_per_s"), ",.0f")},
        ]
        return rows
