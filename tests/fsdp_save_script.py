"""Run under torchrun (2 ranks, gloo, CPU) by test_framework_checkpoints.py: an FSDP2 model
(fully_shard) trained a few steps and saved the way training frameworks save it — by
torch's own writers, not imitations:

* <out>/dcp/checkpoint-S/pytorch_model_fsdp_0/: torch.distributed.checkpoint.save of
  {"model": model.state_dict()} (the sharded DTensor state dict), as accelerate's
  save_fsdp_model does for HF Trainer FSDP runs with SHARDED_STATE_DICT;
* <out>/verl/global_step_S/actor/model_world_size_2_rank_R.pt: torch.save of each rank's
  sharded state dict (DTensors), with fsdp_config.json, huggingface/config.json and the
  run's latest_checkpointed_iteration.txt — the files and names verl's
  FSDPCheckpointManager.save_checkpoint writes (verl itself is not installed here: its save
  is this torch.save of model.state_dict() under FSDP2);
* <out>/hf/checkpoint-S/model.safetensors: the same weights gathered whole (fp32), the
  reference the readers are compared with; <out>/base: the weights before training.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from pyrank.demo.model import DemoConfig, DemoLM

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = DemoConfig(vocab_size=16, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4)
torch.manual_seed(0)
model = DemoLM(cfg)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)


def save_hf(path):
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(model.config.to_hf(), f)


save_hf(os.path.join(out, "base"))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(100 + rank)
for step in range(1, 7):
    ids = torch.randint(0, 16, (4, 10), generator=g)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 16), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 2 == 0:
        ck = f"checkpoint-{step}"
        dcp.save({"model": model.state_dict()}, checkpoint_id=os.path.join(out, "dcp", ck, "pytorch_model_fsdp_0"))
        save_hf(os.path.join(out, "hf", ck))
        actor = os.path.join(out, "verl", f"global_step_{step}", "actor")
        os.makedirs(actor, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(actor, f"model_world_size_2_rank_{rank}.pt"))
        dist.barrier()
        if rank == 0:
            os.makedirs(os.path.join(actor, "huggingface"), exist_ok=True)
            with open(os.path.join(actor, "huggingface", "config.json"), "w") as f:
                json.dump(model.config.to_hf(), f)
            with open(os.path.join(actor, "fsdp_config.json"), "w") as f:
                json.dump({"FSDP_version": 2, "world_size": 2}, f, indent=4)
            with open(os.path.join(out, "verl", "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(step))
dist.barrier()
dist.destroy_process_group()
# Every file is written and closed (the barrier follows the last save). Leave without
# running C++ static destructors: with gloo on CPU, a worker thread still joinable at
# interpreter teardown aborts the process ("terminate called without an active
# exception") in about one run of three, after the work is done.
os._exit(0)
