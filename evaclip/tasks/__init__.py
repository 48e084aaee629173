"""Training objectives, one module each, all implementing ``evaclip.tasks.base.Task``."""
from evaclip.tasks.base import StepContext, Task, get_task

__all__ = ["StepContext", "Task", "get_task"]
