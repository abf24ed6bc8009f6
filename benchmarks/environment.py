"""What every benchmark records beside its figures (the machine, the commit) and how it hands them out."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _proc_field(path: str, key: str) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return ""


def host() -> dict[str, Any]:
    """The CPU, how many CPUs this process may use, memory, OS, Python and the load average now."""
    info: dict[str, Any] = {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory": _proc_field("/proc/meminfo", "MemTotal"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def git_state(*paths: str) -> dict[str, Any]:
    """The commit measured and the uncommitted changes under ``paths`` (what the figures may not be of)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head.stdout.strip(), "uncommitted": dirty.stdout.splitlines()}


def emit(result: dict[str, Any], text: str, out: Path) -> None:
    """Store the table in the result, write the JSON, print the table and where the JSON went."""
    result["table"] = text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"\nJSON: {out}")
