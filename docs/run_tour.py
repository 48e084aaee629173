"""Run the README's "A short tour" block top to bottom, as written, in one bash session (after `make demo`).

    python docs/run_tour.py [--dry-run]

Every command line of the block runs in order with `set -euo pipefail`; the first failure stops the tour with its
exit code. Lines tagged `# [your data]` need data this machine does not have (LAION shards, your captions file):
they are printed and skipped. `make bench` is skipped unless --with-bench (it takes several minutes).
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = "[your data]"


def tour_block(readme: str) -> list[str]:
    """The lines of the first ```bash block after the '## A short tour' heading."""
    section = readme.split("## A short tour", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    if not match:
        raise SystemExit("README.md: no ```bash block under '## A short tour'")
    return match.group(1).splitlines()


def script(lines: list[str], with_bench: bool) -> str:
    out = ["set -euo pipefail", f"cd {ROOT}"]
    for line in lines:
        cmd = line.split("  #")[0].strip() if not line.lstrip().startswith("#") else ""
        if not cmd:
            continue
        if TAG in line or (cmd.startswith("make bench") and not with_bench):
            out.append(f"echo {shlex.quote('skipped: ' + cmd)}")
            continue
        out.append(f"echo {shlex.quote('+ ' + cmd)}")
        out.append(cmd)
    out.append("echo 'tour: every command ran'")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the bash script instead of running it")
    ap.add_argument("--with-bench", action="store_true", help="also run `make bench`")
    args = ap.parse_args()
    text = script(tour_block((ROOT / "README.md").read_text()), args.with_bench)
    if args.dry_run:
        print(text)
        return 0
    return subprocess.run(["bash", "-c", text], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
