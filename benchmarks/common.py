"""Shared benchmark plumbing: machine description, timing, CSV/markdown output."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import resource
import statistics
import subprocess
import time


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def timed(fn, repeats: int = 3, warmup: int = 1):
    """(median seconds, last result) of ``fn()`` after ``warmup`` untimed calls."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def write_csv(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {"machine": machine(), "git": git_rev(), "timestamp": stamp}
    keys = list(meta) + [k for k in rows[0] if k not in meta]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})


def markdown_table(rows: list, cols: list) -> str:
    """``cols``: (header, key, format) triples."""
    head = "| " + " | ".join(h for h, _, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key, "")
            cells.append(fmt.format(v) if (v != "" and v is not None) else "–")
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep] + body)
