"""evaclip: train CLIP models the EVA-CLIP way."""
__version__ = "0.1.0"

from .data.transforms import get_tokenizer, get_transforms  # noqa: E402
from .encoder import load_encoder  # noqa: E402  (exported encoders, see evaclip/export.py)
from .models import create_model, get_model_config, list_models  # noqa: E402
from .models.convert import load_checkpoint  # noqa: E402

__all__ = ["__version__", "create_model", "get_model_config", "list_models", "get_tokenizer", "get_transforms",
           "load_checkpoint", "load_encoder"]
