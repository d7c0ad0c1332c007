"""The one check of a device name before any work: refused in one line when this machine has no such device."""

from __future__ import annotations

from darkstore.errors import SpecError


def check_device(device: str, option: str = "--device") -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine can run, else :class:`SpecError` saying what it has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpecError(f"{option} {device}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise SpecError(f"{option} {device}: no CUDA device is visible here (torch {torch.__version__}); "
                        f"use {option} cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpecError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")


__all__ = ["check_device"]
