"""The teacher service's errors, rooted in the shared kernel's :class:`~darkstore.errors.DarkstoreError`."""

from __future__ import annotations

from darkstore.errors import DarkstoreError


class LimitExceededError(DarkstoreError, ValueError):
    """A request is over one of the service's submit-time limits (parameters, memory, input size, time)."""


class CheckersBusyError(DarkstoreError, RuntimeError):
    """Every submit-time check slot is taken (``submit_checks``): answered 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class CheckerFailedError(DarkstoreError, RuntimeError):
    """The submit-time checker process died of something other than the job (a server fault: 500)."""




class EngineUnavailableError(DarkstoreError, ConnectionError):
    """An inference engine did not answer (connection lost, 5xx, 429) for longer than its ``retry_for_s``."""


class EngineRefusedError(DarkstoreError, ValueError):
    """An inference engine cannot serve the job as asked (a server setting, its model, its tokenizer)."""


class EngineAnswerError(DarkstoreError, ValueError):
    """An inference engine's answer is not what was asked for (shape, token ids, values): never stored."""


class EngineMismatchError(DarkstoreError, ValueError):
    """An engine's log-probabilities differ from the same model run through transformers by more than allowed."""


__all__ = ["CheckerFailedError", "CheckersBusyError", "EngineAnswerError", "EngineMismatchError", "EngineRefusedError",
           "EngineUnavailableError", "LimitExceededError"]
