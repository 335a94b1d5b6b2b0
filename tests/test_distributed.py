"""Scale-out: torchrun --standalone --nproc-per-node 2 on the CPU with gloo.

Every rank runs with one thread, and so does the single-process reference: the CPU
kernels' reduction order depends on the thread count (pyrank.distributed says so)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pyrank.demo.model import DemoConfig, DemoLM, save_checkpoint
from pyrank.distributed import shard_by_size
from pyrank.io import open_weights

HERE = os.path.dirname(__file__)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def torchrun(*args, n=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def single(*args):
    return subprocess.run([sys.executable, "-m", "pyrank", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_shard_by_size_balances_and_is_deterministic():
    items = [("a", 5), ("b", 9), ("c", 2), ("d", 9), ("e", 1), ("f", 4)]
    parts = shard_by_size(items, 2)
    assert parts == [["a", "b", "e"], ["c", "d", "f"]]  # largest first: loads 15 and 15, input order kept
    assert sorted(sum(parts, [])) == sorted(n for n, _ in items)
    assert shard_by_size(items, 8)[6:] == [[], []]
    assert shard_by_size(items, 1) == [[n for n, _ in items]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base and 5 bf16 checkpoints of a 2-layer Llama-style model with a rank-1 drift."""
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    model = DemoLM(DemoConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=2))
    save_checkpoint(model, str(root / "base"))
    g = torch.Generator().manual_seed(1)
    dirs = {n: (torch.randn(p.shape[0], generator=g), torch.randn(p.shape[-1], generator=g))
            for n, p in model.named_parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in (10, 20, 30, 40, 50):
        with torch.no_grad():
            for n, p in model.named_parameters():
                u, v = dirs[n]
                upd = torch.outer(u, v) if p.dim() == 2 else u
                p.copy_(base[n] + 2e-3 * s * upd + 1e-3 * torch.randn(p.shape, generator=g))
        save_checkpoint(model, str(root / "run" / f"checkpoint-{s}"), {"global_step": s})
    return root


def test_torchrun_analyze_equals_single_process(tmp_path, run):
    args = ["analyze", run / "base", "--run-dir", run / "run", "--k", "2", "--diagnostics", "--diag-k", "4"]
    p1 = single(*args, "--out", tmp_path / "one")
    assert p1.returncode == 0, p1.stderr
    p2 = torchrun("-m", "pyrank", *args, "--out", tmp_path / "two")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((one / "report.json").read_text()) == json.loads((two / "report.json").read_text())
    assert (one / "modules.csv").read_text() == (two / "modules.csv").read_text()
    a, b = load_file(one / "tracker" / "vectors.safetensors"), load_file(two / "tracker" / "vectors.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (one / "tracker" / "tracker.json").read_text() == (two / "tracker" / "tracker.json").read_text()
    assert p2.stdout.count("wrote ") == 1  # rank 0 reports, once


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_over_a_c10d_rendezvous_equal_single_process(tmp_path, run):
    """`torchrun --nnodes 2 --nproc-per-node 1` with a c10d rendezvous, the two "nodes" being two
    launchers on this machine sharing its filesystem, as two hosts share a network one."""
    args = ["analyze", run / "base", "--run-dir", run / "run", "--k", "2"]
    p1 = single(*args, "--out", tmp_path / "one")
    assert p1.returncode == 0, p1.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}", "--rdzv-id=pyrank-test",
              "-m", "pyrank", *map(str, args), "--out", str(tmp_path / "two")]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs
    assert sum(o.count("wrote ") for o, _ in outs) == 1  # global rank 0 writes, on one node
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((one / "report.json").read_text()) == json.loads((two / "report.json").read_text())
    assert (one / "modules.csv").read_text() == (two / "modules.csv").read_text()


