"""TF32: one setting for every command that trains or measures (``train-unet``, ``train-clip``, ``bench``).

TF32 runs float32 matmuls and convolutions on the tensor cores of Ampere and newer GPUs with a 10-bit mantissa:
faster, with about 1e-3 relative error. It is on by default (the trainers always used it); ``--no-tf32`` turns
it off. Nothing changes on CPU. The module imports no torch at the top: the CLI reads :data:`TF32_DEFAULT` and
:data:`TF32_HELP` for ``--help``.

    set_tf32(cfg.tf32, device)       # once, before the first matmul
"""

from __future__ import annotations

from typing import Any

__all__ = ["TF32_DEFAULT", "TF32_HELP", "set_tf32", "tf32_state"]

#: The default of ``--tf32/--no-tf32`` and of every config's ``tf32`` field.
TF32_DEFAULT = True
#: The help text of ``--tf32/--no-tf32``, the same in every command.
TF32_HELP = ("TF32 matmuls and convolutions on Ampere+ GPUs: faster, ~1e-3 relative error; "
             f"default {'on' if TF32_DEFAULT else 'off'} (--no-tf32 for full float32).")


def set_tf32(enabled: bool, device: Any) -> tuple[bool, bool] | None:
    """On a CUDA ``device``: set ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    to ``enabled`` and return the previous (matmul, cudnn) pair, to restore them. Elsewhere: nothing, None."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return before


def tf32_state() -> dict[str, bool]:
    """What the process runs with now: ``{"matmul": allow_tf32, "cudnn": allow_tf32}`` (for reports)."""
    import torch

    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
