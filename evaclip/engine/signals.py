"""Preemption and Ctrl-C: a stop request is honoured at the end of the current step, never inside a checkpoint write."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Optional

from evaclip.logging import get_logger

log = get_logger(__name__)


class StopSignal:
    """Context: SIGTERM / SIGINT set ``requested`` (the signal number); the loop checkpoints and exits at the end of
    the step. A second Ctrl-C stops at once, except inside ``critical()`` (a checkpoint write), which finishes first.

    DataLoader workers are forked with this handler installed; they ignore it (the main process owns the stop), so
    the message is printed once.
    """

    def __init__(self):
        self.requested: Optional[int] = None
        self._pid = os.getpid()
        self._previous: dict = {}
        self._critical = 0
        self._interrupt_pending = False
        self._polled = 0  # the last step whose stop flag was read (its value fixed before the step ran)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.requested is not None:
            if signum != signal.SIGINT:
                return
            if self._critical:
                self._interrupt_pending = True
                log.warning("second Ctrl-C: stopping as soon as the checkpoint write is complete")
                return
            raise KeyboardInterrupt
        self.requested = signum
        # the step in flight read its flag before the signal came (every rank must stop at the same step): the
        # next one reads it, and the checkpoint is that step's
        log.warning("received %s: saving a checkpoint at the end of step %d, then exiting (Ctrl-C again to stop "
                    "at once)", signal.Signals(signum).name, self._polled + 1)

    def poll(self, step: int) -> bool:
        """Whether a stop was requested, read for ``step`` (1-based, the step about to run: it saves and stops if so);
        a later signal is announced for ``step + 1``."""
        requested = self.requested is not None
        self._polled = step
        return requested

    def start_at(self, steps_done: int) -> None:
        """The run resumes after ``steps_done`` steps: a signal before the first step stops after step
        ``steps_done + 1``."""
        self._polled = steps_done

    @contextlib.contextmanager
    def critical(self):
        """Defer an immediate stop (second Ctrl-C) until the block is done: used around checkpoint writes."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._interrupt_pending:
                self._interrupt_pending = False
                raise KeyboardInterrupt

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