def test_torchrun_extrapolate_equals_single_process(tmp_path, run):
    args = ["extrapolate", run / "base", "--run-dir", run / "run", "--window", "0:30", "--to-step", "50"]
    p1 = single(*args, "--out", tmp_path / "one")
    assert p1.returncode == 0, p1.stderr
    p2 = torchrun("-m", "pyrank", *args, "--out", tmp_path / "two")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    one, two = open_weights(str(tmp_path / "one")), open_weights(str(tmp_path / "two"))
    assert sorted(one) == sorted(two)
    assert all(torch.equal(one[n], two[n]) for n in one)
    # each rank wrote its own shard; rank 0 the index and the copied config
    files = sorted(os.listdir(tmp_path / "two"))
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) == 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left


def test_torchrun_bad_input_fails_once_and_writes_nothing(tmp_path, run):
    p = torchrun("-m", "pyrank", "extrapolate", run / "base", "--run-dir", run / "run", "--window", "0:20",
                 "--to-step", "50", "--out", tmp_path / "x")
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pyrank: error")]
    assert len(lines) == 1 and "at least 3" in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "x") and os.listdir(tmp_path) == []


def test_training_tracker_with_ddp_fsdp2_and_fsdp(tmp_path):
    p = torchrun(os.path.join(HERE, "dist_tracking_script.py"), tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert "fsdp_error" not in r0, r0["fsdp_error"]
    assert r0["ddp_is_main"] and not r1["ddp_is_main"] and r0["ddp_modules"] == 14
    assert r0["ddp_offline_equal"] and r0["ddp_merge_changed_weights"]
    assert r0["ddp_replicas_identical_after_merge"] and r1["ddp_replicas_identical_after_merge"]
    assert r0["fsdp_is_main"] and not r1["fsdp_is_main"]
    assert r0["fsdp_offline_equal"] and r0["fsdp_steps"] == [1.0, 2.0, 3.0]
    assert r0["fsdp_apply_refused"] and r1["fsdp_apply_refused"]
    assert "fsdp1_error" not in r0, r0["fsdp1_error"]
    assert r0["fsdp1_offline_equal"] and r0["fsdp1_modules"] == 14


def test_torchrun_agrees_with_a_single_process_of_another_thread_count(tmp_path, run):
    """Bitwise equality needs equal thread counts (the CPU kernels' Δᵀ·Y partial sums are
    per thread). With 2 threads in the single process and 1 per rank, the results still agree
    to the solver's tolerance: σ within 2·tol·σ₁ per module and step, and the predicted
    weights within that relative error of the update (README: Reliability)."""
    args = ["analyze", run / "base", "--run-dir", run / "run", "--k", "2"]
    env2 = dict(ENV, OMP_NUM_THREADS="2")
    p1 = subprocess.run([sys.executable, "-m", "pyrank", *map(str, args), "--out", str(tmp_path / "one")],
                        capture_output=True, text=True, env=env2, timeout=300)
    assert p1.returncode == 0, p1.stderr
    p2 = torchrun("-m", "pyrank", *args, "--out", tmp_path / "two")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    one = json.loads((tmp_path / "one" / "report.json").read_text())["modules"]
    two = json.loads((tmp_path / "two" / "report.json").read_text())["modules"]
    tol = 1e-4
    for n in one:
        a, b = torch.tensor(one[n]["sigma"]), torch.tensor(two[n]["sigma"])
        assert ((a - b).abs() <= 2 * tol * a[:, :1]).all(), n
    args = ["extrapolate", run / "base", "--run-dir", run / "run", "--window", "0:30", "--to-step", "50"]
    p1 = subprocess.run([sys.executable, "-m", "pyrank", *map(str, args), "--out", str(tmp_path / "e1")],
                        capture_output=True, text=True, env=env2, timeout=300)
    assert p1.returncode == 0, p1.stderr
    p2 = torchrun("-m", "pyrank", *args, "--out", tmp_path / "e2")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    a, b = open_weights(str(tmp_path / "e1")), open_weights(str(tmp_path / "e2"))
    W30 = open_weights(str(run / "run" / "checkpoint-30"))
    for n in a:
        upd = (a[n].double() - W30[n].double()).norm()
        assert float((a[n].double() - b[n].double()).norm()) <= 10 * tol * float(upd) + 1e-6, n
