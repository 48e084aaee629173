"""One table from the config's ``precision`` to dtypes, autocast and the loss scaler (shared by every strategy)."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Union

import torch

from evaclip.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_AMP_DTYPE: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
          torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_name(precision: Union[str, torch.dtype, None]) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` from a name (``bfloat16`` too) or a torch dtype; None is fp32."""
    if precision is None:
        return "fp32"
    key = precision.lower() if isinstance(precision, str) else precision
    if key not in _NAMES:
        raise ConfigError(f"config key 'precision' must be one of {list(PRECISIONS)} (or a torch dtype), got "
                          f"{precision!r}")
    return _NAMES[key]


def amp_dtype(precision: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """The low-precision compute dtype of ``precision`` (None for fp32); ConfigError for an unknown name."""
    return _AMP_DTYPE[precision_name(precision)]


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """Autocast context factory: fp32 -> none; bf16 / fp16 -> ``torch.autocast`` on the device type."""
    dtype = amp_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'precision': bf16 is not supported on this GPU; use fp16")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def set_tf32(precision: Union[str, torch.dtype, None], device: torch.device, enabled: bool = True) -> bool:
    """On CUDA, let fp32 matmuls use TF32 tensor cores (``torch.set_float32_matmul_precision("high")``: 10-bit
    mantissa inputs, fp32 accumulation, several times the fp32 rate on Ampere and later) for ``precision=fp32`` when
    ``enabled`` (the config's ``tf32``), else exact fp32 ("highest"). bf16 / fp16 runs compute their matmuls under
    autocast and are left alone, and so is the CPU. Returns whether TF32 is on."""
    if device.type != "cuda":
        return False
    on = bool(enabled) and precision_name(precision) == "fp32"
    if on or precision_name(precision) == "fp32":
        torch.set_float32_matmul_precision("high" if on else "highest")
    return on


def make_grad_scaler(precision: str, strategy: str, device: torch.device):
    """The loss scaler of a run: enabled for fp16 only; FSDP2 runs get ``ShardedGradScaler``.

    With sharded gradients each rank sees only its shard, so an overflow may show on one rank alone; the sharded
    scaler max-reduces the inf flag over the process group, so every rank skips the same steps (a plain GradScaler
    would let the ranks' parameters diverge).
    """
    enabled = precision == "fp16"
    if strategy == "fsdp" and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type, enabled=enabled)
