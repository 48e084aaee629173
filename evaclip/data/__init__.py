"""Data: the webdataset pipeline (``shards``), synthetic batches (``synthetic``) and transforms (``transforms``)."""
from .shards import DataInfo, build_train_loader, expand_spec
from .synthetic import SyntheticDataInfo, synthetic_batches

__all__ = ["DataInfo", "build_train_loader", "expand_spec", "synthetic_batches",
           "SyntheticDataInfo"]
