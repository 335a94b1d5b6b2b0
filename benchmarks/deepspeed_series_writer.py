"""Run under torchrun (2 ranks, gloo, DS_ACCELERATOR=cpu) by bench_formats.py --deepspeed:
bench_series' checkpoint series saved by DeepSpeed's own ``engine.save_checkpoint`` (ZeRO
stage 2 or 3, bf16, Adam), as OpenRLHF saves its actor: ``ROOT/ds/_actor/global_stepS/``.

Each step's weights go into the engine as training would leave them: the fp32 masters set
with DeepSpeed's ``safe_set_full_fp32_param`` and, for stage 2 (whose model-state file holds
the bf16 module), the module's weights copied. The values are bf16 numbers, so masters and
module agree exactly.

    torchrun --nproc-per-node 2 deepspeed_series_writer.py ROOT SHAPE LAYERS STEPS STAGE
"""
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_set_full_fp32_param

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_series import SHAPES, model_tensors, tensor_at  # noqa: E402


def module_with(names_shapes):
    """An nn.Module whose parameters have exactly these dotted names and shapes (bf16)."""
    root = torch.nn.Module()
    for name, shape in names_shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16)))
    return root


def main():
    root, shape, layers, steps, stage = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    deepspeed.init_distributed(dist_backend="gloo")
    names = [(n, s, p) for n, s, p in model_tensors(SHAPES[shape], layers) if "embed" not in n and "lm_head" not in n]
    model = module_with([(n, s) for n, s, _ in names])
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-5, "torch_adam": True}}}
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    params = dict(engine.module.named_parameters())
    for step in range(1, steps + 1):
        for n, s, p in names:
            value = tensor_at(n, s, p, step, steps)
            safe_set_full_fp32_param(params[n], value.float())
            if stage < 3:
                with torch.no_grad():
                    params[n].copy_(value)
        engine.save_checkpoint(os.path.join(root, "ds", "_actor"), tag=f"global_step{step}")
        dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's worker threads can abort a normal interpreter teardown


if __name__ == "__main__":
    main()
