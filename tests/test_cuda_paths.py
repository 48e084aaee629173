"""The CUDA paths of issue 22 checked on a CPU: host syncs of a step, the gpu-check report, the MIM task's devices,
compile order and TF32.

Stand-ins as in tests/test_gpu_readiness.py: ``meta`` tensors for the GPU (they take every non-CPU branch), a
monkeypatched ``torch.cuda``, and a fake ``flash_attn.cute`` module. ``HostSyncs`` counts what CUDA's sync debug mode
reports as a synchronisation, from the ops that reach the dispatcher: reads of device values (``.item()``,
``.tolist()``, copies to the host), blocking host -> device copies, and data-dependent shapes (``nonzero``, boolean
mask indexing).
Shapes: B batch, P patches, T teacher feature dim, M masked patches.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ops = torch.ops.aten
_DATA_DEPENDENT = {_ops.nonzero.default, _ops.masked_select.default, _ops._local_scalar_dense.default,
                   _ops.masked_scatter.default, _ops.masked_scatter_.default}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class HostSyncs(TorchDispatchMode):
    """Counts host synchronisations of the ops run under it on ``meta`` tensors (the GPU stand-in), by kind.

    A read back to the host returns zeros (meta tensors hold no data); a data-dependent shape is taken as "every
    element selected" (the count is what matters here, not the values). ``torch.tensor(x, device=...)`` copies
    below the dispatcher, so ``watch_tensor_ctor`` (a monkeypatch of ``torch.tensor``) counts those.
    """

    def __init__(self):
        super().__init__()
        self.kinds: list[str] = []

    @property
    def count(self) -> int:
        return len(self.kinds)

    def watch_tensor_ctor(self, monkeypatch) -> None:
        real = torch.tensor

        def tensor(data, *args, device=None, **kw):
            if device is not None and torch.device(device).type != "cpu":
                self.kinds.append("torch.tensor(..., device=): blocking copy")
            return real(data, *args, device=device, **kw)

        monkeypatch.setattr(torch, "tensor", tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func in (_ops._to_copy.default, _ops.copy_.default):
            src = first if func is _ops._to_copy.default else args[1]
            dst = kwargs.get("device", src.device) if func is _ops._to_copy.default else first.device
            dst = torch.device(dst)
            if src.device.type == "meta" and dst.type == "cpu":
                self.kinds.append("device -> host copy")
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
            if src.device.type == "cpu" and dst.type == "meta" and not kwargs.get("non_blocking", False) \
                    and not (len(args) > 2 and args[2]):
                self.kinds.append("blocking host -> device copy")
        if func in _DATA_DEPENDENT:
            self.kinds.append(str(func))
        elif func in (_ops.index.Tensor, _ops.index_put.default, _ops.index_put_.default) and \
                any(_is_mask(i) for i in args[1] if i is not None):
            self.kinds.append(f"{func} with a boolean mask")
        if func is _ops._local_scalar_dense.default and first.device.type == "meta":
            return 0
        from torch.fx.experimental import _config as fx_config

        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            return func(*args, **kwargs)


def test_host_syncs_counts_what_cuda_reports():
    x = torch.empty(4, 3, device="meta")
    mask = torch.empty(4, dtype=torch.bool, device="meta")
    with HostSyncs() as s:
        x.sum().tolist()
        x[mask]
        torch.ones(3).to("meta")
        torch.ones(3).to("meta", non_blocking=True)  # no sync
        torch.full((), 1.0, device="meta")  # no sync: filled on the device
    assert s.count == 3


# ---------------------------------------------------------------------------- 1. one host read per training step
def _meta_model_and_lamb():
    from evaclip.config import OptimCfg
    from evaclip.models import create_model
    from evaclip.optim import build_optimizer

    with torch.device("meta"):
        model = create_model("EVA02-CLIP-tiny", attn_backend="sdpa")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    return model, build_optimizer(model, OptimCfg(lr=1e-3, weight_decay=0.05, visual_ld=0.75, text_ld=0.75))


@pytest.mark.parametrize("stop", [False, True])
def test_apply_update_reads_the_device_once(monkeypatch, stop):
    """The step's one documented read (the finite / stop flags), also on LAMB's first step (its cache fill). Before:
    the stop flag was a blocking torch.tensor(..., device=) copy and LAMB's first step copied its repeat counts with
    a blocking .to(device): 3 syncs on the first step."""
    from evaclip.engine.step import apply_update

    model, opt = _meta_model_and_lamb()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = torch.empty((), device="meta")
    for _ in range(2):  # the first step fills LAMB's caches, the second is the steady state
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        syncs = HostSyncs()
        syncs.watch_tensor_ctor(monkeypatch)
        with syncs:
            apply_update(model, opt, scaler, 1.0, loss, stop_requested=stop)
        monkeypatch.undo()
        assert syncs.kinds == ["device -> host copy"], syncs.kinds  # the flags' .tolist()
