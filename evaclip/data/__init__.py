"""Data: the webdataset pipeline (``shards``), synthetic batches (``synthetic``), transforms (``transforms``) and MIM
block masks (``masking``)."""
from .masking import BlockMaskGenerator
from .shards import DataInfo, build_train_loader, expand_spec
from .synthetic import SyntheticDataInfo, synthetic_batches

__all__ = ["DataInfo", "build_train_loader", "expand_spec", "synthetic_batches",
           "SyntheticDataInfo", "BlockMaskGenerator"]
