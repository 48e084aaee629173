"""Benchmark results as files: one JSON (everything, machine-readable) and one Markdown table per run.

A result is a dict of sections; each section is ``{"title", "columns": [[key, header], ...], "rows": [dict, ...],
"notes": [str, ...]}``. The machine description and the exact command line travel with every result.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["format_value", "machine_info", "markdown", "section", "write_report"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    from evaclip.engine.run_dir import git_revision

    return git_revision(short=True)["commit"]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no __version__: the report says so instead of failing
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU name, library versions and git revision: what a figure depends on."""
    device = torch.device(device)
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "open_clip": _version("open_clip"),
        "git": _git_revision(),
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def section(title: str, columns: list[tuple[str, str]], rows: list[dict], notes: list[str] | None = None) -> dict:
    """One table of a report: ``columns`` are (row key, header) pairs in display order."""
    return {"title": title, "columns": [list(c) for c in columns], "rows": rows, "notes": list(notes or [])}


def format_value(v: Any) -> str:
    """Numbers to 3 significant figures (integers as is), None as '-', anything else as str."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v).replace("|", "\\|")


def markdown(report: dict) -> str:
    """The whole report (machine, command, every section's table and notes) as Markdown."""
    m = report.get("machine", {})
    lines = [f"# {report.get('title', 'evaclip benchmarks')}", ""]
    if "command" in report:
        lines += ["```", report["command"], "```", ""]
    if m:
        lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in m.items() if v is not None), ""]
    for sec in report.get("sections", []):
        lines += [f"## {sec['title']}", ""]
        headers = [h for _, h in sec["columns"]]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "|".join("---" for _ in headers) + "|")
        for row in sec["rows"]:
            lines.append("| " + " | ".join(format_value(row.get(k)) for k, _ in sec["columns"]) + " |")
        if sec["notes"]:
            lines.append("")
            lines += [f"- {n}" for n in sec["notes"]]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.setdefault("command", " ".join([Path(sys.executable).name, "-m", "evaclip.bench", *sys.argv[1:]]))
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
