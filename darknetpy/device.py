"""Torch device selection with a clear error when the device is not there."""
from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device`` or None (= cpu).

    Raises:
        DeviceError: unknown device string, CUDA asked for but not available, or
        a CUDA index past the number of GPUs.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available "
                              "(no GPU, or a CPU-only build of torch); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only "
                              f"{torch.cuda.device_count()} CUDA device(s) are present")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device type {dev.type!r}; use cpu or cuda")
    return dev
