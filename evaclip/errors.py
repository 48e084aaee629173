"""Exceptions shared across evaclip (importable without torch)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override names an unknown key, has a wrong type, or an invalid value. The message is one line that
    names the full key and says what to do."""


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint or weights file is missing, incomplete, corrupt, of an unknown format, or does not match the model
    or run it is loaded into. One class for the run-folder side (``evaclip.checkpoint``) and the weights-format side
    (``evaclip.models.convert``), which both re-export it; a ValueError and a RuntimeError, as each side's callers
    catch."""
