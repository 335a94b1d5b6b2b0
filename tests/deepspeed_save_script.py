"""Run under torchrun (2 ranks, gloo, CPU, DS_ACCELERATOR=cpu) by test_deepspeed_checkpoints.py:
a bf16 model trained a few steps under DeepSpeed ZeRO stage 1, 2 and 3 and saved by
DeepSpeed's own ``engine.save_checkpoint`` — not an imitation:

* <out>/z1/_actor/global_stepS/, <out>/z3/_actor/global_stepS/: the layout OpenRLHF writes
  (``save_checkpoint(ckpt/_actor, tag=f"global_step{S}")``, with ``latest``);
* <out>/z2/checkpoint-S/global_stepS/: the layout HF Trainer/TRL write with DeepSpeed
  (``save_checkpoint(checkpoint-S)``, DeepSpeed's default tag);
* <out>/zZ_hf/checkpoint-S/model.safetensors: the bf16 module's weights at that step
  (ZeRO-3's gathered with ``deepspeed.zero.GatheredParameters``), the reference the reader is
  compared with; <out>/base: the bf16 weights before training.
"""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pyrank.demo.model import DemoConfig, DemoLM

out = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
cfg = DemoConfig(vocab_size=16, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4)


def save_hf(sd, path, config):
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)


for stage in (1, 2, 3):
    torch.manual_seed(0)
    model = DemoLM(cfg).to(torch.bfloat16)
    if stage == 1:
        save_hf(model.state_dict(), os.path.join(out, "base"), model.config.to_hf())
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
                 "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
    # two parameter groups, as OpenRLHF and HF Trainer make them (no weight decay on norms):
    # ZeRO-3 then keeps one flat fp32 partition per group and rank
    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, model_parameters=groups)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(1, 7):
        ids = torch.randint(0, 16, (4, 10), generator=g)
        logits = engine(ids[:, :-1]).float()
        engine.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1)))
        engine.step()
        if step % 2:
            continue
        if stage == 2:
            engine.save_checkpoint(os.path.join(out, "z2", f"checkpoint-{step}"))
        else:
            engine.save_checkpoint(os.path.join(out, f"z{stage}", "_actor"), tag=f"global_step{step}")
        hf = os.path.join(out, f"z{stage}_hf", f"checkpoint-{step}")
        if stage == 3:
            params = dict(engine.module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values())):
                save_hf(params, hf, model.config.to_hf())
        else:
            save_hf(engine.module.state_dict(), hf, model.config.to_hf())
        dist.barrier()
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # as in fsdp_save_script.py: gloo's worker threads can abort a normal teardown
