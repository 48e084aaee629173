"""torchrun entry for the elastic-restart test: ``evaclip.train`` with one injected worker death.

Usage: torchrun --max-restarts=1 ... tests/fsdp_elastic_worker.py KILL_RANK KILL_AT_STEP RECIPE [key=value ...]

On the first attempt (``TORCHELASTIC_RESTART_COUNT`` is 0, set by torchrun), rank KILL_RANK SIGKILLs itself just
before its optimizer step number KILL_AT_STEP (1-based, counted in this process); torchrun then tears the group
down and restarts every worker, and ``resume=auto`` continues from the newest checkpoint. The fault injection lives
here, in the test harness only: evaclip itself reads no such knob.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaclip.engine.step as step  # noqa: E402
import evaclip.train as train  # noqa: E402


def main() -> int:
    kill_rank, kill_at = int(sys.argv[1]), int(sys.argv[2])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and int(os.environ.get("RANK", "0")) == kill_rank:
        real_update = step.apply_update
        calls = {"n": 0}

        def dying_update(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_update(*args, **kwargs)

        step.apply_update = dying_update
    return train.cli(sys.argv[3:])


if __name__ == "__main__":
    raise SystemExit(main())
