"""`pyrank analyze` on a sharded-checkpoint series, read in place, against what a user does
today: merge every checkpoint to one file first, then analyze.

The series: a base in HF format and --steps checkpoints as torch Distributed Checkpoints
(written by torch.distributed.checkpoint.save — the writer HF Trainer/accelerate FSDP runs
use), of --layers layers with Qwen2.5-1.5B's projection shapes (bench_series' RL-like
updates). Rows, all measured in this run:

  pyrank analyze (DCP, in place)   pyrank reads each tensor's chunks from the .distcp files
  merge + analyze                  torch's own converter, dcp_to_torch_save, per checkpoint
                                   (merger time counted), then pyrank analyze on the merged
                                   .pt files
  pyrank analyze (HF safetensors)  the same weights in HF format, for reference

With --deepspeed STAGE, also the series saved by DeepSpeed's own save_checkpoint (ZeRO
stage 2 or 3, as OpenRLHF saves its actor; deepspeed_series_writer.py under torchrun):

  pyrank analyze (DeepSpeed, in place)   stage 2: the bf16 module from the model-state file;
                                         stage 3: the fp32 master partitions, rounded to bf16
  zero_to_fp32 + analyze                 DeepSpeed's zero_to_fp32.py per checkpoint (merger
                                         time counted, with writing a float32 copy of the base,
                                         which analyzing its float32 output needs), then
                                         pyrank analyze on the merged float32 files

    python benchmarks/bench_formats.py                    # ~3 min on 2 cores
    python benchmarks/bench_formats.py --deepspeed 2      # + ~3 min, 8 GB of disk
    python benchmarks/bench_formats.py --layers 1 --steps 2 --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_series import SHAPES, model_tensors, tensor_at  # noqa: E402
from common import emit, machine, markdown_table  # noqa: E402


def write_series(root, cfg, layers, steps):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    names = [(n, s, p) for n, s, p in model_tensors(cfg, layers) if "embed" not in n and "lm_head" not in n]
    for step in range(steps + 1):
        sd = {n: tensor_at(n, s, p, step, steps) for n, s, p in names}
        if step == 0:
            os.makedirs(os.path.join(root, "base"))
            save_file(sd, os.path.join(root, "base", "model.safetensors"))
            continue
        os.makedirs(os.path.join(root, "hf", f"checkpoint-{step}"))
        save_file(sd, os.path.join(root, "hf", f"checkpoint-{step}", "model.safetensors"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save({"model": sd}, checkpoint_id=os.path.join(root, "dcp", f"checkpoint-{step}",
                                                             "pytorch_model_fsdp_0"), no_dist=True)


def analyze(base, ckpts, out):
    steps = ",".join(str(i + 1) for i in range(len(ckpts)))
    cmd = [sys.executable, "-m", "pyrank", "analyze", base, *ckpts, "--steps", steps, "--out", out, "--force",
           "--quiet"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"pyrank analyze failed: {p.stderr}")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--deepspeed", type=int, choices=(2, 3), default=None, metavar="STAGE",
                    help="also a DeepSpeed ZeRO-STAGE series (needs deepspeed)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    root = tempfile.mkdtemp(prefix="pyrank-bench-formats-")
    try:
        write_series(root, cfg, args.layers, args.steps)
        os.sync()  # the written series' dirty pages flushed now, not during the first timed run
        base = os.path.join(root, "base")
        steps = range(1, args.steps + 1)
        dcp_dirs = [os.path.join(root, "dcp", f"checkpoint-{s}") for s in steps]
        hf_dirs = [os.path.join(root, "hf", f"checkpoint-{s}") for s in steps]
        rows = []
        t_in_place = analyze(base, dcp_dirs, os.path.join(root, "r1"))
        rows.append({"method": "pyrank analyze, DCP read in place", "wall_s": t_in_place})

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        t = time.perf_counter()
        merged = []
        for s, d in zip(steps, dcp_dirs):
            out = os.path.join(root, "merged", f"checkpoint-{s}", "model.pt")
            os.makedirs(os.path.dirname(out))
            dcp_to_torch_save(os.path.join(d, "pytorch_model_fsdp_0"), out)  # {"model": {...}}
            merged.append(out)
        t_merge = time.perf_counter() - t
        t_after = analyze(base, merged, os.path.join(root, "r2"))
        rows.append({"method": "merge (torch dcp_to_torch_save) + pyrank analyze", "wall_s": t_merge + t_after,
                     "merge_s": t_merge, "x": (t_merge + t_after) / t_in_place})
        t_hf = analyze(base, hf_dirs, os.path.join(root, "r3"))
        rows.append({"method": "pyrank analyze, the same weights as HF safetensors", "wall_s": t_hf,
                     "x": t_hf / t_in_place})
        a, b, c = (json.load(open(os.path.join(root, r, "report.json"))) for r in ("r1", "r2", "r3"))
        same = a["modules"] == b["modules"] == c["modules"]
        size = sum(os.path.getsize(os.path.join(dp, f)) for d in dcp_dirs for dp, _, fs in os.walk(d) for f in fs)
        ds_note = ""
        if args.deepspeed:
            ds_rows, ds_note = deepspeed_rows(root, args, base, c)
            rows += ds_rows
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cols = [("method", "method", "{}"), ("wall (s)", "wall_s", "{:.1f}"), ("of which merging (s)", "merge_s", "{:.1f}"),
            ("× in-place time", "x", "{:.2f}")]
    also = f"; also saved by DeepSpeed ZeRO-{args.deepspeed}" if args.deepspeed else ""
    head = (f"## bench_formats: a sharded checkpoint series ({args.layers} layers of {args.shape} projections, "
            f"{args.steps} checkpoints, {size / 1e9:.2f} GB of .distcp{also})\n\nMachine: {machine()}\n\n"
            f"Reports identical across the three: {same}.{ds_note}\n\n")
    emit("bench_formats", rows, head + markdown_table(rows, cols) + "\n", not args.no_write)
    if not same:
        raise SystemExit("the three reports differ")


def deepspeed_rows(root, args, base, hf_report):
    """The DeepSpeed rows (see the module doc) and a sentence comparing their reports with
    the HF one."""
    from safetensors.torch import load_file, save_file

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        os.path.join(here, "deepspeed_series_writer.py"), root, args.shape, str(args.layers),
                        str(args.steps), str(args.deepspeed)], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"the DeepSpeed writer failed: {p.stderr[-3000:]}")
    os.sync()
    actor = os.path.join(root, "ds", "_actor")
    tags = [os.path.join(actor, f"global_step{s}") for s in range(1, args.steps + 1)]
    stage = args.deepspeed
    t_in = analyze(base, tags, os.path.join(root, "r4"))
    rows = [{"method": f"pyrank analyze, DeepSpeed ZeRO-{stage} read in place", "wall_s": t_in}]
    t = time.perf_counter()
    merged = []
    for s in range(1, args.steps + 1):
        out = os.path.join(root, "ds-merged", f"checkpoint-{s}")
        q = subprocess.run([sys.executable, os.path.join(actor, "zero_to_fp32.py"), actor, out, "-t",
                            f"global_step{s}", "--safe_serialization"], capture_output=True, text=True, env=env)
        if q.returncode:
            raise SystemExit(f"zero_to_fp32 failed: {q.stderr[-3000:]}")
        merged.append(out)
    base32 = os.path.join(root, "base-fp32")
    os.makedirs(base32)
    save_file({n: v.float() for n, v in load_file(os.path.join(base, "model.safetensors")).items()},
              os.path.join(base32, "model.safetensors"))
    t_merge = time.perf_counter() - t
    t_after = analyze(base32, merged, os.path.join(root, "r5"))
    rows.append({"method": "merge (DeepSpeed zero_to_fp32.py, float32) + pyrank analyze", "wall_s": t_merge + t_after,
                 "merge_s": t_merge, "x": (t_merge + t_after) / t_in})
    d, e = (json.load(open(os.path.join(root, r, "report.json"))) for r in ("r4", "r5"))
    same_in = d["modules"] == hf_report["modules"]
    worst = max(abs(x[0] - y[0]) / y[0] for name, mod in hf_report["modules"].items()
                for x, y in zip(e["modules"][name]["sigma"], mod["sigma"]) if y[0] > 0)
    note = (f" The DeepSpeed in-place report is identical to the HF one: {same_in}; the merged float32 "
            f"series' σ₁ differ from it by at most {worst:.1e} (relative).")
    return rows, note


if __name__ == "__main__":
    main()
