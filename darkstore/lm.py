"""Language models as teachers: causal LMs that map token ids [B, T] to next-token logits [B, T, V].

Two sources: the built-in :class:`~darkstore.gpt.GPT` (``arch: gpt``, weights from safetensors like any other
architecture) and a causal LM saved by ``transformers`` in a local directory (``format: transformers``:
``config.json`` and ``*.safetensors``; a pickled ``pytorch_model.bin`` is refused, a model whose config asks
for its own code loads only with ``allow_code``).

:class:`LanguageModel` splits the forward pass into :meth:`~LanguageModel.hidden` (the backbone, once per
batch) and :meth:`~LanguageModel.logits` (the output head, on any slice of positions), so that generation never
holds [batch, length, vocabulary] float32 logits whole. A transformers model is checked once, on the first
batch, to give the same logits sliced as whole; where it does not (a head this split does not know), it runs
whole, and says so.
"""

from __future__ import annotations

import functools
import inspect

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import CodeNotAllowedError, SpecError, UnsafeWeightsError, WeightsError, WeightsNotFoundError
from .models import LoadedModel, ModelSpec, load_model, sha256_file
from .paths import resolve

class TokenizerMismatchError(SpecError):
    """A teacher's tokenizer or vocabulary does not match the transfer set's."""


@dataclass
class DecodeState:
    """What a member keeps between decoding steps: its key/value cache, which of the positions so far are real
    tokens (``valid[:, :used]``; a buffer of the decoding's whole size) and each row's next position."""

    cache: Any
    valid: torch.Tensor  # [B, size] bool
    used: int
    next_pos: torch.Tensor  # [B, 1] long


