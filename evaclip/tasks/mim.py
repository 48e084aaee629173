"""The masked-image-modeling (MIM) objective, EVA / EVA-02's pre-training: an EVA image tower learns to predict a frozen
CLIP image tower's patch features at block-masked positions (negative cosine similarity).

Its config is ``MIMTrainCfg`` (defined here): the shared sections plus ``mim`` (``MIMCfg``). It reads ``model`` (the
student's architecture: a registered CLIP name whose image tower is used, with ``model.overrides`` such as
``vision.patch_size: 14``, attention backend, gradient checkpointing), ``data`` (image-only shards, or image-text
shards with the captions ignored), ``eval`` (``every``, ``batch_size``, ``workers`` for the monitors).

Per step: the teacher sees the full augmented view (no gradient), the student the same view with the masked patches
replaced by its mask token. The loss is the mean over every masked patch of the step, on all micro-batches and all
ranks (their count is summed once per step with one all-reduce), so accumulation and data parallelism give exactly
the gradient of the whole global batch even though block masks do not all hold the same number of patches.

Monitors (``evaluate``): the loss on the held-out images ``mim.val`` under fixed masks (``mim.val_mask``: block masks
where sample ``i``'s depends on ``i`` only, the same on every run, rank count and batch size; or EVA's alternating 50 %
mask, to compare with EVA's logs), and k-NN top-1 of the student's pooled features
(``MIMStudent.pooled_features``) with ``mim.knn_train`` as memory bank and ``mim.knn_val`` as queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from evaclip.config import TrainCfg
from evaclip.engine.task import StepContext, Task
from evaclip.errors import ConfigError


@dataclass
class MIMCfg:
    # the teacher: a CLIP whose image tower gives the targets (EVA-CLIP release file, open_clip EVA02 checkpoint,
    # OpenAI-layout ViT CLIP file, evaclip run folder / checkpoint / export); required
    teacher: Optional[str] = None
    teacher_model: Optional[str] = None  # its registered architecture when the file does not say (no config.yaml)
    # an OpenAI-layout teacher (OpenAI's CLIP release layout or an open_clip non-timm ViT, `visual.conv1`: EVA-01's
    # OpenAI CLIP-L/14) has its architecture read off the weights, but not its activation: OpenAI's models use
    # QuickGELU, open_clip models trained without "-quickgelu" in their name GELU
    teacher_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    teacher_shard: bool = False  # FSDP2-shard the frozen teacher over the ranks (memory) instead of a full replica
    # teacher grid != student grid: the target map is resized to the student's grid (see evaclip.models.mim)
    target_resize: Literal["bilinear", "area"] = "bilinear"
    # block masking (BEiT / EVA-02; evaclip.data.masking.BlockMaskGenerator)
    mask_ratio: float = 0.4  # target fraction of masked patches
    num_masked: Optional[int] = None  # exact target count instead (EVA-02: 105 of 256 patches)
    min_block_patches: int = 16  # minimum block area (scaled down on small grids)
    block_aspect: list[float] = field(default_factory=lambda: [0.3, 1 / 0.3])  # h / w range, log-uniform
    mask_tries: int = 10  # placement draws per block
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    # the student (evaclip.models.mim.MIMStudent)
    # EVA-02's xavier (each EVA Linear's own fan) + sub-LN rescale, or EVA-01's (= BEiT's; "beit" is an alias)
    # trunc-normal(init_std, cut at +-init_std) with the 1/sqrt(2 * layer) rescale (see MIMStudent)
    init: Literal["eva02", "eva01", "beit"] = "eva02"
    init_std: float = 0.02  # EVA's init_std: the truncated normals' std (EVA-01 g/14: 0.015)
    attn_subln: bool = False  # keep the attention sub-LN in sub-LN towers (EVA-02 B / L MIM students have none)
    patch_embed_grad_scale: float = 1.0  # gradient multiplier of the patch embedding (EVA-02 can use 0.1)
    # monitors, at eval.every
    val: Optional[str] = None  # held-out images (a labelled set as evaclip eval reads it; labels unused)
    # the validation masks: "block", fixed block masks of the training settings (sample i's from (val_mask_seed, i));
    # "alternating", EVA's own protocol (every even patch masked, 50 %): the loss is comparable with EVA's logs
    val_mask: Literal["block", "alternating"] = "block"
    val_mask_seed: int = 0  # the fixed block masks' seed
    knn_train: Optional[str] = None  # labelled memory bank for k-NN
    knn_val: Optional[str] = None  # labelled queries for k-NN
    knn_k: int = 20
    knn_temperature: float = 0.07  # DINO's weighted vote


def _check_range(key: str, value, upper: Optional[float]) -> None:
    """``value`` must be ``[min, max]`` with ``0 < min <= max`` (``<= upper`` when given)."""
    lo, hi = (float(value[0]), float(value[1])) if len(value) == 2 else (0.0, -1.0)
    if not (0 < lo <= hi and (upper is None or hi <= upper)):
        bound = "" if upper is None else f" <= {upper:g}"
        raise ConfigError(f"config key 'mim.{key}' expects [min, max] with 0 < min <= max{bound}, got {list(value)}")


def _refuse_hybrid_student(model_cfg) -> None:
    from evaclip.models import get_model_config
    from evaclip.models.towers import is_timm_tower

    vision = get_model_config(model_cfg.name, **model_cfg.overrides).vision
    if is_timm_tower(vision):
        raise ConfigError(f"config key 'model.name': {model_cfg.name} is a hybrid image tower (timm "
                          f"{vision.timm_model}: conv stages, then a transformer on their features), and MIM needs an "
                          "EVA ViT student whose tokens are image patches that can be masked one by one")


@dataclass
class MIMTrainCfg(TrainCfg):
    """The MIM task's config: the shared sections (``eval`` sets the monitors' cadence and loader) and ``mim``."""

    mim: MIMCfg = field(default_factory=MIMCfg)

    def validate(self) -> None:
        """The shared rules, what MIM refuses in the shared sections, and the ``mim`` ranges (files: ``check``)."""
        super().validate()
        m, model = self.mim, self.model
        for key in ("pretrained", "image_init", "text_init"):
            if getattr(model, key) is not None:
                raise ConfigError(f"config key 'model.{key}' does not apply to task=mim (the student starts from its "
                                  "init; resume=auto continues a run)")
        if model.token_drop:
            raise ConfigError("config key 'model.token_drop' must be 0 for task=mim: the student sees every patch")
        if not 0.0 < m.mask_ratio < 1.0:
            raise ConfigError(f"config key 'mim.mask_ratio' must be in (0, 1), got {m.mask_ratio}")
        if m.num_masked is not None and m.num_masked < 1:
            raise ConfigError(f"config key 'mim.num_masked' must be >= 1, got {m.num_masked}")
        for key in ("min_block_patches", "mask_tries", "knn_k"):
            if getattr(m, key) < 1:
                raise ConfigError(f"config key 'mim.{key}' must be >= 1, got {getattr(m, key)}")
        _check_range("block_aspect", m.block_aspect, None)
        _check_range("crop_scale", m.crop_scale, 1.0)
        if not m.init_std > 0:
            raise ConfigError(f"config key 'mim.init_std' must be > 0, got {m.init_std}")
        if not 0.0 <= m.patch_embed_grad_scale <= 1.0:
            raise ConfigError(f"config key 'mim.patch_embed_grad_scale' must be in [0, 1], got "
                              f"{m.patch_embed_grad_scale}")
        if m.knn_temperature <= 0:
            raise ConfigError(f"config key 'mim.knn_temperature' must be > 0, got {m.knn_temperature}")
        if (m.knn_train is None) != (m.knn_val is None):
            raise ConfigError("config keys 'mim.knn_train' and 'mim.knn_val' go together (memory bank and queries)")


def check_mim_cfg(cfg) -> None:
    """The checks of a MIM config that need the registries or the filesystem (the ranges are
    ``MIMTrainCfg.validate``'s); ConfigError names the key."""
    from evaclip.models import list_models

    m, model = cfg.mim, cfg.model
    if model.name not in list_models():
        raise ConfigError(f"config key 'model.name': unknown model {model.name!r}; known: {list_models()}")
    _refuse_hybrid_student(model)
    if m.teacher is None:
        raise ConfigError("config key 'mim.teacher' is required: the CLIP whose image tower gives the targets")
    if not Path(m.teacher).exists():
        raise ConfigError(f"config key 'mim.teacher': not found: {m.teacher}")
    if m.teacher_model is not None and m.teacher_model not in list_models():
        raise ConfigError(f"config key 'mim.teacher_model': unknown model {m.teacher_model!r}; known: {list_models()}")
    if m.teacher_model is not None and Path(m.teacher).is_dir():
        from evaclip.runs import find_run_config

        own = (find_run_config(Path(m.teacher)) or {}).get("model", {}).get("name")
        if own is not None and own != m.teacher_model:
            raise ConfigError(f"config key 'mim.teacher_model' is {m.teacher_model!r} but the teacher {m.teacher} is "
                              f"a {own!r} run; set mim.teacher_model=null (the run's own config names it)")
    if not cfg.data.synthetic and not cfg.data.train:
        raise ConfigError("config key 'data.train' is required (image shards), or set data.synthetic=true")
    if m.num_masked is not None:  # an absolute count: a change of image or patch size changes the ratio
        from evaclip.models import get_model_config

        grid = get_model_config(model.name, **dict(model.overrides or {})).vision.grid
        if m.num_masked >= grid * grid:
            raise ConfigError(f"config key 'mim.num_masked' is {m.num_masked} but the student's grid has {grid} x "
                              f"{grid} = {grid * grid} patches: set it below that (EVA-02: 105 of 256, 41 %) or use "
                              "mim.mask_ratio (num_masked=null)")
    for key in ("val", "knn_train", "knn_val"):
        path = getattr(m, key)
        if path is not None and "{" not in path and "://" not in path and not Path(path).exists():
            raise ConfigError(f"config key 'mim.{key}': not found: {path}")


class _SyntheticMIMData:
    """The DataInfo interface over synthetic ``(images_BCHW, masks_BP)`` batches (``data.synthetic=true``):
    standard-normal images and block masks, both drawn from a generator seeded by (seed, epoch, batch index)."""

    def __init__(self, batch_size: int, image_size: int, mask_generator, num_batches: int, seed: int = 0):
        self.batch_size, self.image_size, self.gen = batch_size, image_size, mask_generator
        self.num_batches, self.seed = num_batches, seed
        self.num_samples = num_batches * batch_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader = self._batches(epoch, start_step)

    def _batches(self, epoch: int, start: int):
        import numpy as np

        shape = (self.batch_size, 3, self.image_size, self.image_size)
        for i in range(start, self.num_batches):
            rng = np.random.default_rng((self.seed, epoch, i))
            images_BCHW = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
            yield images_BCHW, self.gen.batch(self.batch_size, rng)

    def skipped(self) -> int:
        return 0


def teacher_error(path: str, model_name: Optional[str], error: Exception) -> str:
    """One line for a ``mim.teacher`` that cannot be loaded: what the file is and what a teacher must be (the
    loaders speak of ``--model`` and ``model.*_init``, the command line's and the CLIP task's words)."""
    from evaclip.models.convert import detect_format, load_state_dict_file, not_a_weights_file

    p, want = Path(path), "a MIM teacher is a CLIP's image tower (a CLIP run, checkpoint or export folder, or a file)"
    if p.is_file():
        with open(p, "rb") as f:
            kind = not_a_weights_file(p, f.read(512))
        if kind:
            return f"mim.teacher {p} is {kind}, not a checkpoint: {want}"
    try:
        fmt = detect_format(load_state_dict_file(p))
    except Exception:  # unreadable: the loader's own reason below says why
        fmt = None
    if fmt == "openai_text" or "holds the text encoder" in str(error):
        return f"mim.teacher {p} holds a text tower only: {want}"
    if fmt == "eva_mim":
        return f"mim.teacher {p} is a MIM student (EVA's MIM layout), not a CLIP: {want}"
    if model_name is None and "which architecture" in str(error):
        return (f"mim.teacher {p}: cannot tell which architecture it is (no config.yaml beside it): set "
                "mim.teacher_model=NAME (see evaclip.list_models())")
    reason = getattr(error, "reason", str(error)).replace(f"{p} ", "it ")
    return f"mim.teacher {p}: {reason}"


class MIMTask(Task):
    """Masked image modeling of an EVA student from a frozen CLIP teacher (EVA / EVA-02 pre-training)."""

    name = "mim"
    Cfg = MIMTrainCfg

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.teacher = None  # evaclip.models.mim.MIMTeacher, loaded by build_model
        self._grid: Optional[int] = None  # the student's patch grid side
        self._denom: Optional[torch.Tensor] = None  # masked patches of the step per micro-batch and rank

    @classmethod
    def check(cls, cfg) -> None:
        check_mim_cfg(cfg)

    # -- building ------------------------------------------------------------------------------------------------
    def model_cfg(self):
        """The student's CLIPCfg (its ``vision`` section is the tower): ``model.name`` with ``model.overrides``."""
        from evaclip.models import get_model_config

        return get_model_config(self.cfg.model.name, **dict(self.cfg.model.overrides or {}))

    def mask_generator(self):
        from evaclip.data.masking import BlockMaskGenerator

        m = self.cfg.mim
        return BlockMaskGenerator(self.model_cfg().vision.grid, m.mask_ratio, m.min_block_patches,
                                  tuple(m.block_aspect), m.mask_tries, num_masked=m.num_masked)

    def _log_mask_target(self, gen) -> None:
        from evaclip.logging import get_logger

        how = "mim.num_masked" if self.cfg.mim.num_masked is not None else "mim.mask_ratio"
        get_logger("evaclip.train").info("masks: %d of %d patches per image (%.1f %%, from %s)", gen.num_masked,
                                         gen.num_patches, 100 * gen.num_masked / gen.num_patches, how)

    def build_data(self, steps_hint: int):
        cfg, env = self.cfg, self.env
        image_size = self.model_cfg().vision.image_size
        self._log_mask_target(self.mask_generator())
        if cfg.data.synthetic:
            per_rank = (cfg.data.train_num_samples // (cfg.data.batch_size * env.world_size)
                        if cfg.data.train_num_samples else steps_hint * cfg.accum_freq)
            return _SyntheticMIMData(cfg.data.batch_size, image_size, self.mask_generator(), max(1, per_rank),
                                     seed=cfg.seed * 1000 + env.rank)
        from evaclip.data import build_train_loader
        from evaclip.data.transforms import mim_train_transform

        preprocess = mim_train_transform(image_size, tuple(cfg.mim.crop_scale))
        return build_train_loader(cfg.data, preprocess, rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                                  mask_generator=self.mask_generator())

    def load_teacher(self):
        """The frozen teacher on the CPU, loaded without touching the RNG streams (the student's init follows)."""
        from evaclip.runs import load_teacher

        m = self.cfg.mim
        try:
            with torch.random.fork_rng(devices=[]):
                return load_teacher(m.teacher, m.teacher_model, resize=m.target_resize, openai_act=m.teacher_act)
        except (ValueError, FileNotFoundError) as e:  # the loaders' errors (convert's CheckpointError included)
            from evaclip.models.convert import CheckpointError

            raise CheckpointError(teacher_error(m.teacher, m.teacher_model, e)) from None

    def build_model(self) -> nn.Module:
        from evaclip.models.mim import build_student

        m, mc = self.cfg.mim, self.cfg.model
        self.teacher = self.load_teacher()
        # built for the run's device: attn_backend is resolved (and flash_attn checked) for it, not for the CPU
        student = build_student(mc.name, self.teacher.feature_dim, attn_backend=mc.attn_backend,
                                device=self.env.device, precision=self.cfg.precision, attn_subln=m.attn_subln,
                                init=m.init, init_std=m.init_std, patch_embed_grad_scale=m.patch_embed_grad_scale,
                                grad_checkpointing=mc.grad_checkpointing, **dict(mc.overrides or {}))
        self._grid = student.cfg.grid
        t, v = self.teacher, student.cfg
        if (t.image_size, t.grid) != (v.image_size, v.grid):  # works, but changes what the student learns: say so
            from evaclip.logging import get_logger

            get_logger("evaclip.train").info(
                "teacher and student differ in resolution: teacher %d px (%dx%d patches), student %d px (%dx%d): each "
                "batch is resized to %d px for the teacher and its targets to the student's %dx%d grid "
                "(mim.target_resize=%s)", t.image_size, t.grid, t.grid, v.image_size, v.grid, v.grid, t.image_size,
                v.grid, v.grid, self.cfg.mim.target_resize)
        return student

    def setup(self, model: nn.Module) -> None:
        """The teacher onto this rank's device, its weights in the run's precision (bf16 / fp16: half the memory, no
        per-step cast of frozen weights; buffers such as the RoPE tables stay fp32) and its attention the student's
        ``model.attn_backend`` resolved for that device and precision (flash_attn on a GPU where it runs): a full
        replica, or FSDP2-sharded over the ranks with ``mim.teacher_shard`` (block units, low-precision gathers)."""
        from evaclip.models.attention import configure_attention
        from evaclip.precision import amp_dtype

        if self.teacher is None:
            self.teacher = self.load_teacher()
        self._grid = self._grid or model.cfg.grid
        self.teacher.to(self.env.device)
        dtype = amp_dtype(self.cfg.precision)
        if dtype is not None:
            for p in self.teacher.parameters():
                p.data = p.data.to(dtype)
        configure_attention(self.teacher, self.cfg.model.attn_backend, self.cfg.precision)
        if self.cfg.mim.teacher_shard and self.env.world_size > 1:
            from evaclip.fsdp import apply_fsdp

            apply_fsdp(self.teacher, precision=self.cfg.precision)

    # -- one step ------------------------------------------------------------------------------------------------
    def to_device(self, batch):
        images_BCHW, masks_BP = batch
        dev = self.env.device
        return images_BCHW.to(dev, non_blocking=True), masks_BP.to(dev, non_blocking=True)

    def forward_backward(self, model: nn.Module, micro: list, ctx: StepContext) -> dict[str, torch.Tensor]:
        from evaclip.distributed import all_reduce_

        k, world = len(micro), self.env.world_size
        masked = torch.stack([mask.sum() for _, mask in micro]).sum().float()
        # every masked patch of the step counts once: accumulate() divides by k and DDP / FSDP average over ranks
        self._denom = all_reduce_(masked.clone()).clamp(min=1.0) / (k * world)
        out = super().forward_backward(model, micro, ctx)  # plain accumulation of loss()
        out["masked_frac"] = masked / sum(mask.numel() for _, mask in micro)
        return out

    def loss(self, model: nn.Module, micro_batch) -> tuple[torch.Tensor, dict]:
        """The summed negative cosine at this micro-batch's masked patches over the step's ``_denom``."""
        from evaclip.losses import mim_cosine_loss

        images_BCHW, mask_BP = micro_batch
        target_BPT = self.teacher(images_BCHW, self._grid)  # the unmasked view, no gradient
        # every position predicted, the loss weights the masked ones: static shapes, no host sync (see the loss)
        pred_BPT = model(images_BCHW, mask_BP, all_positions=True)
        return mim_cosine_loss(pred_BPT, target_BPT, mask_BP, self._denom), {}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _eval_preprocess(self):
        """The monitors' view: shortest side resized (bicubic) to the student's image size, center crop, the
        teacher's normalisation (open_clip's eval transform, from torchvision: a MIM run never imports open_clip)."""
        from torchvision import transforms as T

        from evaclip.data.transforms import MEAN, STD

        size = self.model_cfg().vision.image_size
        return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                          T.Normalize(MEAN, STD)])

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        """The MIM loss on ``mim.val`` with the fixed masks (``mim.val_mask``), averaged over every masked patch of the
        set (all ranks)."""
        from evaclip.data.masking import alternating_masks
        from evaclip.distributed import all_reduce_, rank_world
        from evaclip.evals.common import autocast
        from evaclip.evals.data import build_eval_loader
        from evaclip.evals.knn import resolve_labelled
        from evaclip.losses import mim_cosine_loss
        from evaclip.parallel import gathered

        ev, dev = self.cfg.eval, self.env.device
        rank, world = rank_world()
        gen = self.mask_generator()
        alternating = self.cfg.mim.val_mask == "alternating"
        loader = build_eval_loader(resolve_labelled(self.cfg.mim.val), self._eval_preprocess(), ev.batch_size,
                                   ev.workers, rank, world)
        total = torch.zeros(2, dtype=torch.float64, device=dev)  # summed -cos, masked patches
        with gathered(self.teacher):
            for idx_B, images_BCHW, _ in loader:
                mask_BP = (alternating_masks(len(idx_B), gen.num_patches) if alternating
                           else gen.fixed_masks(idx_B, self.cfg.mim.val_mask_seed)).to(dev)
                images_BCHW = images_BCHW.to(dev, non_blocking=True)
                with autocast(dev, self.cfg.precision != "fp32"):
                    pred_MT = model(images_BCHW, mask_BP)
                    target_BPT = self.teacher(images_BCHW, self._grid)
                total[0] += mim_cosine_loss(pred_MT, target_BPT, mask_BP, denom=1.0).double()
                total[1] += mask_BP.sum()
        all_reduce_(total)
        return float(total[0] / total[1].clamp(min=1))

    def evaluate(self, model: nn.Module, step: int) -> dict:
        m, ev = self.cfg.mim, self.cfg.eval
        results = {}
        model.eval()
        if m.val:
            results["val_loss"] = self.val_loss(model)
        if m.knn_train and m.knn_val:
            from evaclip.evals.knn import knn_top1

            results.update(knn_top1(model.pooled_features, m.knn_train, m.knn_val, self._eval_preprocess(),
                                    k=m.knn_k, temperature=m.knn_temperature, batch_size=ev.batch_size,
                                    workers=ev.workers, device=self.env.device, amp=self.cfg.precision != "fp32"))
        return results
