"""Rows of token sequences (a language model's transfer set): per-position targets, the tokens beside them and a
loss mask; the store's record is ``meta.sequence`` (:class:`storage.schema.SequenceRecord`)."""

from __future__ import annotations

import numpy as np

from ..fieldspec import FieldSpec
from .base import Kind


def _tokens(m) -> bool:
    return m.kind.name == Tokens.name


def _responses(m) -> bool:
    return m.kind.name == Tokens.name and m.sequence.responses is not None


#: why a written response ended, by the code ``finish`` stores
FINISH = ("none", "eos", "stop", "length")


def _engine(m) -> bool:
    return m.kind.name == Tokens.name and m.engine is not None


class Tokens(Kind):
    name = "tokens"
    unit = "tokens"
    ascending_ids = True
    data_kinds = ("text",)
    input_fields = ("tokens", "loss_mask")
    writes_responses = True
    row_fields = (
        FieldSpec("tokens", ("row", "token"), lambda m: (m.num_rows, m.sequence.length + 1),
                  lambda m: m.kind.index_dtype(m), 0, _tokens,
                  doc="a sequence row's token ids: the inputs are tokens[:-1], position t's label is tokens[t + 1]",
                  when="token sequences"),
        FieldSpec("loss_mask", ("row", "position"), lambda m: (m.num_rows, m.sequence.length), lambda m: "uint8", 0,
                  _tokens, doc="1 where a position's label and targets carry a loss (0: padding, prompt)",
                  when="token sequences"),
        FieldSpec("finish", ("row",), lambda m: (m.num_rows,), lambda m: "uint8", 0, _responses,
                  doc="why the row's written response ended: 1 the tokenizer's EOS, 2 a stop string, 3 the "
                      "length (max_new_tokens or the row's end)", when="responses written by the teachers"),
    )
    chunk_fields = (
        FieldSpec("nll", ("chunk", "stat"), lambda m: (m.n_chunks, 1 + m.num_members), lambda m: "float64", 0.0,
                  _tokens, per_row=False, compressed=False,
                  doc="per chunk: the ensemble's and each member's summed negative log-likelihood (nats) of the "
                      "labels at the positions with a loss (a member's: those of teacher_positions), at T = 1",
                  when="token sequences"),
        FieldSpec("teacher_positions", ("chunk",), lambda m: (m.n_chunks,), lambda m: "int64", 0, _tokens,
                  per_row=False, compressed=False,
                  doc="per chunk: the positions with a loss that each teacher's own statistics (its top-1 count in "
                      "stats, its NLL) cover: one in teacher_stride (the sequence record)", when="token sequences"),
        FieldSpec("engine_counts", ("chunk", "count"), lambda m: (m.n_chunks, 2), lambda m: "int64", 0, _engine,
                  per_row=False, compressed=False,
                  doc="per chunk: positions whose tail mass was below what the engine's float32 values resolve "
                      "(stored at the floor), and kept entries of an engine ensemble that estimate a member's "
                      "value (a token that member did not return)", when="engine teachers"),
        FieldSpec("reference_kl", ("chunk", "member"), lambda m: (m.n_chunks, m.num_members), lambda m: "float64",
                  np.nan, _engine, per_row=False, compressed=False,
                  doc="per chunk: the mean KL per token (nats) from each engine member to the same model run "
                      "through transformers on a few rows, where that chunk was checked (NaN: not checked)",
                  when="engine teachers"),
    )

    def inputs(self, fields):
        """The rows' token ids but the last ([B, L], int64) and position t's label, the next token, or -1
        where the loss mask says the position carries no loss."""
        tokens = fields.pop("tokens").astype(np.int64)
        mask = fields.pop("loss_mask").astype(bool)
        return np.ascontiguousarray(tokens[:, :-1]), np.where(mask, tokens[:, 1:], -1)

    def default_chunk_rows(self, data_spec) -> int:
        """About 65,536 positions a chunk."""
        return max(1, 65536 // data_spec.length)

    def targets_for(self, targets):
        return targets.spec.for_tokens(targets)

    def check_job(self, options):
        said = [name for name, on in options.items() if on]
        if said:
            raise ValueError(f"a text transfer set (language-model teachers) takes no {', '.join(said)}")

    def check_token_rows(self, meta, what):
        """Token rows are what those formats hold."""

    def recognises(self, meta) -> bool:
        return meta.sequence is not None

    def length(self, meta) -> int:
        return meta.sequence.length

    def index_dtype(self, meta) -> str:
        """The narrowest dtype that holds the vocabulary (uint16 up to 65,536 tokens, else int32)."""
        return "uint16" if meta.num_classes <= 1 << 16 else "int32"

    def codecs(self, field, meta, compressors):
        """Ids kept in ascending order are stored as their differences, and multi-byte values byte-shuffled
        before compression (what makes a kept top-k entry about 2 bytes: bench/lm.py)."""
        from zarr.codecs.numcodecs import Delta, Shuffle

        dtype = np.dtype(field.dtype(meta))
        filters = [Delta(dtype=dtype.str)] if field.sorted_ids else None
        shuffle = [Shuffle(elementsize=dtype.itemsize)] if dtype.itemsize > 1 else []
        return filters, (*shuffle, *compressors)

    def progress(self, meta):
        """Responses written by the teachers are counted as responses, with the tokens written beside them;
        other token rows in tokens (positions)."""
        if meta.sequence.responses is not None:
            return "responses", 1, True
        return super().progress(meta)

    def own_bytes(self, meta) -> int:
        length = meta.sequence.length
        return np.dtype(self.index_dtype(meta)).itemsize * (length + 1) + length + 8

    def teacher_positions(self, reader) -> int:
        return int(reader.group["teacher_positions"][:][reader.done].sum())

    def perplexity(self, reader):
        """The ensemble's per-token perplexity (its stored distribution at the generation temperature) over the
        committed positions with a loss, and each teacher's over those its statistics cover, exp(mean NLL)."""
        nll = reader.group["nll"][:][reader.done]
        n = int(reader.group["stats"][:][reader.done][:, 0].sum())
        if n == 0:
            return None
        own = self.teacher_positions(reader)
        out = {"ensemble": float(np.exp(nll[:, 0].sum() / n))}
        out.update({t.name: float(np.exp(nll[:, 1 + j].sum() / own))
                    for j, t in enumerate(reader.meta.teachers if own else ())})
        return out

    def check_chunk(self, got, meta):
        if int(got["tokens"].max(initial=0)) >= meta.num_classes:
            return f"field tokens has ids beyond the tokenizer's {meta.num_classes}"
        return None

    def engine_summary(self, reader):
        """The engines' record, the committed chunks' counts of floored tails and estimated entries, and each
        member's KL to its reference where a chunk was checked."""
        meta = reader.meta
        if meta.engine is None:
            return None
        counts = reader.group["engine_counts"][:][reader.done].sum(0)
        kl = reader.group["reference_kl"][:][reader.done]
        checked = kl[~np.isnan(kl).all(1)]
        return {**meta.engine.model_dump(), "tail_floored": int(counts[0]), "head_estimated": int(counts[1]),
                "reference_kl": {t.name: (None if np.isnan(checked[0, j]) else float(checked[0, j]))
                                 if len(checked) else None for j, t in enumerate(meta.teachers)}}

    def examples(self, reader, n):
        """The first ``n`` committed rows: their tokens, loss mask and (written responses) why each ended."""
        rows = reader.finished_rows()[:n]
        if not len(rows):
            return []
        names = ["tokens", "loss_mask", "index"] + ["finish"] * (reader.meta.sequence.responses is not None)
        got = reader.read(rows, names)
        return [{"row": int(r), "index": int(got["index"][j]), "tokens": got["tokens"][j].tolist(),
                 "loss_mask": got["loss_mask"][j].tolist(),
                 **({"finish": FINISH[int(got["finish"][j])]} if "finish" in got else {})}
                for j, r in enumerate(rows)]

    def record(self, meta):
        return meta.sequence.model_dump()

    def describe(self, s, human):
        seq, tok = s["sequence"], s["sequence"]["tokenizer"]
        step = (s.get("targets_record") or {}).get("step")
        values = (f"uint8 steps of {step:g} nat below each position's largest (off by ≤ {step / 2:g})" if step
                  else s["dtype"]) + f", {s['values']}"
        return [("targets", f"{s['targets']} of {s['classes']:,} tokens per position, {seq['length']} positions per "
                            f"row; values {values}; chunks of {s['chunk_rows']} rows, {s['compressor']}"),
                ("sequences", f"{s['rows']:,} rows ({seq['packing']}), {self._positions(s):,} positions with a loss"
                              + (f", from {human(seq['text_bytes'])} of text" if seq["text_bytes"] else "")
                              + f"; tokenizer {tok['path']} "
                              f"({tok['vocab_size']:,} tokens, fingerprint {tok['fingerprint'][:16]}…)"),
                *self._chat_lines(seq), *self._engine_lines(s.get("engine"))]

    @staticmethod
    def _positions(s):
        """Positions with a loss: the set's, or for written responses the tokens written so far."""
        if s["sequence"].get("responses") and s["accuracy"]:
            return s["accuracy"]["labeled_rows"]
        return s["sequence"]["positions"]

    @staticmethod
    def _chat_lines(seq):
        out = []
        chat, r = seq.get("chat"), seq.get("responses")
        if chat:
            out.append(("chat", f"template from {chat['source']} (sha256 {chat['sha256'][:16]}…); loss on "
                        f"{'every assistant turn' if chat['turns'] == 'all' else 'the last assistant turn'}; "
                        f"{chat['conversations']:,} conversations read, {chat['truncated']:,} truncated, "
                        f"{chat['dropped']:,} dropped"))
        if r:
            stop = f", stop {', '.join(map(repr, r['stop']))}" if r["stop"] else ""
            out.append(("responses", f"written by the teachers: {r['n']} per prompt to {r['prompts']:,} prompts "
                        f"({r['dropped']:,} left out: no room), up to {r['max_new_tokens']} tokens, temperature "
                        f"{r['temperature']:g}, top-p {r['top_p']:g}{stop}, seed {r['seed']}"))
        return out

    @staticmethod
    def _engine_lines(e):
        if not e:
            return []
        out = []
        for m in e["members"]:
            kl = e["reference_kl"].get(m["name"])
            out.append((f"engine {m['name']}", f"{m['engine']} serving {m['model']} ({m['root'] or '?'}); "
                        + ("not compared with local weights" if kl is None else
                           f"KL {kl:.2g} nats/token to its weights through transformers")))
        out.append(("engine answers", f"log-probabilities at T=1, not logits; {e['tail_floored']:,} positions with "
                    f"the tail at the float32 floor (e^{e['tail_floor']:.1f}), {e['head_estimated']:,} kept "
                    "entries estimated for a member that did not return them"))
        return out

    def size_line(self, s, human):
        per = s["sequence"]["length"]
        return (f"{human(s['disk_bytes'])} ({s['bytes_per_row'] / per:.1f} B/token; uncompressed "
                f"{s['raw_bytes_per_row'] / per:.1f} B/token)")

    def ensemble_line(self, s):
        acc, ppl = s["accuracy"], s["perplexity"]
        if not ppl:
            return None
        return "ensemble", (f"perplexity {ppl['ensemble']:,.2f}, top-1 {100 * acc['ensemble']:.2f} % on "
                            f"{acc['labeled_rows']:,} positions")

    def teacher_line(self, s, name):
        acc, ppl, stride = s["accuracy"] or {}, s["perplexity"] or {}, s["sequence"]["teacher_stride"]
        if name not in ppl:
            return ""
        return (f", perplexity {ppl[name]:,.2f}, top-1 {100 * acc[name]:.2f} %"
                + (f" (on one position in {stride})" if stride > 1 else ""))
