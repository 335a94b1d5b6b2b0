"""Memory of `pyrank analyze` on a model much larger than pyrank's bound, with /usr/bin/time -v.

Builds (in a temporary directory) a Llama-shaped bf16 model — L layers of q/k/v/o (H×H) and
gate/up/down (F×H) — and a run of C checkpoints with a rank-1-plus-noise update, then runs

    /usr/bin/time -v pyrank env                                 (the interpreter + torch alone)
    /usr/bin/time -v pyrank analyze BASE --run-dir RUN --out …  (the whole series)

and reports both maximum resident sets beside the size of one checkpoint and of the largest
tensor. pyrank reads one tensor at a time, so analyze's RSS should exceed the baseline by a
small multiple of the largest tensor (plus the tracker's vectors), not by a model.

It also times reading a tensor from a warm page cache the way the series loop does (three
held at a time) into fresh buffers and into a BufferPool's, for the model's largest tensor
and for one of --read-mb (default: a 7B model's 18944×3584 MLP weight, 136 MB): above
glibc's 32 MB mmap threshold a fresh buffer is new pages, faulted in and zeroed per read.

    python benchmarks/bench_io.py                 # 8 layers of 2048/5632: 0.8 GB a checkpoint
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table  # noqa: E402


def build(root, layers, H, F, ckpts):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (H, H)
        for n in ("gate_proj", "up_proj"):
            shapes[p + f"mlp.{n}.weight"] = (F, H)
        shapes[p + "mlp.down_proj.weight"] = (H, F)
        shapes[p + "input_layernorm.weight"] = (H,)
    base_dir = os.path.join(root, "base")
    os.makedirs(base_dir)
    files = {}
    for name, shp in shapes.items():  # one shard per layer: never the whole model in memory
        files.setdefault(name.split(".")[2], []).append(name)
    for layer, names in files.items():
        part = {n: (torch.randn(*shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(part, os.path.join(base_dir, f"layer{layer}.safetensors"))
    import json

    wm = {n: f"layer{n.split('.')[2]}.safetensors" for n in shapes}
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(base_dir, "model.safetensors.index.json"), "w"))
    from safetensors import safe_open

    for c in range(1, ckpts + 1):
        d = os.path.join(root, "run", f"checkpoint-{c * 100}")
        os.makedirs(d)
        for layer in files:
            with safe_open(os.path.join(base_dir, f"layer{layer}.safetensors"), "pt") as f:
                part = {}
                for n in f.keys():
                    W0 = f.get_tensor(n)
                    if W0.dim() == 2:
                        a = torch.randn(W0.shape[0], 1, generator=g)
                        b = torch.randn(1, W0.shape[1], generator=g)
                        W = W0.float() + c * 2e-5 * (a @ b) + 1e-5 * torch.randn(W0.shape, generator=g)
                        part[n] = W.to(torch.bfloat16)
                    else:
                        part[n] = W0
            save_file(part, os.path.join(d, f"layer{layer}.safetensors"))
        json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    return shapes


def read_gbps(path, name, pooled, reps=8):
    """GB/s of reading tensor ``name`` ``reps`` times, three held at once (as the series loop)."""
    from pyrank.io.readers import BufferPool, open_weights, read_tensor

    w = open_weights(path)
    pool = BufferPool() if pooled else None
    held = [read_tensor(w, name, pool)]  # (warms the page cache and the pool)
    t = time.perf_counter()
    for _ in range(reps):
        held = held[-2:] + [read_tensor(w, name, pool)]
    return reps * w.nbytes(name) / (time.perf_counter() - t) / 1e9


def read_rows(tensors):
    """[(label, path, name)] → rows of median GB/s, fresh vs pooled, alternating 5 times."""
    rows = []
    for label, path, name in tensors:
        got = {False: [], True: []}
        for _ in range(5):
            for pooled in (False, True):
                got[pooled].append(read_gbps(path, name, pooled))
        fresh, pooled = (statistics.median(got[b]) for b in (False, True))
        rows.append(dict(what=f"read {label}, page cache warm: fresh buffers (GB/s)", mb=fresh))
        rows.append(dict(what=f"read {label}, page cache warm: pooled buffers (GB/s)", mb=pooled))
    return rows


def max_rss_mb(cmd):
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", p.stderr).group(1)
    return kb / 1024, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--read-mb", type=float, default=18944 * 3584 * 2 / 2**20,
                    help="size of the large tensor of the read timing (bf16)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as root:
        print("building the model and its run ...", file=sys.stderr, flush=True)
        shapes = build(root, args.layers, args.hidden, args.mlp, args.checkpoints)
        numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
        model_mb = sum(numel.values()) * 2 / 2**20
        largest_mb = max(numel.values()) * 2 / 2**20
        pyrank = [sys.executable, "-m", "pyrank"]
        env_rss, _ = max_rss_mb(pyrank + ["env"])
        an_rss, wall = max_rss_mb(pyrank + ["analyze", os.path.join(root, "base"), "--run-dir",
                                            os.path.join(root, "run"), "--out", os.path.join(root, "report")])
        from safetensors.torch import save_file

        big = os.path.join(root, "big.safetensors")
        cols = 3584
        rows_big = max(1, int(args.read_mb * 2**20 / (2 * cols)))
        save_file({"w": torch.zeros(rows_big, cols, dtype=torch.bfloat16)}, big)
        largest = max(numel, key=numel.get)
        layer_file = os.path.join(root, "base", f"layer{largest.split('.')[2]}.safetensors")
        reads = read_rows([(f"the largest tensor ({largest_mb:.0f} MB)", layer_file, largest),
                           (f"a {rows_big}×{cols} tensor ({rows_big * cols * 2 / 2**20:.0f} MB)", big, "w")])
    rows = [
        dict(what="one checkpoint (bf16)", mb=model_mb),
        dict(what="largest tensor (bf16)", mb=largest_mb),
        dict(what="max RSS: pyrank env (python + torch, no work)", mb=env_rss),
        dict(what=f"max RSS: pyrank analyze, base + {args.checkpoints} checkpoints ({wall} wall)", mb=an_rss),
        dict(what="analyze − env", mb=an_rss - env_rss),
        dict(what="(analyze − env) ÷ largest tensor", mb=(an_rss - env_rss) / largest_mb),
    ] + reads
    text = (f"Machine: {machine()}\n\nModel: {args.layers} layers, hidden {args.hidden}, MLP {args.mlp}, "
            f"{len([s for s in shapes.values() if len(s) == 2])} modules; /usr/bin/time -v.\n\n"
            f"{markdown_table(rows, [('', 'what', '{}'), ('MB, × or GB/s', 'mb', '{:.1f}')])}\n")
    emit("bench_io", rows, text, not args.no_write)


if __name__ == "__main__":
    main()