@dataclass
class LanguageModel:
    """A loaded causal LM with its provenance: ``vocab`` is its head's width (padding included)."""

    loaded: LoadedModel
    vocab: int
    max_positions: int | None
    tokenizer_path: Path | None
    kind: str  # "gpt" | "transformers"
    sliced: bool = True  # hidden() gives hidden states and logits() applies the head; else hidden() gives logits
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.module

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, H] hidden states after the final norm (or [B, T, V] logits where not sliced)."""
        m = self.loaded.module
        if self.kind == "gpt":
            return m.hidden(tokens)
        if not self.sliced:
            return m(input_ids=tokens).logits
        return m.base_model(input_ids=tokens).last_hidden_state

    def start(self, tokens: torch.Tensor, valid: torch.Tensor, size: int) -> tuple[torch.Tensor, "DecodeState"]:
        """Prefill for decoding: left-padded prompts ``tokens`` [B, T] (``valid`` [B, T]: False on the padding)
        -> the last position's hidden states [B, H] (logits where not sliced) and the cache to continue from,
        room for ``size`` positions in all."""
        pos = (valid.long().cumsum(1) - 1).clamp_min(0)
        t = tokens.shape[1]
        buffer = valid.new_zeros(valid.shape[0], size)
        buffer[:, :t] = valid
        state = DecodeState(None, buffer, t, valid.long().sum(1, keepdim=True))
        if self.kind == "gpt":
            m = self.loaded.module
            state.cache = m.new_cache(tokens.shape[0], size, m.wte.weight)
            causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
            attend = causal & (valid[:, None, None, :] | torch.eye(t, dtype=torch.bool, device=tokens.device))
            return m.hidden_cached(tokens, pos, state.cache, attend)[:, -1], state
        from transformers import DynamicCache

        state.cache = DynamicCache()
        return self._hf_step(tokens, pos, state), state

    def step(self, token: torch.Tensor, state: "DecodeState") -> torch.Tensor:
        """The next token of every sequence [B] -> its hidden states [B, H] (logits where not sliced)."""
        pos = state.next_pos.clone()
        state.next_pos += 1
        state.valid[:, state.used] = True
        state.used += 1
        if self.kind == "gpt":
            attend = state.valid[:, None, None, :state.used]
            return self.loaded.module.hidden_cached(token[:, None], pos, state.cache, attend)[:, -1]
        return self._hf_step(token[:, None], pos, state)

    def _hf_step(self, tokens: torch.Tensor, pos: torch.Tensor, state: "DecodeState") -> torch.Tensor:
        m = self.loaded.module
        net = m if not self.sliced else m.base_model
        name = _cache_argument(type(net))
        out = net(input_ids=tokens, attention_mask=state.valid[:, :state.used].long(), position_ids=pos,
                  use_cache=True, **{name: state.cache})
        state.cache = out[name]
        return (out.logits if not self.sliced else out.last_hidden_state)[:, -1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states of some positions [..., H] -> their logits [..., V] in float32."""
        if not self.sliced:
            return h.float()
        m = self.loaded.module
        if self.kind == "gpt":
            return m.head(h).float()
        z = m.get_output_embeddings()(h).float()
        cap = getattr(m.config, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def logits_into(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """:meth:`logits` of ``h`` cut to ``out``'s width (the tokenizer's), written into ``out``: straight from
        the matrix product where the head is a plain projection, else copied."""
        v = out.shape[-1]
        head = self.plain_head()
        if head is None:
            out.copy_(self.logits(h)[..., :v])
            return
        weight, bias = head
        torch.mm(h.reshape(-1, h.shape[-1]), weight[:v].t(), out=out.view(-1, v))
        if bias is not None:
            out += bias[:v]

    def plain_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The head's float32 weight [V', H] and bias where it is a plain projection of the hidden states
        (no soft-capping, not run whole), else None."""
        if not self.sliced:
            return None
        m = self.loaded.module
        head = m.lm_head if self.kind == "gpt" else m.get_output_embeddings()
        if type(head) is not torch.nn.Linear or getattr(getattr(m, "config", None), "final_logit_softcapping", None):
            return None
        if head.weight.dtype != torch.float32:
            return None
        return head.weight, head.bias

    def check_split(self, tokens: torch.Tensor) -> None:
        """Compare sliced and whole logits on ``tokens``; run whole from now on where they differ."""
        if self.kind != "transformers":
            return
        with torch.inference_mode():
            whole = self.loaded.module(input_ids=tokens).logits.float()
            split = self.logits(self.hidden(tokens))
        if split.shape != whole.shape or not torch.allclose(split, whole, rtol=1e-4, atol=1e-4):
            self.sliced = False
            self.notes.append("its head is not a plain output projection: logits computed whole, not by slices "
                              "of positions (memory grows with batch × length × vocabulary)")


@functools.lru_cache(maxsize=None)
def _cache_argument(cls: type) -> str:
    """What a transformers model's forward calls its key/value cache: ``cache`` in transformers 5.2x,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def load_lm(spec: ModelSpec, *, vocab_size: int, allow_code: bool = False,
            roots: Sequence[str | Path] | None = None, tokenizer: Any = None) -> LanguageModel:
    """Load one language-model teacher (eval mode, on the CPU). With ``tokenizer`` (the transfer set's), a
    teacher that names another tokenizer is refused before its weights are read."""
    if tokenizer is not None:
        check_tokenizer(spec, tokenizer_path(spec, roots), tokenizer)
    if spec.format == "transformers":
        return _load_transformers(spec, allow_code=allow_code, roots=roots)
    if spec.arch != "gpt":
        raise SpecError(f"teacher {spec.label!r} is not a language model: a text transfer set takes arch gpt or "
                        "format transformers (a local directory saved by transformers)")
    lm = load_model(spec, num_classes=spec.num_classes or _head_width(spec, roots) or vocab_size,
                    allow_code=allow_code, roots=roots)
    return LanguageModel(lm, lm.module.lm_head.out_features, lm.module.max_positions, tokenizer_path(spec, roots),
                         "gpt")


def _head_width(spec: ModelSpec, roots: Sequence[str | Path] | None) -> int | None:
    """A built-in GPT's vocabulary as its safetensors file says (the head's rows), read from the header only."""
    if not spec.weights or not spec.weights.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(resolve(spec.weights, roots=roots)), framework="pt") as f:
            return int(f.get_slice("lm_head.weight").get_shape()[0]) if "lm_head.weight" in f.keys() else None
    except Exception:  # noqa: BLE001 — an unreadable file: load_model says why
        return None


def tokenizer_path(spec: ModelSpec, roots: Sequence[str | Path] | None = None) -> Path | None:
    """The tokenizer a teacher was made with: its ``tokenizer``, else a transformers directory's own, else none
    known (then only its vocabulary size is checked)."""
    if spec.tokenizer:
        return resolve(spec.tokenizer, roots=roots)
    if spec.format == "transformers" and spec.weights:
        folder = resolve(spec.weights, roots=roots)
        if any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            return folder
    return None


