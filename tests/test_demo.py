"""pyrank demo: the task, the RL losses, and the whole run end to end (--quick)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pyrank.demo import DemoSettings, run_demo
from pyrank.demo.model import DemoConfig, DemoLM, load_weights, save_checkpoint
from pyrank.demo.task import EOS, accuracy, generate, reward, split_problems
from pyrank.demo.train import _until_eos, rl, sft_loss
from pyrank.io import find_checkpoints, open_weights, select_modules

TINY = DemoSettings(hidden_size=32, n_train=2000, n_val=50, n_test=100, sft_steps=30, rl_steps=12,
                    prompts_per_step=8, group=4, save_every=3, rl_lr=1e-4)


def test_task_sets_are_disjoint_and_answers_correct():
    tr, va, te = split_problems(2, 3000, 200, 500, seed=3)
    keys = [set(map(tuple, p.prompts.tolist())) for p in (tr, va, te)]
    assert [len(k) for k in keys] == [3000, 200, 500]
    assert not (keys[0] & keys[2]) and not (keys[0] & keys[1]) and not (keys[1] & keys[2])
    p, a = te.prompts, te.answers
    x = p[:, 1] * 10 + p[:, 2]
    y = p[:, 4] * 10 + p[:, 5]
    s = a[:, 0] * 100 + a[:, 1] * 10 + a[:, 2]
    assert torch.equal(s, x + y) and bool((a[:, 3] == EOS).all())
    assert reward(a, a).eq(1).all() and reward(a.flip(0), a).mean() < 0.1
    with pytest.raises(ValueError, match="distinct problems"):
        split_problems(1, 90, 10, 10, seed=0)


def test_until_eos_masks_after_the_first_eos():
    c = torch.tensor([[1, EOS, 2, EOS], [EOS, 1, 1, 1], [1, 2, 3, 4]])
    assert _until_eos(c).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return DemoLM(DemoConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64))


def test_grpo_with_uniform_rewards_has_zero_loss_and_hpt_falls_back_to_sft():
    tr, _, _ = split_problems(1, 60, 10, 10, seed=0)
    # An untrained model solves nothing: every group's rewards are all 0, so GRPO's
    # advantages are 0 and its loss is exactly 0 ...
    stats = []
    m = _tiny_model()
    before = [p.detach().clone() for p in m.parameters()]
    rl(m, tr, steps=1, prompts_per_step=4, group=4, lr=1e-3, generator=torch.Generator().manual_seed(0),
       on_step=lambda s, st: stats.append(st))
    assert stats[0]["reward"] == 0 and stats[0]["loss"] == 0 and stats[0]["sft_fraction"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    # ... while HPT (γ = 0) takes the SFT branch for every such prompt: its loss is the SFT loss.
    m = _tiny_model()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(tr.prompts), (4,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = float(sft_loss(m, tr.prompts[idx], tr.answers[idx]))
    stats = []
    rl(m, tr, steps=1, prompts_per_step=4, group=4, lr=1e-3, generator=g, algo="hpt",
       on_step=lambda s, st: stats.append(st))
    assert stats[0]["sft_fraction"] == 1.0
    assert stats[0]["loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="algo"):
        rl(m, tr, steps=1, prompts_per_step=2, group=2, lr=1e-3, generator=g, algo="ppo")


def test_checkpoints_are_bf16_hf_dirs_that_pyrank_reads(tmp_path):
    m = _tiny_model()
    save_checkpoint(m, str(tmp_path / "run" / "checkpoint-7"), {"global_step": 7})
    assert find_checkpoints(str(tmp_path / "run")) == [(7, str(tmp_path / "run" / "checkpoint-7"))]
    cfg = json.loads((tmp_path / "run" / "checkpoint-7" / "config.json").read_text())
    assert DemoConfig.from_hf(cfg) == m.config  # the config.json rebuilds the model to load it into
    w = open_weights(str(tmp_path / "run" / "checkpoint-7"))
    assert all(w[n].dtype == torch.bfloat16 for n in w)
    names = select_modules(list(w), shapes=lambda n: w.shape_dtype(n)[0])
    assert len(names) == 7 and all(n.startswith("model.layers.0.") for n in names)
    m2 = load_weights(_tiny_model(seed=1), w)
    for (n, p), (_, q) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p.to(torch.bfloat16).float(), q), n
    te = split_problems(1, 10, 10, 30, seed=0)[2]
    assert accuracy(m, te) == pytest.approx(float(reward(generate(m, te.prompts, 3), te.answers).mean()))


def test_run_demo_is_deterministic_and_leaves_nothing_on_failure(tmp_path, monkeypatch, capsys):
    a = run_demo(str(tmp_path / "a"), settings=TINY, seed=5)
    b = run_demo(str(tmp_path / "b"), settings=TINY, seed=5, algo="grpo")
    assert a["accuracy"] == b["accuracy"] and a["training_curve"] == b["training_curve"]
    for f in ("report.json", "base/model.safetensors", "run/checkpoint-12/model.safetensors",
              "run/val_accuracy.csv", "analysis/report.json", "analysis/tracker/tracker.json"):
        assert (tmp_path / "a" / f).exists(), f
    from pyrank.io import PyrankIOError
    with pytest.raises(PyrankIOError, match="already exists"):
        run_demo(str(tmp_path / "a"), settings=TINY)
    # A failure mid-run removes the partial output and restores what --force replaced.
    import pyrank.demo.run as run_mod

    def boom(*a, **k):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(run_mod, "rl", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_demo(str(tmp_path / "c"), settings=TINY)
    assert not (tmp_path / "c").exists()
    with pytest.raises(RuntimeError):
        run_demo(str(tmp_path / "a"), settings=TINY, force=True)
    assert json.loads((tmp_path / "a" / "report.json").read_text())["accuracy"] == a["accuracy"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_pyrank_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "pyrank", "demo", "--quick", "--algo", "hpt", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((out / "report.json").read_text())
    assert r["algo"] == "hpt" and r["steps"] == [10, 20, 30, 40, 50, 60]
    acc = r["accuracy"]
    assert set(acc) == {"base", "final", "final_rank1", "final_rank1_rest_final", "window_last", "alpharl_step",
                        "alpharl_growth", "temporal"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    # The tiny run really learns: RL raises held-out accuracy above the SFT base.
    assert acc["final"] > acc["base"]
    assert set(r["module_types"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for t in r["module_types"].values():
        assert len(t["sigma1"]) == 6 and t["sigma1"][-1] > 0 and 0 < t["energy_final"] <= 1
    for f in ("training.png", "accuracy.png", "analysis/sigma1.png", "analysis/diagnostics.png"):
        assert (out / f).stat().st_size > 1000, f
    assert "AlphaRL" in p.stdout and "rank-1 model" in p.stdout and "∩princ" in p.stdout
    # The run directory is an ordinary training run for the other commands.
    p2 = subprocess.run([sys.executable, "-m", "pyrank", "extrapolate", str(out / "base"), "--run-dir",
                         str(out / "run"), "--window", "0:30", "--to-step", "60", "--out", str(tmp_path / "x")],
                        capture_output=True, text=True, env=env)
    assert p2.returncode == 0, p2.stderr
