"""Run under torchrun by test_distributed.py: TrainingTracker on DDP-, FSDP2- and FSDP-wrapped
models (gloo, CPU). Writes <out>/rank<r>.json with what the test checks."""
import json
import os
import sys

import torch
import torch.distributed as dist

from pyrank import Rank1Tracker
from pyrank.demo.model import DemoConfig, DemoLM
from pyrank.integrations import TrainingTracker

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = DemoConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def train(model, steps, tt, snaps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank, as in data parallelism
    for s in range(1, steps + 1):
        ids = torch.randint(0, 16, (4, 10), generator=g)
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 16), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        tt.step(model, s)
        snaps[s] = full_copy(model)


def full_copy(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.clone() for k, v in sd.items()} if rank == 0 else None


def offline_equal(tt, base, snaps):
    off = Rank1Tracker(k=tt.tracker.k)
    for s in sorted(snaps):
        off.observe(s, snaps[s], base, modules=tt.modules)
    return all(torch.equal(tt.tracker.history(n)["sigma"], off.history(n)["sigma"]) for n in tt.modules)


result = {}
# DDP: every rank holds the weights; rank 0 analyzes; apply_prediction keeps replicas identical.
torch.manual_seed(0)
ddp = torch.nn.parallel.DistributedDataParallel(DemoLM(cfg))
tt = TrainingTracker(k=2)  # k ≠ the prediction's rank 1: apply_prediction must cope
tt.snapshot_base(ddp)
base = full_copy(ddp.module)
snaps = {}
train(ddp, 4, tt, snaps)
result["ddp_is_main"] = tt.is_main
if rank == 0:
    result["ddp_modules"] = len(tt.modules)
    result["ddp_offline_equal"] = offline_equal(tt, base, snaps)
    pred = tt.tracker.extrapolate(to_step=8, base="last")
else:
    pred = None
tt.apply_prediction(ddp, pred)
flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
result["ddp_replicas_identical_after_merge"] = all(torch.equal(gathered[0], x) for x in gathered)
result["ddp_merge_changed_weights"] = not torch.equal(flat, torch.cat([v.reshape(-1) for v in snaps[4].values()])) \
    if rank == 0 else None

# FSDP2: parameters are DTensor shards; full weights are gathered to rank 0 for the analysis.
try:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = DemoLM(cfg)
    for blk in model.model.layers:
        fully_shard(blk)
    fully_shard(model)
    tt = TrainingTracker()
    tt.snapshot_base(model)
    base = full_copy(model)
    snaps = {}
    train(model, 3, tt, snaps)
    result["fsdp_is_main"] = tt.is_main
    if rank == 0:
        result["fsdp_offline_equal"] = offline_equal(tt, base, snaps)
        result["fsdp_steps"] = tt.tracker.steps(tt.modules[0])
    try:
        tt.apply_prediction(model, None)
    except NotImplementedError as exc:
        result["fsdp_apply_refused"] = "FSDP" in str(exc)
except Exception as exc:  # reported to the test, which fails on it
    result["fsdp_error"] = f"{type(exc).__name__}: {exc}"

# FSDP (v1) with the original parameters exposed.
try:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = FSDP(DemoLM(cfg), device_id=torch.device("cpu"), use_orig_params=True)
    tt = TrainingTracker()
    tt.snapshot_base(model)
    base = full_copy(model)
    snaps = {}
    train(model, 3, tt, snaps)
    if rank == 0:
        result["fsdp1_offline_equal"] = offline_equal(tt, base, snaps)
        result["fsdp1_modules"] = len(tt.modules)
except Exception as exc:
    result["fsdp1_error"] = f"{type(exc).__name__}: {exc}"

with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
