"""Checkpoints as training frameworks write them, read without merging them first: fixtures
written by the real writers (torch FSDP2 + torch.distributed.checkpoint under torchrun), each
compared with the same weights in HF format."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import analyze_and_extrapolate, assert_same_weights, run_writer
from pyrank.io import PyrankIOError, find_checkpoints, open_weights

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return run_writer("fsdp_save_script.py", tmp_path_factory.mktemp("fsdp"), ENV)


def same_as_hf(w, fsdp_run, step, twin="hf"):
    """``w`` holds exactly the HF twin's tensors: names, shapes, dtypes and values."""
    ref = load_file(fsdp_run / twin / f"checkpoint-{step}" / "model.safetensors")
    assert set(w) == set(ref)
    for n, t in ref.items():
        assert w.shape_dtype(n) == (tuple(t.shape), str(t.dtype))
        assert torch.equal(w[n], t), n


def test_dcp_checkpoints_read_as_the_same_tensors(fsdp_run):
    steps = [s for s, _ in find_checkpoints(fsdp_run / "dcp")]
    assert steps == [2, 4, 6]
    for s in steps:
        # (accelerate's "model." prefix is gone: the model's own names)
        same_as_hf(open_weights(str(fsdp_run / "dcp" / f"checkpoint-{s}")), fsdp_run, s)


def test_analyze_and_extrapolate_a_dcp_series_as_its_hf_twin(fsdp_run, tmp_path):
    base = fsdp_run / "base"
    a, _, xa = analyze_and_extrapolate(base, fsdp_run / "dcp", tmp_path / "dcp", ENV)
    b, _, xb = analyze_and_extrapolate(base, fsdp_run / "hf", tmp_path / "hf", ENV)
    assert a == b  # same σ, vectors' drift, sparsity, R², passes
    # the predicted models: written over the last checkpoint of each layout, tensor for tensor equal
    assert_same_weights(xa, xb)


def test_a_half_written_dcp_checkpoint_is_named(fsdp_run, tmp_path):
    ck = tmp_path / "checkpoint-2"
    shutil.copytree(fsdp_run / "dcp" / "checkpoint-2", ck)
    shard = ck / "pytorch_model_fsdp_0" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(PyrankIOError, match="__1_0.distcp: .*truncated"):
        open_weights(str(ck))
    shard.unlink()
    with pytest.raises(PyrankIOError, match="__1_0.distcp: chunk file named by .* is missing"):
        open_weights(str(ck))


