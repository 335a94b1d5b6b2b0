"""How the files beside this script were made (not run by the tests): verl 0.9.1's own
FSDPCheckpointManager.save_checkpoint, on a tiny Qwen2 (transformers) trained one step under
FSDP2 (fully_shard) and FSDP1 (FullyShardedDataParallel) on 2 ranks, gloo, CPU:

    pip install verl==0.9.1 'transformers<5.11' ray peft datasets omegaconf …  # verl's own deps
    torchrun --nproc-per-node 2 make.py OUT

v2/, v1/: what verl wrote (global_step_1/actor/: the rank files, fsdp_config.json,
huggingface/config.json); ref2/, ref1/: the same weights gathered whole (full state dict).
verl pins transformers < 5.11, which the test environment's 5.24 does not meet, so the files
are kept instead of regenerated on every run.
"""
import json, os, sys
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM
from torch.distributed.fsdp import fully_shard, FullyShardedDataParallel as FSDP1
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from safetensors.torch import save_file
from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

out = sys.argv[1]
dist.init_process_group("gloo"); rank = dist.get_rank()
for version in (2, 1):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=75, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    if version == 2:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = FSDP1(model, device_id=torch.device("cpu"), use_orig_params=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step()
    ckcfg = OmegaConf.create({"save_contents": ["model"], "load_contents": ["model"], "async_save": False})
    mgr = FSDPCheckpointManager(model=model, optimizer=opt, lr_scheduler=None, processing_class=None,
                                checkpoint_config=ckcfg)
    actor = os.path.join(out, f"v{version}", "global_step_1", "actor")
    mgr.save_checkpoint(actor, global_step=1)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=version == 2))
    if rank == 0:
        os.makedirs(os.path.join(out, f"ref{version}"), exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, f"ref{version}", "model.safetensors"))
    dist.barrier()
dist.destroy_process_group()
os._exit(0)
