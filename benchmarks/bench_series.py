"""End-to-end `pyrank analyze` on a real-sized checkpoint series, against reading it once.

The series is generated here, streaming (one tensor at a time, bounded RAM), in the HF
sharded layout a trainer writes: a base and --steps checkpoints (checkpoint-N/) of a model
with Qwen2.5-1.5B's shapes (28 layers, hidden 1536, MLP 8960, 2 KV heads, vocabulary
151936, tied embeddings: 3.1 GB of bf16 per checkpoint), or Qwen2.5-7B's with --shape 7b
(15 GB per checkpoint). Each projection's update is RL-like (pyrank.testing.rl_like_pair:
a decaying rank-4 part whose directions turn along the series and grow with the step, plus
noise, rounded to bf16 — which leaves most weights bitwise unchanged, as RL updates do).

Rows (all measured in this run, on this machine):

  read floor           every file of the series read once, sequentially (what `cat` costs)
  pyrank analyze       `pyrank analyze BASE --run-dir RUN --k K --quiet` as a subprocess:
                       the report a user gets (σ, energy, drift, sparsity, R² per module)
  kernel bound         Σ over observations of passes × bytes of (W_t, W₀) ÷ the fused
                       kernel's bandwidth measured here on the largest module (fastest of 15)
  AlphaRL-style        materialize ΔW in fp32 + torch.linalg.svd per observation: timed
                       once per distinct shape, extrapolated to the series (labelled), plus
                       the read floor
  torch.svd_lowrank    materialize ΔW in fp32 + torch.svd_lowrank(q=k+2, niter=2): likewise

GB/s: the bytes each row reads over its wall time — the files, for the read floors; the
modules' base and checkpoint tensors, each once, for pyrank and the baselines (what any of them
must read); the passes' bytes, for the kernel bound (the fused pass's bandwidth).

"cold" runs first evict the series' files from the page cache (posix_fadvise DONTNEED:
no root needed; the disk bytes actually read, from /proc/vmstat, show whether it worked)
and "warm" runs follow a run that left them cached (when RAM holds them).

    python benchmarks/bench_series.py                  # ~15 min on 2 cores, 22 GB of disk
    python benchmarks/bench_series.py --layers 2 --steps 3 --no-write   # a quick look
    python benchmarks/bench_series.py --shape 7b --steps 2 --layers 8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table  # noqa: E402

SHAPES = {  # hidden, intermediate, kv dim, vocabulary, layers, tied embeddings
    "1.5b": dict(hidden=1536, mlp=8960, kv=256, vocab=151936, layers=28, tied=True),
    "7b": dict(hidden=3584, mlp=18944, kv=512, vocab=152064, layers=28, tied=False),
    "tiny": dict(hidden=64, mlp=160, kv=16, vocab=100, layers=2, tied=False),  # the test suite's smoke run
}
SHARD_BYTES = 1 << 30  # HF-style shards of about this size


def model_tensors(cfg, layers):
    """[(name, (rows, cols) or (n,), is a projection)] in file order."""
    h, f, kv = cfg["hidden"], cfg["mlp"], cfg["kv"]
    out = [("model.embed_tokens.weight", (cfg["vocab"], h), False)]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), False)]
        for nm, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            out.append((p + f"self_attn.{nm}.weight", shape, True))
            if nm != "o_proj":
                out.append((p + f"self_attn.{nm}.bias", shape[:1], False))
        out += [(p + "post_attention_layernorm.weight", (h,), False)]
        for nm, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
            out.append((p + f"mlp.{nm}.weight", shape, True))
    out.append(("model.norm.weight", (h,), False))
    if not cfg["tied"]:
        out.append(("lm_head.weight", (cfg["vocab"], h), False))
    return out


def _seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def tensor_at(name, shape, proj, step, steps):
    """The tensor ``name`` at ``step`` (0 = base), bf16, deterministic."""
    from pyrank.testing import random_orthonormal, rl_like_pair

    g = torch.Generator().manual_seed(_seed(name))
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    W0 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    if step == 0:
        return W0
    if not proj:  # embeddings: a small dense change, not analyzed
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(_seed(name) + step)) * 1e-4
        return (W0.float() + noise).to(torch.bfloat16)
    m, n = shape
    a0, b0 = random_orthonormal(m, 4, g), random_orthonormal(n, 4, g)
    ga, gb = random_orthonormal(m, 4, g), random_orthonormal(n, 4, g)
    ang = 0.02 * step  # the directions turn along a great circle, 0.02 rad a checkpoint
    a = torch.linalg.qr(a0 * math.cos(ang) + (ga - a0 @ (a0.T @ ga)) * math.sin(ang))[0]
    b = torch.linalg.qr(b0 * math.cos(ang) + (gb - b0 @ (b0.T @ gb)) * math.sin(ang))[0]
    Wt, _ = rl_like_pair(m, n, W0=W0, directions=(a, b), seed=_seed(name) + 1,
                         update_rms=4e-5 * step / steps * 2)
    return Wt


def write_model(path, cfg, layers, step, steps):
    """One checkpoint as HF shards + index, one tensor in memory at a time per shard."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = model_tensors(cfg, layers)
    shards, cur, size = [], [], 0
    for name, shape, proj in tensors:
        nb = math.prod(shape) * 2
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, proj))
        size += nb
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({nm: tensor_at(nm, sh, pj, step, steps) for nm, sh, pj in shard},
                  os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({nm: fname for nm, _, _ in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16",
                   "hidden_size": cfg["hidden"], "intermediate_size": cfg["mlp"], "num_hidden_layers": layers,
                   "vocab_size": cfg["vocab"], "tie_word_embeddings": cfg["tied"]}, f)


def generate(root, cfg, layers, steps, every):
    marker = os.path.join(root, "series.json")
    want = {"cfg": cfg, "layers": layers, "steps": steps, "every": every, "version": 1}
    if os.path.exists(marker) and json.load(open(marker)) == want:
        return False
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    write_model(os.path.join(root, "base"), cfg, layers, 0, steps)
    for t in range(1, steps + 1):
        write_model(os.path.join(root, "run", f"checkpoint-{t * every}"), cfg, layers, t, steps)
    json.dump(want, open(marker, "w"))
    return True


def series_files(root):
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.join(d, f) for f in fs if f.endswith(".safetensors")]
    return sorted(out)


