"""EVA-CLIP model family: registry, towers, attention backends, checkpoint conversion."""
from .attention import AttentionBackendError, resolve_backend
from .clip import CLIP, CLIPOutput
from .factory import build_tower, create_model
from .registry import CLIPCfg, TextCfg, VisionCfg, get_model_config, list_models, register_model

__all__ = ["CLIP", "CLIPOutput", "CLIPCfg", "TextCfg", "VisionCfg", "AttentionBackendError", "build_tower",
           "create_model", "get_model_config", "list_models", "register_model", "resolve_backend"]
