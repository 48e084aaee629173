"""``evaclip train|eval|export|bench``: one console script, one module per subcommand (imported only when used)."""
from __future__ import annotations

import importlib
import sys
from typing import Optional

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "train": ("evaclip.train", "cli", "train from a recipe: evaclip train RECIPE [key=value ...]"),
    "eval": ("evaclip.evals", "cli", "zero-shot / retrieval evaluation of a run or checkpoint"),
    "export": ("evaclip.export", "cli", "export encoders (safetensors, open_clip, ONNX)"),
    "bench": ("evaclip.bench", "cli", "throughput / memory benchmarks against open_clip"),
}


def usage() -> str:
    lines = ["usage: evaclip COMMAND [args ...]", "", "commands:"]
    lines += [f"  {name:<8}{info[2]}" for name, info in COMMANDS.items()]
    lines += ["", "`evaclip COMMAND --help` for the arguments of a command."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Dispatch ``argv[0]`` to its module's entry point with the remaining arguments; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"evaclip: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"evaclip {name}: this installation has no {module_name} ({e})", file=sys.stderr)
            return 2
        raise
    entry = getattr(module, func_name, None) or getattr(module, "main", None)
    if entry is None:
        print(f"evaclip {name}: {module_name} has no command-line entry point ({func_name}/main)", file=sys.stderr)
        return 2
    rc = entry(rest)
    return int(rc or 0)


def run() -> None:
    """The console script: ``main()``, then leave with its exit code (see ``distributed.exit_process``)."""
    from evaclip.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
