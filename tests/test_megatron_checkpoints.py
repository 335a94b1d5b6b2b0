"""Megatron-core dist_checkpointing (torch_dist) checkpoints read under HF names: fixtures
written by megatron-core's own save (a Qwen2-shaped GPTModel, tensor parallelism 2, gloo/CPU),
every mapped tensor checked against what megatron-core's own modules computed with the
weights it saved (so the fused-QKV and gate/up splits are checked, not assumed)."""
import json
import os
import shutil

import pytest
import torch
from torch.testing import assert_close

from helpers import analyze_and_extrapolate, assert_same_weights, run_writer
from pyrank.io import PyrankIOError, find_checkpoints, open_weights, write_hf_dir

pytest.importorskip("megatron.core")  # the writer; the reader never imports it

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
LAYERS = 2


@pytest.fixture(scope="module")
def mg_run(tmp_path_factory):
    return run_writer("megatron_save_script.py", tmp_path_factory.mktemp("megatron"), ENV)


def qwen2_names(layers):
    per = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
           "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight"] + \
        [f"self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")]
    return {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}" for i in range(layers) for n in per}


def test_megatron_checkpoints_hold_what_megatron_computes(mg_run):
    found = find_checkpoints(mg_run / "run")  # Megatron-LM's iter_NNNNNNN
    assert [s for s, _ in found] == [2, 4, 6]
    for step, d in [(0, str(mg_run / "base"))] + found:
        w = open_weights(d)
        assert w.layout.startswith("Megatron dist_ckpt (torch_dist") and "4 heads, 2 key-value groups" in w.layout
        assert set(w) == qwen2_names(LAYERS)
        ref = torch.load(mg_run / "ref" / f"{step}.pt")
        x, z, y = ref["x"], ref["z"], ref["y"]
        for i in range(LAYERS):
            P = f"model.layers.{i}."
            for p in "qkv":  # GQA: 4 query heads of 8 in 2 groups, each group [q q k v] in linear_qkv
                W, b = w[P + f"self_attn.{p}_proj.weight"], w[P + f"self_attn.{p}_proj.bias"]
                assert w.shape_dtype(P + f"self_attn.{p}_proj.weight") == (tuple(W.shape), "torch.float32")
                assert_close(x @ W.T + b, ref[f"{i}.{p}"], rtol=1e-5, atol=1e-6)
            assert_close(z @ w[P + "self_attn.o_proj.weight"].T, ref[f"{i}.o"], rtol=1e-5, atol=1e-6)
            assert_close(x @ w[P + "mlp.gate_proj.weight"].T, ref[f"{i}.gate"], rtol=1e-5, atol=1e-6)
            assert_close(x @ w[P + "mlp.up_proj.weight"].T, ref[f"{i}.up"], rtol=1e-5, atol=1e-6)
            assert_close(y @ w[P + "mlp.down_proj.weight"].T, ref[f"{i}.down"], rtol=1e-5, atol=1e-6)
            assert torch.equal(w[P + "input_layernorm.weight"], ref[f"{i}.input_norm"])
            assert torch.equal(w[P + "post_attention_layernorm.weight"], ref[f"{i}.post_norm"])
            assert tuple(w[P + "mlp.gate_proj.weight"].shape) == (72, 32)


def test_analyze_a_megatron_series_as_its_hf_copy(mg_run, tmp_path):
    """The pipeline reads the layer-stacked, TP-sharded tensors one layer at a time and gets
    what it gets from the same tensors written as HF safetensors."""
    hf = tmp_path / "hf"
    for name, src in [("base", mg_run / "base")] + [(f"checkpoint-{s}", d) for s, d in
                                                   find_checkpoints(mg_run / "run")]:
        w = open_weights(str(src))
        write_hf_dir(str(hf / name), {n: w[n] for n in w}, base_dir=str(mg_run / "run"))  # (its config.json)
    a, _, xa = analyze_and_extrapolate(mg_run / "base", mg_run / "run", tmp_path / "mg", ENV)
    b, _, xb = analyze_and_extrapolate(hf / "base", hf, tmp_path / "from-hf", ENV)
    assert len(a) == 7 * LAYERS and a == b
    assert set(xa) == qwen2_names(LAYERS)  # the predicted models
    assert_same_weights(xa, xb)


def test_a_megatron_checkpoint_without_its_config_or_a_shard_is_named(mg_run, tmp_path):
    d = tmp_path / "iter_0000002"
    shutil.copytree(mg_run / "run" / "iter_0000002", d)
    with pytest.raises(PyrankIOError, match="needs the model's HF config.json"):
        open_weights(str(d))
    shutil.copy(mg_run / "run" / "config.json", d / "config.json")
    assert len(open_weights(str(d))) == len(qwen2_names(LAYERS))
    (d / "__1_0.distcp").unlink()
    with pytest.raises(PyrankIOError, match=r"__1_0\.distcp: chunk file named by .* is missing"):
        open_weights(str(d))


def test_a_config_that_does_not_fit_the_fused_qkv_is_refused(mg_run, tmp_path):
    d = tmp_path / "iter_0000002"
    shutil.copytree(mg_run / "run" / "iter_0000002", d)
    cfg = json.load(open(mg_run / "run" / "config.json"))
    (d / "config.json").write_text(json.dumps(dict(cfg, num_key_value_heads=4)))  # MHA: 4·3·8 rows ≠ 64
    w = open_weights(str(d))
    with pytest.raises(PyrankIOError, match=r"linear_qkv.weight' has 64 rows, not the 4·\(4/4\+2\)·8"):
        w["model.layers.0.self_attn.q_proj.weight"]
