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


# ------------------------------------------------------------------- 2. gpu-check's report, section by section
def test_gpu_check_keeps_every_section_when_one_fails(monkeypatch, tmp_path):
    """FA4's first-ever compile fails (faked): that section is a row with the one-line error, the others keep their
    figures, the report on disk grows after every section, and the command exits 1. Before: the RuntimeError ended
    the run and no report was written."""
    import json

    from evaclip.bench import __main__ as bench_main
    from evaclip.bench import cli
    from evaclip.bench.report import section

    on_disk: list = []

    def sections_on_disk() -> list:
        path = tmp_path / "gpu-check.json"
        return [s["title"] for s in json.loads(path.read_text())["sections"]] if path.exists() else []

    def train_run(args):
        on_disk.append(sections_on_disk())
        if args.attn_backend == "flash_attn":
            raise RuntimeError("cutlass.cute: DSLRuntimeError: failed to compile flash_fwd_sm90\n  (a long trace)")
        return section(f"Training step: {args.model}", [("samples_per_s", "samples/s")], [{"samples_per_s": 9.0}])

    def bench_run(name):
        def run(args):
            on_disk.append(sections_on_disk())
            return section(f"bench {name}", [("ok", "ok")], [{"ok": True}])
        return run

    monkeypatch.setattr(bench_main.train_bench, "run", train_run)
    for name in bench_main.GPU_CHECK_ARGS:
        monkeypatch.setattr(bench_main.BENCHMARKS[name], "run", bench_run(name))
    assert cli(["gpu-check", "--device", "cpu", "--out", str(tmp_path)]) == 1

    report = json.loads((tmp_path / "gpu-check.json").read_text())
    titles = [s["title"] for s in report["sections"]]
    assert titles == ["Training step: EVA02-CLIP-B-16, attention flash_attn",
                      "Training step: EVA02-CLIP-B-16, attention sdpa", "bench attention", "bench mim"]
    assert report["sections"][0]["rows"] == [
        {"status": "failed", "error": "RuntimeError: cutlass.cute: DSLRuntimeError: failed to compile flash_fwd_sm90"}]
    assert report["sections"][1]["rows"] == [{"samples_per_s": 9.0}]
    assert on_disk == [[], titles[:1], titles[:2], titles[:3]]  # each section on disk before the next one runs
    assert "failed to compile" in (tmp_path / "gpu-check.md").read_text()


def test_gpu_check_without_a_flash_kernel_is_not_a_failure(monkeypatch, tmp_path):
    from evaclip.bench import __main__ as bench_main
    from evaclip.bench.report import section
    from evaclip.models.attention import AttentionBackendError

    def train_run(args):
        if args.attn_backend == "flash_attn":
            raise AttentionBackendError("attn_backend=flash_attn cannot run on cuda: compute capability 7.5")
        return section("Training step", [], [])

    monkeypatch.setattr(bench_main.train_bench, "run", train_run)
    monkeypatch.setattr(bench_main, "GPU_CHECK_ARGS", {})
    report = bench_main.main(["gpu-check", "--device", "cpu", "--out", str(tmp_path)])
    assert report["sections"][0]["rows"][0]["status"] == "not run"
    assert bench_main.exit_code(report) == 0