def check_tokenizer(spec: ModelSpec, path: Path | None, tokenizer: Any) -> None:
    from .text import load_tokenizer

    if path is None:
        return
    own = load_tokenizer(path)
    if own.fingerprint != tokenizer.fingerprint:
        raise TokenizerMismatchError(f"teacher {spec.label!r} was made with another tokenizer than the transfer "
                                     f"set's: {describe_difference(own, tokenizer)} (teacher's: {path}; transfer "
                                     f"set's: {tokenizer.path})")


def _load_transformers(spec: ModelSpec, *, allow_code: bool, roots: Sequence[str | Path] | None) -> LanguageModel:
    folder = resolve(spec.weights, roots=roots)
    digest = folder_digest(spec.label, folder)  # a transformers directory with safetensors weights, or an error
    config = _read_json(folder / "config.json")
    if config.get("auto_map") and not allow_code:
        raise CodeNotAllowedError(f"teacher {spec.label!r}: {folder / 'config.json'} asks for the model's own code "
                                  "(auto_map); enable it with --allow-code (CLI) or DARKSTORE_ALLOW_CODE=true (service)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise SpecError("format transformers needs the transformers package: pip install 'darkstore[lm]'") from exc
    quiet_transformers()
    try:
        module = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                      trust_remote_code=allow_code, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 — transformers raises many types for a directory it cannot load
        raise WeightsError(f"teacher {spec.label!r}: transformers cannot load {folder} as a causal LM: "
                           f"{type(exc).__name__}: {exc}") from exc
    module.eval()
    loaded = LoadedModel(spec, module, "transformers", folder, digest)
    vocab = int(module.get_output_embeddings().weight.shape[0])
    limit = next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "n_ctx") if config.get(k)), None)
    return LanguageModel(loaded, vocab, limit, tokenizer_path(spec, roots), "transformers")


def quiet_transformers() -> None:
    """No progress bars from transformers' loading and saving: darkstore reports its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(out, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return out


def _weight_files(label: str, folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise UnsafeWeightsError(f"teacher {label!r}: {folder} holds pickled weights ({', '.join(pickled)}), "
                                 "which darkstore never unpickles; save the model with safetensors "
                                 "(save_pretrained(..., safe_serialization=True))")
    raise WeightsNotFoundError(f"teacher {label!r}: {folder} holds no *.safetensors weights")


def folder_digest(label: str, folder: Path) -> str:
    """The weight hash of a transformers directory (what the job key holds)."""
    if not (folder / "config.json").is_file():  # also a folder that is not there, or a file
        raise WeightsNotFoundError(f"teacher {label!r}: {folder} is not a transformers model directory "
                                   "(config.json and *.safetensors)")
    return _folder_digest(folder / "config.json", _weight_files(label, folder))


def _folder_digest(config: Path, weights: list[Path]) -> str:
    """sha256 over the config's and each weight file's sha256 (names excluded: content decides)."""
    h = hashlib.sha256(b"darkstore-transformers-v1\0")
    for p in (config, *weights):
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# --- students --------------------------------------------------------------------------------------------
def load_student(spec: ModelSpec, record: Any, *, length: int, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None) -> LanguageModel:
    """A causal-LM student for a sequence store whose tokenizer is ``record`` (the store's
    :class:`~storage.schema.TokenizerRecord`) and whose rows have ``length`` positions, on the CPU in train
    mode: the built-in GPT (random init unless ``weights``), or a ``transformers`` directory, loaded from its
    safetensors where it holds them and otherwise built from its ``config.json`` at random (seeded by the
    caller). A student that names another tokenizer, predicts fewer tokens or takes fewer positions is
    refused before training."""
    check_student_tokenizer(spec, tokenizer_path(spec, roots), record)
    if spec.format == "transformers":
        folder = resolve(spec.weights, roots=roots)
        if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
            lm = _transformers_from_config(spec, folder, allow_code=allow_code)
        else:
            lm = _load_transformers(spec, allow_code=allow_code, roots=roots)
    elif spec.arch == "gpt":
        loaded = load_model(spec, num_classes=spec.num_classes or _head_width(spec, roots) or record.vocab_size,
                            allow_code=allow_code, roots=roots, require_weights=False)
        lm = LanguageModel(loaded, loaded.module.lm_head.out_features, loaded.module.max_positions,
                           tokenizer_path(spec, roots), "gpt")
    else:
        raise SpecError(f"student {spec.label!r} is not a language model: a sequence store trains arch gpt "
                        "(--student gpt --arch-kwargs '{\"n_layer\": 2, ...}') or format transformers (a local "
                        "directory with config.json, and safetensors weights to start from)")
    if lm.vocab < record.vocab_size:
        raise TokenizerMismatchError(f"student {spec.label!r} predicts {lm.vocab} tokens but the store's tokenizer "
                                     f"has {record.vocab_size}")
    if lm.max_positions is not None and length > lm.max_positions:
        raise SpecError(f"student {spec.label!r} takes at most {lm.max_positions} positions; the store's rows have "
                        f"{length} (raise block_size / max_position_embeddings)")
    lm.module.train()
    return lm


def check_student_tokenizer(spec: ModelSpec, path: Path | None, record: Any) -> None:
    """A student that names a tokenizer (its ``tokenizer``, or a transformers directory's own) must have the
    store's: same fingerprint."""
    from .text import load_tokenizer

    if path is None:
        return
    own = load_tokenizer(path)
    if own.fingerprint != record.fingerprint:
        theirs = f"{record.vocab_size} tokens, EOS {record.eos_id}, pad {record.pad_id}"
        mine = f"{own.vocab_size} tokens, EOS {own.eos_id}, pad {own.pad_id}"
        raise TokenizerMismatchError(f"student {spec.label!r} was made with another tokenizer than the store's "
                                     f"(student's {path}: {mine}; store's {record.path}: {theirs}; their "
                                     "fingerprints differ)")


def _transformers_from_config(spec: ModelSpec, folder: Path, *, allow_code: bool) -> LanguageModel:
    """A transformers causal LM built at random from ``folder/config.json`` (no weights: a student from scratch)."""
    config = _read_json(folder / "config.json")
    if config.get("auto_map") and not allow_code:
        raise CodeNotAllowedError(f"student {spec.label!r}: {folder / 'config.json'} asks for the model's own code "
                                  "(auto_map); enable it with --allow-code")
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=allow_code)
        module = AutoModelForCausalLM.from_config(cfg, trust_remote_code=allow_code, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 — transformers raises many types for a config it cannot build
        raise WeightsError(f"student {spec.label!r}: transformers cannot build a causal LM from "
                           f"{folder / 'config.json'}: {type(exc).__name__}: {exc}") from exc
    loaded = LoadedModel(spec, module, "transformers", folder, None)
    vocab = int(module.get_output_embeddings().weight.shape[0])
    limit = next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "n_ctx") if config.get(k)), None)
    return LanguageModel(loaded, vocab, limit, tokenizer_path(spec), "transformers")


