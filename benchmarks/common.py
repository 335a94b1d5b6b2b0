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


def sync(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def require_device(device: str) -> None:
    """Stop with a clear message when --device cuda is asked for without a CUDA device."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")


def timed(fn, repeats: int = 3, warmup: int = 1, device="cpu"):
    """(median seconds, last result) of ``fn()`` after ``warmup`` untimed calls; on a CUDA
    device every call is timed to the end of its GPU work."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


class PeakMemory:
    """Peak memory beyond what was in use at construction, in MB: resident memory on the CPU
    (Linux: via clear_refs; NaN where unsupported), allocated memory on a CUDA device."""

    def __init__(self, device):
        import gc

        gc.collect()
        self.cuda = getattr(device, "type", device) == "cuda"
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            self.ok = True
        else:
            self.ok = reset_peak_rss()
            self.base = rss_mb()

    def extra_mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return peak_rss_mb() - self.base if self.ok else float("nan")


def _status_mb(field: str):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory since the start (or since :func:`reset_peak_rss`), MB."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    cur = _status_mb("VmRSS")
    return cur if cur is not None else peak_rss_mb()


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux: clear_refs 5). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    keys = list(meta)
    for r in rows:  # rows may carry different columns (e.g. ratios only on some)
        keys += [k for k in r if k not in keys]
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


def emit(name: str, rows: list, text: str, write: bool) -> None:
    """Print the report; unless told not to, save benchmarks/<name>.md and out/<name>.csv."""
    print(text)
    if write:
        here = os.path.dirname(os.path.abspath(__file__))
        write_csv(os.path.join(here, "out", f"{name}.csv"), rows)
        with open(os.path.join(here, f"{name}.md"), "w") as f:
            f.write(text)
