"""Training objectives, one module each, each a ``evaclip.engine.task.Task`` with its own config class; the registry
that names them is ``evaclip.config.TASKS``."""
