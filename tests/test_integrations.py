"""pyrank.integrations: the plain tracker in a hand-written loop, the transformers callback
in a tiny Trainer run (DDP and FSDP2 under torchrun: test_distributed.py)."""
import subprocess
import sys

import pytest
import torch

import pyrank
from pyrank.demo.model import DemoConfig, DemoLM
from pyrank.integrations import TrainingTracker, full_weights, unwrap_model

CFG = DemoConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _train(model, steps, on_step, seed=0, lr=1e-2):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for s in range(1, steps + 1):
        ids = torch.randint(0, CFG.vocab_size, (8, 12), generator=g)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        on_step(s)


def test_training_tracker_equals_offline_analysis():
    torch.manual_seed(0)
    model = DemoLM(CFG)
    tt = TrainingTracker(every_n_steps=2)
    tt.snapshot_base(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    snaps = {}

    def on_step(s):
        tt.step(model, s)
        snaps[s] = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, 6, on_step)
    assert tt.modules == pyrank.io.select_modules(list(base))
    assert len(tt.modules) == 14 and all(tt.observed(s) == (s % 2 == 0) for s in range(1, 7))
    offline = pyrank.Rank1Tracker()
    for s in (2, 4, 6):
        offline.observe(s, snaps[s], base, modules=tt.modules)
    for n in tt.modules:
        a, b = tt.tracker.history(n), offline.history(n)
        assert a["steps"] == [2.0, 4.0, 6.0]
        for key in ("sigma", "u", "v", "fro"):
            assert torch.equal(a[key], b[key]), (n, key)
    # the base is a copy: training did not move it
    assert all(torch.equal(tt.base[n], base[n]) for n in tt.modules)


def test_training_tracker_options_and_errors():
    model = DemoLM(CFG)
    with pytest.raises(ValueError, match="every_n_steps"):
        TrainingTracker(every_n_steps=0)
    with pytest.raises(ValueError, match="base_device"):
        TrainingTracker(base_device="gpu")
    tt = TrainingTracker(include=[r"lm_head"], exclude=[r"self_attn"])
    assert tt.step(model, 0) is None  # the first call takes the snapshot
    assert tt.modules == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                          "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                          "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
                          "lm_head.weight"]
    with pytest.raises(ValueError, match="no parameter selected"):
        TrainingTracker(exclude=["."]).snapshot_base(model)
    # wrappers are looked through
    compiled = torch.nn.DataParallel(model)
    assert unwrap_model(compiled) is model
    assert set(full_weights(compiled)) == {n for n, _ in model.named_parameters()}


def test_apply_prediction_merges_in_place():
    torch.manual_seed(1)
    model = DemoLM(CFG)
    tt = TrainingTracker(every_n_steps=1)
    tt.snapshot_base(model)
    _train(model, 4, lambda s: tt.step(model, s))
    pred = tt.tracker.extrapolate(to_step=8, base="last")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = dict(pred.apply(before))
    tt.apply_prediction(model, pred)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), want[n]), n
        if n in tt.modules:
            assert not torch.equal(p.detach(), before[n])


# ------------------------------------------------------------------ transformers


def _tiny_trainer(tmp_path, callback, max_steps=6, save_steps=3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (64, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1000,
        disable_tqdm=True, seed=0, data_seed=0)
    return model, transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_rank1_callback_in_a_trainer_run(tmp_path):
    from pyrank.integrations.transformers import Rank1Callback

    cb = Rank1Callback(every_n_steps=2)
    model, trainer = _tiny_trainer(tmp_path, cb)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    mods = cb.tracking.modules
    assert len(mods) == 14 and all(".layers." in n for n in mods)
    assert cb.tracker.steps(mods[0]) == [2.0, 3.0, 4.0, 6.0]  # every 2 steps, and at each save
    saved = pyrank.Rank1Tracker.load(str(tmp_path / "run" / "pyrank_tracker"))
    assert saved.steps(mods[0]) == [2.0, 3.0, 4.0, 6.0]
    # the callback's σ at a saved step equal an offline SVD of that checkpoint's weights
    ck = pyrank.io.open_weights(str(tmp_path / "run" / "checkpoint-6"))
    for n in mods[:3]:
        res = pyrank.svd_lowrank(ck[n], 1, base=base[n], fro=True)
        h = saved.history(n)
        assert float(h["sigma"][-1, 0]) == pytest.approx(float(res.S[0]), rel=1e-5)
        assert float(h["fro"][-1]) == pytest.approx(res.fro, rel=1e-6)


def test_rank1_callback_alpharl_mode(tmp_path, caplog):
    from pyrank.integrations.transformers import Rank1Callback

    with pytest.raises(ValueError, match="both"):
        Rank1Callback(extrapolate_at=3)
    with pytest.raises(ValueError, match="after"):
        Rank1Callback(extrapolate_at=3, to_step=2)
    cb = Rank1Callback(every_n_steps=1, extrapolate_at=4, to_step=10, scale=0.5)
    model, trainer = _tiny_trainer(tmp_path, cb, max_steps=5, save_steps=100)
    with caplog.at_level("WARNING", logger="pyrank"):
        trainer.train()
    assert cb.events == [{"step": 4, "to_step": 10, "scale": 0.5, "update": "official", "modules": 14}]
    assert any("AlphaRL at step 4" in r.message for r in caplog.records)
    # the jump shows in the update: σ₁ at step 4 (observed before the merge) < at step 5
    n = cb.tracking.modules[0]
    s = cb.tracker.history(n)["sigma"][:, 0]
    assert cb.tracker.steps(n) == [1.0, 2.0, 3.0, 4.0, 5.0] and float(s[4]) > float(s[3])
    # too few observations for a fit is a clear error
    cb = Rank1Callback(every_n_steps=2, extrapolate_at=2, to_step=10)
    _, trainer = _tiny_trainer(tmp_path / "b", cb, max_steps=3, save_steps=100)
    with pytest.raises(ValueError, match="at least 3"):
        trainer.train()


def test_importing_pyrank_does_not_import_transformers():
    code = "import sys, pyrank, pyrank.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
