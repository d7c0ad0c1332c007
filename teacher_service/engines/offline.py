"""vLLM in this process: ``vllm.LLM(**engine_args)`` for a worker that owns its GPUs (its tensor, pipeline or
expert parallelism in the engine arguments), with no HTTP between darkstore and the engine.

It answers like a server (:class:`~teacher_service.engines.vllm.VllmServer`): the same checks before a job (its
context length, its ``max_logprobs``, its tokenizer on the transfer set's text) and the same answers, checked
whole (:func:`~teacher_service.engines.vllm.parse_answer`), computed with detokenisation off. vLLM is not
installed with darkstore: it pins its own torch, so it goes in an environment of its own making (``./dev vllm``
installs the CPU build with darkstore beside it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from darkstore.lm import TokenizerMismatchError
from darkstore.modelspec import ModelSpec
from darkstore.paths import resolve
from storage.schema import EngineMemberRecord

from ..errors import EngineRefusedError
from .vllm import Scored, parse_answer


class VllmOffline:
    """One member's engine in this process; it takes one request at a time (a whole chunk's rows: the engine
    batches them itself)."""

    concurrent = False

    def __init__(self, member: ModelSpec, roots: Sequence[str | Path] | None):
        try:
            from vllm import LLM  # optional: vLLM pins its own torch
        except ImportError as exc:
            raise EngineRefusedError(f"engine teacher {member.label!r}: engine_args runs vLLM in this process, and "
                                     "vllm is not installed here; install it beside darkstore, or serve the model "
                                     "and give its url") from exc
        self.name, self.spec = member.label, member.engine
        args = dict(self.spec.engine_args)
        local = Path(str(args["model"]))
        if local.is_absolute() or local.exists():
            args["model"] = str(resolve(str(local), roots=roots))
        self.model = str(args["model"])
        self.llm = LLM(**args)
        self.record: EngineMemberRecord | None = None

    def check(self, *, k: int, length: int, tokenizer: Any, sample_text: str) -> EngineMemberRecord:
        import vllm

        config = self.llm.llm_engine.model_config
        if config.max_model_len < length + 2:
            raise EngineRefusedError(f"engine teacher {self.name!r}: its engine takes {config.max_model_len} tokens "
                                     f"(engine_args max_model_len), and rows of {length} positions need {length + 2}")
        if config.max_logprobs < k:
            raise EngineRefusedError(f"engine teacher {self.name!r}: targets topk:{k} need {k} log-probabilities per "
                                     f"position; the engine allows {config.max_logprobs}: set engine_args "
                                     f"max_logprobs to {k} or more")
        if sample_text:
            theirs = self.llm.get_tokenizer().encode(sample_text, add_special_tokens=False)
            if list(theirs) != tokenizer.encode([sample_text])[0]:
                raise TokenizerMismatchError(f"engine teacher {self.name!r}: the engine's tokenizer differs from the "
                                             f"transfer set's ({tokenizer.path}) on the same text")
        self.record = EngineMemberRecord(name=self.name, engine=f"vllm {vllm.__version__} (in process)",
                                         model=self.model, root=self.model, max_model_len=config.max_model_len)
        return self.record

    def score(self, rows: np.ndarray, k: int, vocab: int) -> Scored:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows.tolist()], params, use_tqdm=False)
        choices = [{"index": i, "prompt_logprobs": [
            None if d is None else {str(t): {"logprob": e.logprob} for t, e in d.items()} for d in o.prompt_logprobs]}
            for i, o in enumerate(outs)]
        return parse_answer({"choices": choices}, rows, k, vocab, self.name)

    def close(self) -> None:
        """Stop the engine's own processes now, not at the interpreter's exit (where they abort it)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None
