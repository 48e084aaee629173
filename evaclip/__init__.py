"""evaclip: train CLIP models the EVA-CLIP way."""
__version__ = "0.1.0"
