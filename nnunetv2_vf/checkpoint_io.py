"""Reading weight files with errors that say what is wrong and what to do (missing, empty, corrupt)."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

__all__ = ["read_weights_file"]


def read_weights_file(path: str | os.PathLike, what: str, missing_fix: str, reread_fix: str,
                      weights_only: bool = True, load: Optional[Callable[[str], Any]] = None) -> Any:
    """``torch.load(path)`` (or ``load(path)``, e.g. safetensors) on CPU.

    Raises FileNotFoundError ``"<what> <path> not found: <missing_fix>"`` for a missing file, and ValueError naming
    an empty or unreadable file (truncated download, not a checkpoint) followed by ``reread_fix``.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found: {missing_fix}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path} is empty (interrupted download or copy?): {reread_fix}")
    try:
        return load(path) if load is not None else torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for truncated or foreign files
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read {what} {path} ({type(e).__name__}: {reason}); the file is corrupt or not a "
                         f"checkpoint: {reread_fix}") from e
