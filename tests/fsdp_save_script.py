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
  reference the readers are compared with; <out>/base: the weights before training;
* <out>/verl1/global_step_S/actor/…: the same for a model wrapped with FSDP1
  (FullyShardedDataParallel, use_orig_params, per-layer wrapping) whose rows do not divide by
  the world size, saved as verl saves FSDP1: torch.save of each rank's SHARDED_STATE_DICT
  (ShardedTensors), ``"FSDP_version": 1``; its gathered twin in <out>/hf1, its base <out>/base1.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp import StateDictType, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from pyrank.demo.model import DemoConfig, DemoLM

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()


def save_hf(model, path, cpu_offload=True):
    # (FSDP1 on CPU crashes in the offload's copy: its tensors are on the CPU already)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(model.config.to_hf(), f)


def save_verl(model, actor, version, step, root):
    os.makedirs(actor, exist_ok=True)
    if version == 1:
        with FSDP1.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            sd = model.state_dict()
    else:
        sd = model.state_dict()
    torch.save(sd, os.path.join(actor, f"model_world_size_2_rank_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(actor, "huggingface"), exist_ok=True)
        with open(os.path.join(actor, "huggingface", "config.json"), "w") as f:
            json.dump(model.config.to_hf(), f)
        with open(os.path.join(actor, "fsdp_config.json"), "w") as f:
            json.dump({"FSDP_version": version, "world_size": 2}, f, indent=4)
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(step))


def train(version):
    vocab = 16 if version == 2 else 17
    cfg = DemoConfig(vocab_size=vocab, hidden_size=32, intermediate_size=72 if version == 2 else 75,
                     num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = DemoLM(cfg)
    if version == 2:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = FSDP1(model, device_id=torch.device("cpu"), use_orig_params=True,
                      auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}))
    sfx = "" if version == 2 else "1"
    save_hf(model, os.path.join(out, "base" + sfx), version == 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(1, 7):
        ids = torch.randint(0, vocab, (4, 10), generator=g)
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 0:
            ck = f"checkpoint-{step}"
            if version == 2:
                dcp.save({"model": model.state_dict()},
                         checkpoint_id=os.path.join(out, "dcp", ck, "pytorch_model_fsdp_0"))
            save_hf(model, os.path.join(out, "hf" + sfx, ck), version == 2)
            root = os.path.join(out, "verl" + sfx)
            save_verl(model, os.path.join(root, f"global_step_{step}", "actor"), version, step, root)


train(2)
train(1)
dist.barrier()
dist.destroy_process_group()
# Every file is written and closed (the barrier follows the last save). Leave without
# running C++ static destructors: with gloo on CPU, a worker thread still joinable at
# interpreter teardown aborts the process ("terminate called without an active
# exception") in about one run of three, after the work is done.
os._exit(0)
