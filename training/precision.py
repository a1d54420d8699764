"""Mixed-precision training: ``--precision 32|bf16|16-mixed``.

* ``32``: float32 throughout (the default).
* ``bf16``: the forward pass under ``torch.autocast(dtype=torch.bfloat16)`` on CPU or CUDA.
  bfloat16 has float32's exponent range, so no loss scaling is needed. On a CPU without native
  bf16 instructions (AVX512-BF16 / AMX) autocast still works but is emulated and usually slower
  than float32; the run says so in its log.
* ``16-mixed``: float16 autocast with a ``GradScaler`` (float16's narrow range underflows small
  gradients without it). CUDA only: the configs refuse it on CPU with a message.

In every mode the parameters and the optimizer state stay float32 (autocast casts copies of
weights per op, it never changes a parameter's dtype), the loss is computed in float32 from
upcast logits (``losses``), validation and test run in float32, and the export is from the
float32 model, checked by the unchanged parity gate.
"""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

import torch

PRECISIONS = ("32", "bf16", "16-mixed")

log = logging.getLogger("training")


def precision_error(precision: str, device: str) -> str | None:
    """Why ``precision`` cannot run on ``device`` (a config-time check), or None."""
    if precision not in PRECISIONS:
        return f"precision must be one of {PRECISIONS}, got {precision!r}"
    if precision == "16-mixed" and not str(device).startswith("cuda"):
        return ("--precision 16-mixed (float16 autocast with a gradient scaler) needs CUDA "
                "(--device cuda); on CPU use --precision bf16 or 32")
    return None


def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


class MixedPrecision:
    """The autocast context and the optional gradient scaler of one training run."""

    def __init__(self, precision: str, device: torch.device) -> None:
        error = precision_error(precision, device.type)
        if error:
            raise ValueError(error)
        self.precision = precision
        self.device = device
        self.dtype = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}[precision]
        if precision == "bf16":
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                raise ValueError("this GPU has no bfloat16 support; use --precision 16-mixed")
            if device.type == "cpu" and not cpu_has_native_bf16():
                log.warning("bf16 on a CPU without native bfloat16 instructions is emulated "
                            "(usually slower than --precision 32)")
        self.scaler = (torch.amp.GradScaler("cuda") if precision == "16-mixed" else None)

    def autocast(self) -> ContextManager:
        """Wrap the forward pass (not the loss, not the backward pass) in this."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """backward + optimizer step; through the scaler for 16-mixed (a step whose gradients
        overflowed is skipped and the scale lowered)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