def test_dcp_metadata_is_never_unpickled_freely(tmp_path):
    """A .metadata that would run code when unpickled is refused by name, and runs nothing."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    d = tmp_path / "ck"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PyrankIOError, match=r"\.metadata: not a readable DCP metadata file .*not allowed"):
        open_weights(str(d))
    assert not (tmp_path / "pwned").exists()


VERL = [("verl", "hf", "base", 2), ("verl1", "hf1", "base1", 1)]  # (run, HF twin, base, FSDP version)


@pytest.mark.parametrize("run,twin,base,version", VERL)
def test_verl_fsdp_rank_files_read_as_the_same_tensors(fsdp_run, run, twin, base, version):
    found = find_checkpoints(fsdp_run / run)
    assert [s for s, _ in found] == [2, 4, 6] and all(p.endswith("actor") for _, p in found)
    for s, path in found:
        w = open_weights(path)
        assert w.layout == f"verl FSDP{version} rank files (world size 2)"
        same_as_hf(w, fsdp_run, s, twin)
    if version == 1:  # (rows that do not divide by the world size: 17 and 75 rows on 2 ranks)
        assert w.shape_dtype("model.embed_tokens.weight")[0] == (17, 32)


@pytest.mark.parametrize("run,twin,base,version", VERL)
def test_analyze_a_verl_series_as_its_hf_twin(fsdp_run, tmp_path, run, twin, base, version):
    base = fsdp_run / base
    a, err, xa = analyze_and_extrapolate(base, fsdp_run / run, tmp_path / run, ENV, "--debug")
    assert f"debug: {base}: safetensors" in err  # which reader each input got
    assert f"verl FSDP{version} rank files (world size 2)" in err
    b, err, xb = analyze_and_extrapolate(base, fsdp_run / twin, tmp_path / twin, ENV, "--debug")
    assert "checkpoint-6: safetensors" in err
    assert a == b
    # the predicted models, written over the last checkpoint of each layout: equal tensor for tensor
    assert_same_weights(xa, xb)


@pytest.mark.parametrize("run,version", [("verl", 2), ("verl1", 1)])
def test_a_half_written_verl_checkpoint_is_named(fsdp_run, tmp_path, run, version):
    actor = tmp_path / "global_step_2" / "actor"
    shutil.copytree(fsdp_run / run / "global_step_2" / "actor", actor)
    (actor / "model_world_size_2_rank_1.pt").rename(tmp_path / "aside.pt")
    with pytest.raises(PyrankIOError, match=r"model_world_size_2_rank_1\.pt: missing .*world size 2"):
        open_weights(str(actor))
    data = (tmp_path / "aside.pt").read_bytes()
    (actor / "model_world_size_2_rank_1.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PyrankIOError, match=r"model_world_size_2_rank_1\.pt: not loadable"):
        open_weights(str(actor))
    (actor / "model_world_size_2_rank_1.pt").write_bytes(data)
    (actor / "model_world_size_4_rank_0.pt").write_bytes(data)
    with pytest.raises(PyrankIOError, match="rank files of world size 4, but .*says 2"):
        open_weights(str(actor))
    (actor / "model_world_size_4_rank_0.pt").unlink()
    # files of one FSDP version said to be the other's: refused, naming the file
    cfg = json.loads((actor / "fsdp_config.json").read_text())
    (actor / "fsdp_config.json").write_text(json.dumps(dict(cfg, FSDP_version=3 - version)))
    with pytest.raises(PyrankIOError, match=r"model_world_size_2_rank_0\.pt: not loadable"):
        open_weights(str(actor))


class _Escape:
    """Unpickles to getattr(torch.Size, "__subclasses__"): the first step out of a jail."""

    def __reduce__(self):
        return (getattr, (torch.Size, "__subclasses__"))


@pytest.mark.parametrize("payload", ["system", "getattr"])
def test_fsdp1_rank_files_are_never_unpickled_freely(fsdp_run, tmp_path, payload):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    actor = tmp_path / "global_step_2" / "actor"
    shutil.copytree(fsdp_run / "verl1" / "global_step_2" / "actor", actor)
    sd = dict(open_weights(str(actor)))  # the real tensors, then one poisoned entry
    sd["model.norm.weight"] = Evil() if payload == "system" else _Escape()
    torch.save(sd, actor / "model_world_size_2_rank_1.pt")
    want = "os.system|posix.system" if payload == "system" else "getattr"
    with pytest.raises(PyrankIOError, match=rf"rank_1\.pt: not loadable as an FSDP1 rank file .*({want})"):
        open_weights(str(actor))
    assert not (tmp_path / "pwned").exists()


def test_dcp_chunks_read_raw_are_what_torch_load_reads(fsdp_run, tmp_path, monkeypatch):
    """Chunks are read from their archives' storage records straight into place; torch's own
    loader (the fallback for any other archive) reads the same values, and a row range reads
    the same rows."""
    import pyrank.io.dcp as dcp_mod

    w = open_weights(str(fsdp_run / "dcp" / "checkpoint-4"))
    fast = {n: w[n] for n in w}
    rows = {n: w.rows(n, 1, 3) for n in w if w.shape_dtype(n)[0][0] >= 3}
    monkeypatch.setattr(dcp_mod, "_raw_record", lambda f, info: None)
    for n in w:
        assert torch.equal(fast[n], w[n]), n
    for n, r in rows.items():
        assert torch.equal(r, w[n][1:3]), n
    monkeypatch.undo()
    # a chunk file cut short after the checkpoint was opened: named, not a crash
    ck = tmp_path / "checkpoint-4"
    shutil.copytree(fsdp_run / "dcp" / "checkpoint-4", ck)
    w = open_weights(str(ck))
    shard = ck / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(PyrankIOError, match=r"__1_0\.distcp: (ends inside a chunk|cannot read chunk)"):
        for n in w:
            w[n]


VERL_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "verl-0.9.1")


@pytest.mark.parametrize("version", [2, 1])
def test_rank_files_written_by_verls_own_checkpoint_manager(version):
    """Files verl 0.9.1's FSDPCheckpointManager.save_checkpoint wrote (tests/data/verl-0.9.1/
    make.py says how): found in the run directory and read as the gathered weights, bit for bit."""
    found = find_checkpoints(os.path.join(VERL_DATA, f"v{version}"))
    assert [s for s, _ in found] == [1] and found[0][1].endswith(os.path.join("global_step_1", "actor"))
    w = open_weights(found[0][1])
    assert w.layout == f"verl FSDP{version} rank files (world size 2)"
    ref = load_file(os.path.join(VERL_DATA, f"ref{version}", "model.safetensors"))
    assert set(w) == set(ref) and len(ref) == 27
    for n, t in ref.items():
        assert w.shape_dtype(n) == (tuple(t.shape), str(t.dtype))
        assert torch.equal(w[n], t), n
