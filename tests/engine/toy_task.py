"""A toy objective defined outside evaclip, in this one file: its config class (a ``toy`` section), its model (a tiny
image tower plus a read-out ``decoder``, a tower of the task's own), its data and its loss. Registered by one line
(``evaclip.config.TASKS["toy"] = "<this module>:ToyTask"``), it trains, logs and resumes like the built-in tasks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from evaclip.config import TrainCfg
from evaclip.engine.task import Task
from evaclip.errors import ConfigError

MODEL = "EVA02-CLIP-tiny"


@dataclass
class ToySection:
    outputs: int = 4  # size of the regressed target
    target_seed: int = 7


@dataclass
class ToyTrainCfg(TrainCfg):
    toy: ToySection = field(default_factory=ToySection)

    def validate(self) -> None:
        super().validate()
        if self.toy.outputs < 1:
            raise ConfigError(f"config key 'toy.outputs' must be >= 1, got {self.toy.outputs}")


class Regressor(nn.Module):
    """The tiny image tower plus a linear read-out (tower ``decoder``: its own optimizer group)."""

    def __init__(self, outputs: int):
        super().__init__()
        from evaclip.models import build_tower

        self.visual = build_tower(MODEL, "visual", attn_backend="eager")
        self.decoder = nn.Linear(self.visual(torch.zeros(1, 3, 32, 32)).shape[-1], outputs)

    def forward(self, images_BCHW):
        return self.decoder(self.visual(images_BCHW))

    def no_weight_decay(self):
        return set()

    def param_tower(self, name):
        return "visual" if name.startswith("visual.") else "decoder"

    def layer_id(self, name):
        return 0

    def num_layers(self, tower):
        return 1


class SampleData:
    """Sample ``j`` of epoch ``e`` is a pure function of (e, j): K micro-batches of B hold the same samples as one
    batch of K*B, and ``set_epoch(e, i)`` resumes at micro-batch ``i`` (a ``TrainData``)."""

    def __init__(self, batch_size, num_batches):
        self.batch_size, self.num_batches = batch_size, num_batches
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def _sample(self, j):
        g = torch.Generator().manual_seed(1000 * self.epoch + j)
        return torch.randn(3, 32, 32, generator=g)

    @property
    def loader(self):
        B = self.batch_size
        return iter([torch.stack([self._sample(i * B + b) for b in range(B)])
                     for i in range(self.start, self.num_batches)])

    def skipped(self):
        return 0


class ToyTask(Task):
    """Regress a fixed random target vector from each image: plain accumulation of ``loss`` (the default step)."""

    name = "toy"
    Cfg = ToyTrainCfg
    evaluations: list = []

    def build_data(self, steps_hint):
        return SampleData(self.cfg.data.batch_size, 64 // self.cfg.data.batch_size)  # 64 samples per epoch

    def build_model(self):
        t = self.cfg.toy
        self.target = torch.randn(t.outputs, generator=torch.Generator().manual_seed(t.target_seed))
        return Regressor(t.outputs)

    def to_device(self, batch):
        return batch.to(self.env.device)

    def loss(self, model, images_BCHW):
        pred = model(images_BCHW)
        return ((pred - self.target) ** 2).mean(), {"pred_mean": pred.mean()}

    def evaluate(self, model, step):
        from pathlib import Path

        from evaclip import checkpoint as ckpt

        run = Path(self.cfg.output_dir) / self.cfg.name
        ToyTask.evaluations.append((step, (run / "ckpt" / ckpt.step_dir_name(step)).is_dir()))
        return {"toy/step": step}