def evict(files) -> None:
    """Drop the files' pages from the page cache (clean pages; no root needed)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_bytes() -> int:
    """Bytes paged in from block devices since boot (/proc/vmstat pgpgin, KiB)."""
    try:
        for line in open("/proc/vmstat"):
            if line.startswith("pgpgin "):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def read_all(files) -> dict:
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    d0, t = disk_read_bytes(), time.perf_counter()
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                r = f.readinto(mv)
                if not r:
                    break
                total += r
    return {"wall_s": time.perf_counter() - t, "bytes": total, "disk_bytes": disk_read_bytes() - d0, "rss_mb": 0.0}


# Runs the CLI in a child that reports its own peak RSS (VmHWM belongs to the process image
# after exec; ru_maxrss would also count the pages this parent shared with it at fork).
_CHILD = """import atexit, sys
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(sys.argv[1], 'w').write(line.split()[1])
atexit.register(hwm)
from pyrank.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_analyze(root, k, out, threads):
    hwm = out + ".hwm"
    cmd = [sys.executable, "-c", _CHILD, hwm, "analyze", os.path.join(root, "base"), "--run-dir",
           os.path.join(root, "run"), "--k", str(k), "--out", out, "--force", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    d0, t = disk_read_bytes(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"pyrank analyze failed ({proc.returncode}): {proc.stderr}")
    rss = int(open(hwm).read()) / 1024.0 if os.path.exists(hwm) else float("nan")
    return {"wall_s": wall, "disk_bytes": disk_read_bytes() - d0, "rss_mb": rss}


def kernel_bandwidth(shape, k):
    """Bytes of (W_t, W₀) per second of one fused pass on a pair of ``shape``: the fastest of
    15, since a bound is what the kernel can do (the median of 7 this used to take once read
    17.2 GB/s where the same pass ran at ~31 GB/s alone: it made the bound lenient)."""
    from pyrank import ops
    from pyrank.linalg import default_oversample
    from pyrank.testing import rl_like_pair

    Wt, W0 = rl_like_pair(*shape, seed=1)
    l = k + default_oversample(k)
    X, Y = torch.randn(shape[1], l), torch.randn(shape[0], l)
    ops.delta_mm_both(Wt, W0, X, Y)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        ops.delta_mm_both(Wt, W0, X, Y)
        times.append(time.perf_counter() - t)
    return 2 * Wt.numel() * Wt.element_size() / min(times)


def baselines(root, report, k, sample_step):
    """Per distinct module shape: (dense SVD s, torch.svd_lowrank s, σ₁ and u₁ errors of
    pyrank's report against the dense fp64 SVD) on one module of that shape at one step."""
    from pyrank.io import open_weights

    base = open_weights(os.path.join(root, "base"))
    ck = open_weights(os.path.join(root, "run", f"checkpoint-{sample_step}"))
    by_shape = {}
    for name, mod in report["modules"].items():
        by_shape.setdefault(tuple(mod["shape"]), name)
    out = {}
    for shape, name in by_shape.items():
        W, W0 = ck[name], base[name]
        t = time.perf_counter()
        D = W.float() - W0.float()
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        dense = time.perf_counter() - t
        times = []
        for _ in range(3):
            t = time.perf_counter()
            D = W.float() - W0.float()
            torch.svd_lowrank(D, q=k + 2, niter=2)
            times.append(time.perf_counter() - t)
        Uq, Sq, Vq = torch.svd_lowrank(D, q=k + 2, niter=2)
        Dd = W.double() - W0.double()
        U64, S64, _ = torch.linalg.svd(Dd, full_matrices=False)
        mod = report["modules"][name]
        i = mod["steps"].index(sample_step)
        s_py = mod["sigma"][i][0]
        out[shape] = {"module": name, "dense_s": dense, "lowrank_s": sorted(times)[1],
                      "sigma_err_pyrank": abs(s_py - float(S64[0])) / float(S64[0]),
                      "sigma_err_lowrank": abs(float(Sq[0]) - float(S64[0])) / float(S64[0]),
                      "angle_lowrank": float(torch.arccos(torch.clamp(abs(Uq[:, 0].double() @ U64[:, 0]), max=1.0)))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=6, help="checkpoints after the base")
    ap.add_argument("--every", type=int, default=50, help="training steps between checkpoints")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the model (default: all)")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "pyrank-bench-series"))
    ap.add_argument("--keep", action="store_true", help="keep the generated series for the next run")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    layers = args.layers or cfg["layers"]
    root = os.path.join(args.dir, f"{args.shape}-L{layers}-T{args.steps}")
    threads = torch.get_num_threads()

    t = time.perf_counter()
    made = generate(root, cfg, layers, args.steps, args.every)
    print(f"series {root}: {'generated in %.0f s' % (time.perf_counter() - t) if made else 'reused'}",
          file=sys.stderr)
    files = series_files(root)
    total = sum(os.path.getsize(p) for p in files)
    out = os.path.join(args.dir, "report")

    evict(files)
    floor_cold = read_all(files)
    floor_warm = read_all(files)
    evict(files)
    cold = run_analyze(root, args.k, out, threads)
    warm = run_analyze(root, args.k, out, threads)
    report = json.load(open(os.path.join(out, "report.json")))

    bw = kernel_bandwidth((cfg["mlp"], cfg["hidden"]), args.k)
    def nbytes(m):  # one of the module's tensors (the series is bf16)
        return 2 * math.prod(m["shape"])

    # each pass reads a pair (W_t, W₀)
    passes_bytes = sum(p * 2 * nbytes(m) for m in report["modules"].values() for p in m["passes"])
    bound = passes_bytes / bw
    # what an analysis reads once: every module's base and checkpoint tensors; its GB/s is over
    # those bytes, from disk (cold) or from the page cache (warm)
    data_bytes = sum(nbytes(m) * (1 + len(m["passes"])) for m in report["modules"].values())
    n_obs = sum(len(m["passes"]) for m in report["modules"].values())
    med_passes = sorted(p for m in report["modules"].values() for p in m["passes"])[n_obs // 2]
    conv = sum(m["converged"] for m in report["modules"].values()) / len(report["modules"])
    cold_ok = floor_cold["disk_bytes"] > 0.5 * total
    # a series larger than the free RAM is read from disk again by the "warm" floor
    warm_ok = floor_warm["disk_bytes"] < 0.5 * total
    gb = 1e9

    rows = [
        {"method": "read floor: every file once, cold" + ("" if cold_ok else " (cache not dropped)"),
         **floor_cold},
        {"method": "read floor: every file once, warm" + ("" if warm_ok else " (the cache did not hold it: read from disk)"),
         **floor_warm},
        {"method": f"pyrank analyze --k {args.k}, cold" + ("" if cold_ok else " (cache not dropped)"), "bytes": data_bytes,
         **cold,
         "x_floor": cold["wall_s"] / floor_cold["wall_s"], "x_bound": cold["wall_s"] / bound,
         "passes": med_passes, "accuracy": f"tol 1e-4, {conv:.0%} of modules converged"},
        {"method": f"pyrank analyze --k {args.k}, warm", "bytes": data_bytes, **warm,
         "x_floor": warm["wall_s"] / floor_cold["wall_s"], "x_bound": warm["wall_s"] / bound,
         "passes": med_passes, "accuracy": f"tol 1e-4, {conv:.0%} of modules converged"},
        {"method": f"kernel bound ({n_obs} observations, {bw / gb:.1f} GB/s fused pass)", "wall_s": bound,
         "bytes": passes_bytes},
    ]
    if not args.no_baselines:
        counts = {}
        for m in report["modules"].values():
            counts[tuple(m["shape"])] = counts.get(tuple(m["shape"]), 0) + len(m["passes"])
        bl = baselines(root, report, args.k, args.every * args.steps)
        dense = sum(bl[s]["dense_s"] * c for s, c in counts.items())
        lowr = sum(bl[s]["lowrank_s"] * c for s, c in counts.items())
        e_py = max(b["sigma_err_pyrank"] for b in bl.values())
        e_lr = max(b["sigma_err_lowrank"] for b in bl.values())
        a_lr = max(b["angle_lowrank"] for b in bl.values())
        rows += [
            {"method": "AlphaRL-style: fp32 ΔW + torch.linalg.svd (extrapolated) + cold read floor",
             "wall_s": dense + floor_cold["wall_s"], "bytes": data_bytes, "x_floor": (dense + floor_cold["wall_s"]) / floor_cold["wall_s"],
             "accuracy": "exact (reference)"},
            {"method": f"fp32 ΔW + torch.svd_lowrank(q={args.k + 2}, niter=2) (extrapolated) + cold read floor",
             "wall_s": lowr + floor_cold["wall_s"], "bytes": data_bytes, "x_floor": (lowr + floor_cold["wall_s"]) / floor_cold["wall_s"],
             "accuracy": f"σ₁ rel. err ≤ {e_lr:.1e}, u₁ angle ≤ {a_lr:.1e} rad"},
        ]
        rows[2]["accuracy"] += f"; σ₁ rel. err ≤ {e_py:.1e} (sampled vs fp64 SVD)"
        rows[3]["accuracy"] = rows[2]["accuracy"]
    for r in rows:
        if r.get("wall_s") and r.get("bytes"):
            r["gbps"] = r["bytes"] / r["wall_s"] / gb
        for key in ("bytes", "disk_bytes"):
            if key in r:
                r[key + "_gb"] = r[key] / gb
    cols = [("method", "method", "{}"), ("wall (s)", "wall_s", "{:.1f}"), ("GB/s", "gbps", "{:.2f}"),
            ("disk read (GB)", "disk_bytes_gb", "{:.2f}"),
            ("× read floor (cold)", "x_floor", "{:.2f}"), ("× kernel bound", "x_bound", "{:.2f}"),
            ("peak RSS (MB)", "rss_mb", "{:.0f}"), ("median passes", "passes", "{}"), ("accuracy", "accuracy", "{}")]
    head = (f"## bench_series: `pyrank analyze` on a {args.shape}-shaped series ({layers} layers, base + "
            f"{args.steps} checkpoints, {total / gb:.1f} GB in {len(files)} files, "
            f"{len(report['modules'])} modules)\n\nMachine: {machine()}\n\n")
    if not cold_ok:
        head += ("Cold runs could not drop the page cache here (the disk read column shows what was read): "
                 "their numbers are warm-cache numbers.\n\n")
    emit("bench_series", rows, head + markdown_table(rows, cols) + "\n", not args.no_write)
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
