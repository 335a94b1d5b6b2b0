"""DeepSpeed ZeRO checkpoints read without zero_to_fp32: fixtures written by DeepSpeed's own
engine.save_checkpoint (ZeRO stages 1, 2 and 3, 2 ranks on gloo/CPU), compared with the
bf16 module's weights saved as HF safetensors at the same step, and with DeepSpeed's own
zero_to_fp32 reconstruction."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import analyze_and_extrapolate, assert_same_weights, run_writer
from pyrank.io import PyrankIOError, find_checkpoints, open_weights
from pyrank.io.deepspeed import DeepSpeedWeights

pytest.importorskip("deepspeed")  # the writer; the reader itself never imports it

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
STEPS = [2, 4, 6]


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    return run_writer("deepspeed_save_script.py", tmp_path_factory.mktemp("deepspeed"), ENV)


def twin(ds_run, stage, step):
    return load_file(ds_run / f"z{stage}_hf" / f"checkpoint-{step}" / "model.safetensors")


def zero_to_fp32(ds_run, tmp_path, stage, step):
    """DeepSpeed's own reconstruction: the zero_to_fp32.py it copies next to every checkpoint."""
    root, tag = (ds_run / "z2" / f"checkpoint-{step}", f"global_step{step}") if stage == 2 else \
        (ds_run / f"z{stage}" / "_actor", f"global_step{step}")
    out = tmp_path / f"fp32-z{stage}-{step}"
    p = subprocess.run([sys.executable, str(root / "zero_to_fp32.py"), str(root), str(out), "-t", tag,
                        "--safe_serialization"], capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoints_read_as_the_bf16_model(ds_run, stage):
    run = ds_run / f"z{stage}"
    found = find_checkpoints(run)  # OpenRLHF's ckpt/ (searched in _actor/) and HF Trainer's checkpoint-N/
    assert [s for s, _ in found] == STEPS
    for step, d in found:
        w = open_weights(d)
        assert f"stage {stage}" in w.layout
        ref = twin(ds_run, stage, step)
        assert set(w) == set(ref)
        for n, t in ref.items():
            assert w.shape_dtype(n) == (tuple(t.shape), str(t.dtype)) == (tuple(t.shape), "torch.bfloat16")
            assert torch.equal(w[n], t), n


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_agrees_with_deepspeeds_zero_to_fp32(ds_run, tmp_path, stage):
    step = 4
    ref = zero_to_fp32(ds_run, tmp_path, stage, step)
    d = find_checkpoints(ds_run / f"z{stage}")[1][1]
    w = open_weights(d)
    assert set(w) == set(ref)
    for n, t in ref.items():  # the bf16 model is its fp32 masters rounded to nearest even
        assert torch.equal(w[n], t.to(torch.bfloat16)), n
    if stage == 3:  # the masters themselves, bit for bit
        m = DeepSpeedWeights(d, dtype="float32")
        for n, t in ref.items():
            assert m.shape_dtype(n) == (tuple(t.shape), "torch.float32")
            assert torch.equal(m[n], t), n
    else:
        with pytest.raises(PyrankIOError, match="stage 1/2 .* training dtype"):
            DeepSpeedWeights(d, dtype="float32")


def test_analyze_and_extrapolate_a_zero3_series_as_its_hf_twin(ds_run, tmp_path):
    base = ds_run / "base"
    a, _, xa = analyze_and_extrapolate(base, ds_run / "z3", tmp_path / "z3", ENV)
    b, _, xb = analyze_and_extrapolate(base, ds_run / "z3_hf", tmp_path / "z3_hf", ENV)
    assert a == b
    assert_same_weights(xa, xb)


def test_stage_1_2_never_open_the_optimizer_files(ds_run, tmp_path):
    d = tmp_path / "global_step2"
    shutil.copytree(find_checkpoints(ds_run / "z2")[0][1], d)
    for f in d.glob("*optim_states.pt"):
        f.write_bytes(b"not a pickle")  # would fail if anything read it
    w = open_weights(str(d))
    ref = twin(ds_run, 2, 2)
    assert all(torch.equal(w[n], t) for n, t in ref.items())


def copy_z3(ds_run, tmp_path, step=2):
    d = tmp_path / f"global_step{step}"
    shutil.copytree(ds_run / "z3" / "_actor" / f"global_step{step}", d)
    return d


def test_a_half_written_zero3_checkpoint_is_named(ds_run, tmp_path):
    d = copy_z3(ds_run, tmp_path)
    optim = d / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])
    with pytest.raises(PyrankIOError, match="bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: not loadable"):
        open_weights(str(d))
    optim.unlink()
    with pytest.raises(PyrankIOError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: missing .*world size 2"):
        open_weights(str(d))
    shutil.copy(d / "zero_pp_rank_1_mp_rank_00_model_states.pt", d / "zero_pp_rank_2_mp_rank_00_model_states.pt")
    shutil.copy(d / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", optim)
    with pytest.raises(PyrankIOError, match="rank 2's files, but .* world size 2"):
        open_weights(str(d))


def test_tensor_parallel_checkpoints_are_refused_by_name(ds_run, tmp_path):
    d = copy_z3(ds_run, tmp_path)
    shutil.copy(d / "zero_pp_rank_0_mp_rank_00_model_states.pt", d / "zero_pp_rank_0_mp_rank_01_model_states.pt")
    with pytest.raises(PyrankIOError, match="mp_rank_01_model_states.pt: a tensor- or pipeline-parallel"):
        open_weights(str(d))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_optimizer_files_admit_only_deepspeeds_inert_objects(ds_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = copy_z3(ds_run, tmp_path)
    p = d / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(p, weights_only=False)  # test-only: our own fixture, to plant a payload in it
    sd["optimizer_state_dict"]["loss_scaler"] = Evil()
    torch.save(sd, p)
    with pytest.raises(PyrankIOError, match="optim_states.pt: not loadable with torch.load.weights_only=True."):
        open_weights(str(d))
    assert not (tmp_path / "pwned").exists()


def test_a_latest_file_picks_the_tag(ds_run, tmp_path):
    """HF Trainer's checkpoint-N/ (``latest`` → global_stepN/), read as a model directory."""
    ck = ds_run / "z2" / "checkpoint-4"
    assert (ck / "latest").read_text().strip() == "global_step4"
    w = open_weights(str(ck))
    ref = twin(ds_run, 2, 4)
    assert all(torch.equal(w[n], t) for n, t in ref.items())
    save_file({"x": torch.zeros(2)}, str(tmp_path / "unrelated.safetensors"))  # a layout wins over `latest`
    assert set(open_weights(str(tmp_path))) == {"x"}
