"""``evaclip train|eval|export|bench|config``: one console script, one module per subcommand (imported only when used).

``python -m evaclip ...`` is the same command (``evaclip/__main__.py``).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import os
import sys
import tokenize
from typing import Any, Optional

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "train": ("evaclip.train", "cli", "train from a recipe: evaclip train RECIPE [key=value ...]"),
    "eval": ("evaclip.evals", "main", "zero-shot / retrieval evaluation of a run folder or checkpoint"),
    "export": ("evaclip.export", "main", "export encoders of a run or checkpoint (safetensors, open_clip, ONNX)"),
    "bench": ("evaclip.bench", "cli", "throughput / memory benchmarks against open_clip"),
    "config": ("evaclip.cli", "config_cli", "print a recipe's resolved config (every key, default, comment) as YAML"),
}


def usage() -> str:
    lines = ["usage: evaclip COMMAND [args ...]      (or: python -m evaclip COMMAND ...)", "", "commands:"]
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
    rc = getattr(module, func_name)(rest)
    return int(rc or 0)


# ----------------------------------------------------------------------------------------------------------------------
# evaclip config RECIPE [key=value ...]
# ----------------------------------------------------------------------------------------------------------------------
def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` of a config dataclass, read from its source and its bases' (a task's schema inherits the
    shared fields): the comment at the end of the field's line, or the comment lines right above it."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        out.update(_own_field_comments(klass))
    return out


def _own_field_comments(cls) -> dict[str, str]:
    """``field_comments`` of the fields ``cls``'s own source defines (empty when the source is not available)."""
    try:
        lines, start = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    src = "".join(lines)
    try:
        body = ast.parse(src.lstrip() if lines[0][:1].isspace() else src).body[0].body
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    except (SyntaxError, tokenize.TokenError, IndexError, AttributeError):
        return {}
    own_line = {i + 1 for i, ln in enumerate(lines) if ln.strip().startswith("#")}
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in own_line]
        above, n = [], node.lineno - 1
        while n in own_line:
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(trailing or above)
        if text:
            out[node.target.id] = text
    return out


def _yaml_value(value: Any) -> str:
    """One value in YAML flow style (``null``, ``0.9``, ``[0.9, 0.98]``, ``{}``, quoted strings where needed)."""
    import yaml

    return yaml.safe_dump([value], default_flow_style=True, width=1 << 30).strip()[1:-1]


def commented_yaml(cfg, defaults, indent: int = 0) -> list[str]:
    """The config as YAML lines, each key with its comment and, where the value differs, the default."""
    notes = field_comments(type(cfg)) if dataclasses.is_dataclass(cfg) else {}
    pad = " " * indent
    lines = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name, None)
        if dataclasses.is_dataclass(value):
            head = f"{pad}{f.name}:"
            lines.append(head + (f"  # {notes[f.name]}" if f.name in notes else ""))
            lines += commented_yaml(value, default if dataclasses.is_dataclass(default) else value, indent + 2)
            continue
        text = f"{pad}{f.name}: {_yaml_value(value)}"
        comment = notes.get(f.name, "")
        if value != default and "(default:" not in comment:  # a comment may give the default in words
            comment = f"{comment} (default: {_yaml_value(default)})".strip()
        lines.append(text + (f"  # {comment}" if comment else ""))
    return lines


def config_cli(argv: Optional[list[str]] = None) -> int:
    """``evaclip config [RECIPE] [key=value ...]``: the resolved training config as YAML (a valid recipe)."""
    from evaclip.config import ConfigError, load_config, to_dict

    p = argparse.ArgumentParser(
        prog="evaclip config", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the config a training run would use (defaults <- RECIPE <- key=value overrides) as YAML: "
        "every key with its comment\nand, where the recipe or an override changed it, the default. The output is "
        "itself a valid recipe.",
        epilog="examples:\n  evaclip config                                  # every key with its default\n"
        "  evaclip config recipes/demo_cpu.yaml optim.lr=1e-3\n"
        "  evaclip config demo_cpu --plain > my_recipe.yaml  # a name in recipes/ works too")
    p.add_argument("recipe", nargs="?", default=None, help="recipe YAML file or a name in recipes/ (default: none)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as for evaclip train")
    p.add_argument("--plain", action="store_true", help="plain YAML, without comments")
    args = p.parse_args(argv)
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `evaclip config key=value`: no recipe, only overrides
        recipe, overrides = None, [recipe, *overrides]
    try:
        cfg = load_config(recipe, overrides)
        defaults = type(cfg)()  # the task's own schema's defaults
    except ConfigError as e:
        print(f"evaclip config: error: {e}", file=sys.stderr)
        return 2
    if args.plain or not dataclasses.is_dataclass(cfg):
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    what = " ".join([recipe or "(defaults)", *overrides])
    text = f"# evaclip config {what}\n# resolved config: every key, its comment, and the default where it differs\n"
    try:
        print(text + "\n".join(commented_yaml(cfg, defaults)))
    except BrokenPipeError:  # `evaclip config ... | head`
        sys.stdout = open(os.devnull, "w")
    return 0


def run() -> None:
    """The console script: ``main()``, then leave with its exit code (see ``distributed.exit_process``)."""
    from evaclip.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
