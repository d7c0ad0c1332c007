"""Language-model students: a causal LM over the store's token rows (their inputs are in the store), the
per-token loss against each position's targets a slice of positions at a time, judged by held-out perplexity."""

from __future__ import annotations

from typing import Any

from storage.kinds import Tokens

from ..export import export_lm_run
from ..lm_eval import TokenEvalRows, check_eval_store, sequence_split, teacher_top1
from ..lm_train import LMRecipe, evaluate_lm_run
from ..tables import num, pct
from .base import StudentKind


class TokenStudents(StudentKind):
    name = Tokens.name
    recipe = LMRecipe
    metrics = ("perplexity", "bits_per_byte", "top1", "agreement")
    headline = ("perplexity", "held-out perplexity", False, False)
    epoch_metric = ("perplexity", "ppl", ".2f")

    def default_temperature(self, meta):
        """1 (top-k and dense targets are exact there, and per-token distillation trains at 1), or a sampled
        store's own T (the only one its samples estimate)."""
        drawn = meta.targets.spec.drawn_at(meta.targets) if meta.targets else None
        return 1.0 if drawn is None else drawn

    def check_eval_store(self, meta, ev_reader):
        super().check_eval_store(meta, ev_reader)
        check_eval_store(meta, ev_reader.meta, ev_reader.path)

    def split(self, reader, holdout, ev_reader, ev_data):
        tr, ev = sequence_split(reader, holdout, ev_reader)
        return tr, ev, TokenEvalRows(ev_reader or reader, ev, whole_store=ev_reader is not None)

    def loss(self, targets, student_logits, batch, *, alpha, topk_loss):
        """The student's [B, L, V] logits: the mean over positions with a loss."""
        return targets.loss_from_hidden(student_logits, lambda z: z, batch, alpha=alpha, topk_loss=topk_loss)

    def teacher_argmax(self, batch, meta):
        """[B, L] the teachers' most likely next token at every position (a sampled store: the most drawn)."""
        flat = {k: v.flatten(0, 1) for k, v in batch.stored().items()}
        return teacher_top1(flat, meta).view(batch.labels.shape)

    def evaluate_run(self, run, summary, *, store=None, data=None, device="cpu", latency=True, write=True,
                     allow_code=False, roots=None, fingerprints=None, cache_dir=None):
        return evaluate_lm_run(run, summary, store=store, device=device, write=write, allow_code=allow_code)

    def held_out_text(self, final):
        """The student's perplexity, its teachers' beside it, bits per byte, top-1 and agreement."""
        f, teachers = final, final.get("teacher_perplexity")
        line = f"held-out: perplexity {f['perplexity']:.3f}" + (f" (teachers {teachers:.3f})" if teachers else "")
        if f.get("bits_per_byte") is not None:
            line += f"  bits/byte {f['bits_per_byte']:.4f}"
        return line + f"  top-1 {f['top1']:.4f}  agreement {f['agreement']:.4f}  ({f['positions']:,} positions)"

    def export_run(self, run, fmt, out, allow_code):
        return export_lm_run(run, fmt, out, allow_code)

    def vs_teachers(self, run: dict[str, Any]) -> list[dict[str, str]]:
        """A language-model student beside its teachers: perplexity, bits per byte, top-1, agreement, sizes."""
        ev = run["eval"]
        m, tm, comp = ev["metrics"], ev["teacher_metrics"], ev["compression"]
        st, te = comp["student"], comp["teachers"]
        return [
            {"": "held-out perplexity", "student": num(m.get("perplexity"), ".3f"),
             "teachers": num(tm.get("perplexity"), ".3f")},
            {"": "bits per byte", "student": num(m.get("bits_per_byte"), ".4f"),
             "teachers": num(tm.get("bits_per_byte"), ".4f")},
            {"": "top-1, next token (%)", "student": pct(m.get("top1")), "teachers": "—"},
            {"": "agreement with teachers (%)", "student": pct(m.get("agreement")), "teachers": "100.00"},
            {"": "parameters", "student": f"{st['params']:,}", "teachers": f"{te['params']:,} ({te['members']} members)"},
            {"": "size on disk (KiB)", "student": num(st.get("size_bytes") and st["size_bytes"] / 1024, ".1f"),
             "teachers": num(te.get("size_bytes") and te["size_bytes"] / 1024, ".1f")},
        ]
