"""Run under torchrun (2 ranks, gloo, CPU) by test_megatron_checkpoints.py: a Qwen2-shaped
GPTModel (GQA with fused QKV and its bias, SwiGLU with fused gate/up, RMSNorm) built by
megatron-core with tensor parallelism 2, saved by megatron-core's own
``dist_checkpointing.save`` (the torch_dist format, as Megatron-LM and verl's megatron
backend write it):

* <out>/base/: the model as initialized; <out>/run/iter_000000S/ for S = 2, 4, 6, with
  <out>/run/latest_checkpointed_iteration.txt (Megatron-LM's layout); between saves every
  rank changes its own shards of every weight (a rank-2 drift plus noise: what a training
  step's update looks like to the reader);
* <out>/base/config.json, <out>/run/config.json: the model's HF config (verl keeps it in
  actor/huggingface/);
* <out>/ref/S.pt (rank 0): what megatron-core's own modules compute at step S for a fixed
  input: per layer q, k, v (linear_qkv's output split by SelfAttention's own
  get_query_key_value_tensors), the output projection of a fixed input, the SwiGLU halves
  (linear_fc1's output as the MLP splits it), fc2's output, and the norms' weights — the
  truth the reader's HF-named tensors are checked against, independent of its mapping.

No GPU here: megatron-core calls torch.cuda.synchronize / current_device around its writes;
on CPU they are replaced by no-ops (the files it writes do not depend on them).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

L, H, FFN, HEADS, GROUPS, VOCAB = 2, 32, 72, 4, 2, 16
HEAD_DIM = H // HEADS


def main():
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS, num_query_groups=GROUPS,
                            ffn_hidden_size=FFN, use_cpu_initialization=True, gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
                            normalization="RMSNorm", params_dtype=torch.float32, hidden_dropout=0.0,
                            attention_dropout=0.0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=32, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    run = os.path.join(out, "run")
    hf_config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": H,
                 "intermediate_size": FFN, "num_hidden_layers": L, "num_attention_heads": HEADS,
                 "num_key_value_heads": GROUPS, "vocab_size": VOCAB, "tie_word_embeddings": False,
                 "torch_dtype": "float32"}
    if rank == 0:
        os.makedirs(os.path.join(out, "ref"), exist_ok=True)
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "config.json"), "w") as f:
            json.dump(hf_config, f)
    dist.barrier()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 1, H, generator=g)  # [sequence, batch, hidden], the same on both ranks
    z = torch.randn(5, 1, HEADS * HEAD_DIM, generator=g)
    y = torch.randn(5, 1, FFN, generator=g)
    tp = ps.get_tensor_model_parallel_rank()

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    for step in (0, 2, 4, 6):
        if step:
            with torch.no_grad():
                for i, (name, p) in enumerate(sorted(model.named_parameters())):
                    gs = torch.Generator().manual_seed(1000 * step + 10 * i + tp)
                    if p.dim() == 2:
                        u = torch.randn(p.shape[0], 2, generator=gs)
                        v = torch.randn(2, p.shape[1], generator=gs)
                        p += 1e-2 * step * (u @ v) / p.shape[1] + 1e-3 * torch.randn(p.shape, generator=gs)
                    else:
                        p += 1e-3 * torch.randn(p.shape, generator=gs)
        ref = {}
        with torch.no_grad():
            for i, layer in enumerate(model.decoder.layers):
                att, mlp = layer.self_attention, layer.mlp
                q, k, v = att.get_query_key_value_tensors(x)[:3]  # this rank's heads / groups
                ref[f"{i}.q"] = gather(q.reshape(5, -1), 1)
                ref[f"{i}.k"] = gather(k.reshape(5, -1), 1)
                ref[f"{i}.v"] = gather(v.reshape(5, -1), 1)
                # row-parallel: each rank gets its slice of the input, the outputs are summed
                ref[f"{i}.o"] = att.linear_proj(z.chunk(2, dim=-1)[tp])[0].reshape(5, -1)
                fc1 = mlp.linear_fc1(x)[0]  # [gate_r | up_r] of this rank, as MLP.forward's glu splits it
                gate, up = torch.chunk(fc1, 2, dim=-1)
                ref[f"{i}.gate"] = gather(gate.reshape(5, -1), 1)
                ref[f"{i}.up"] = gather(up.reshape(5, -1), 1)
                ref[f"{i}.down"] = mlp.linear_fc2(y.chunk(2, dim=-1)[tp])[0].reshape(5, -1)
                ref[f"{i}.input_norm"] = layer.input_layernorm.weight.detach().clone()
                ref[f"{i}.post_norm"] = layer.pre_mlp_layernorm.weight.detach().clone()
            ref["x"], ref["z"], ref["y"] = x.reshape(5, -1), z.reshape(5, -1), y.reshape(5, -1)
        d = os.path.join(run, f"iter_{step:07d}") if step else os.path.join(out, "base")
        if rank == 0:
            os.makedirs(d, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), d)
        dist.barrier()
        if rank == 0:
            torch.save(ref, os.path.join(out, "ref", f"{step}.pt"))
            if step:
                with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write(str(step))
            else:  # (written after the save: megatron-core refuses to save into a non-empty directory)
                with open(os.path.join(d, "config.json"), "w") as f:
                    json.dump(hf_config, f)
    dist.barrier()
    dist.destroy_process_group()
    import multiprocessing

    for child in multiprocessing.active_children():  # megatron-core's writer's Manager process: it
        child.terminate()  # would outlive os._exit below and keep the launcher's output pipes open
        child.join()
    os._exit(0)  # as in fsdp_save_script.py


if __name__ == "__main__":  # megatron-core's async writer starts processes with spawn
    main()