# --- fitting teachers to the tokenizer ------------------------------------------------------------------
def check_fit(members: list[LanguageModel], tokenizer: Any, length: int) -> None:
    """Every member reads the transfer set's tokens: a vocabulary at least the tokenizer's (a wider head is
    padding, cut off) and room for ``length`` positions (the tokenizer itself is checked by :func:`load_lm`)."""
    v = tokenizer.vocab_size
    for m in members:
        if m.vocab < v:
            raise TokenizerMismatchError(f"teacher {m.name!r} predicts {m.vocab} tokens but the tokenizer has {v}: "
                                         "the model does not fit the tokenizer (another tokenizer, or a model "
                                         "made for a smaller vocabulary)")
        if m.vocab > v:
            m.notes.append(f"head of {m.vocab} tokens cut to the tokenizer's {v} (padding)")
        if m.max_positions is not None and length > m.max_positions:
            raise SpecError(f"teacher {m.name!r} takes at most {m.max_positions} positions; the transfer set's rows "
                            f"have {length}: give a length of at most {m.max_positions}")


def describe_difference(a: Any, b: Any) -> str:
    """What differs between two tokenizers, in the terms a user checks."""
    if a.vocab_size != b.vocab_size:
        return f"vocabularies of {a.vocab_size} and {b.vocab_size} tokens"
    if (a.eos_id, a.pad_id) != (b.eos_id, b.pad_id):
        return f"special tokens differ (EOS {a.eos_id} vs {b.eos_id}, pad {a.pad_id} vs {b.pad_id})"
    va, vb = a.tokenizer.get_vocab(with_added_tokens=True), b.tokenizer.get_vocab(with_added_tokens=True)
    moved = sorted(t for t in va if vb.get(t) != va[t])
    if moved:
        t = moved[0]
        return (f"{len(moved)} tokens are numbered differently (e.g. {t!r}: {va[t]} vs "
                f"{vb.get(t, 'absent')})")
    ca, cb = a.canonical(), b.canonical()
    parts = [k for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return f"same vocabulary, but their {', '.join(parts) or 'configuration'} differ"
