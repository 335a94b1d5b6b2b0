"""Faults and bad input, the way a user (or an attacker) meets them: the real CLI in a
subprocess, real signals, racing writers, files that are not what they claim to be.

Every command must end with one line naming the file or tensor and exit status 2, leave no
output and no temporary behind, or — where the input is odd but usable — say so and go on.
"""
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from pyrank.io import PyrankIOError, open_weights
from pyrank.io.writers import atomic_dir

from test_io_cli import _fails, llama_state, write_model

ENV = dict(os.environ, PYTHONWARNINGS="default", OMP_NUM_THREADS="1")


def pyrank_proc(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pyrank", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **kw)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyrank", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def hidden(d):
    return sorted(e for e in os.listdir(d) if e.startswith("."))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A base and 4 checkpoints in the transformers layout, one module frozen throughout."""
    root = tmp_path_factory.mktemp("faults")
    base = llama_state(0)
    write_model(str(root / "base"), base)
    frozen = "model.layers.1.self_attn.k_proj.weight"
    sds = {}
    for s in (10, 20, 30, 40):
        sd = llama_state(100 + s, base=base, scale=s / 10)
        sd[frozen] = base[frozen].clone()
        sds[s] = sd
        write_model(str(root / "run" / f"checkpoint-{s}"), sd)
    with open(root / "metrics.csv", "w") as f:
        f.write("step,value\n" + "".join(f"{s},{0.2 + 0.01 * s + 0.003 * (s % 20)}\n" for s in (10, 20, 30, 40)))
    return root, base, sds, frozen


# ------------------------------------------------------------------ concurrency and signals


def test_atomic_dir_never_replaces_a_directory_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"

    def fill(d):
        open(os.path.join(d, "mine"), "w").close()
        os.makedirs(out)  # another writer wins the race while we are still writing
        open(out / "theirs", "w").close()

    with pytest.raises(PyrankIOError, match="already exists"):
        atomic_dir(str(out), fill, replace=False)
    assert os.listdir(out) == ["theirs"] and hidden(tmp_path) == []


def test_two_writers_to_one_out_exactly_one_wins(tmp_path, series):
    root, base, sds, _ = series
    out = tmp_path / "rank1"
    procs = [pyrank_proc("reconstruct", root / "base", root / "run" / "checkpoint-40", "--out", out)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "already exists" in loser and "Traceback" not in loser
    got = open_weights(str(out))  # the winner's output is whole
    assert set(got) == set(sds[40]) and hidden(tmp_path) == []


def _wait_for(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the signal: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A model big enough that writing it takes a while (~100 MB of fp32 output)."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(24)]
    base = {n: (0.02 * torch.randn(512, 512, generator=g)).bfloat16() for n in names}
    ck = {n: (w.float() + 1e-3 * torch.randn(512, 512, generator=g)).bfloat16() for n, w in base.items()}
    write_model(str(root / "base"), base)
    write_model(str(root / "ck"), ck)
    return root


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_writing_leaves_nothing(tmp_path, big, sig):
    out = tmp_path / "out"
    p = pyrank_proc("reconstruct", big / "base", big / "ck", "--out", out)
    _wait_for(lambda: any(e.startswith(".out.tmp-") for e in os.listdir(tmp_path)), p)
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    err = p.stderr.read()
    assert rc == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), (rc, err)
    assert "Traceback" not in err and "pyrank: interrupted" in err, err
    assert os.listdir(tmp_path) == []  # neither the output nor a temporary


def test_temporaries_of_a_killed_writer_are_removed_by_the_next(tmp_path, big):
    out = tmp_path / "out"
    p = pyrank_proc("reconstruct", big / "base", big / "ck", "--out", out)
    _wait_for(lambda: any(e.startswith(".out.tmp-") for e in os.listdir(tmp_path)), p)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert hidden(tmp_path) and not out.exists()  # kill -9: nothing can clean up...
    assert run_cli("reconstruct", big / "base", big / "ck", "--out", out).returncode == 0
    assert hidden(tmp_path) == [] and out.exists()  # ...until the next writer to that --out


@pytest.fixture(scope="module")
def long_run(big):
    """8 checkpoints of the big model: an analysis long enough to interrupt."""
    run = big / "run"
    if not run.exists():
        g = torch.Generator().manual_seed(1)
        W0 = open_weights(str(big / "base"))
        for s in range(1, 9):
            write_model(str(run / f"checkpoint-{s}"),
                        {n: (W0[n].float() + 1e-3 * s * torch.randn(512, 512, generator=g)).bfloat16() for n in W0})
    return run


def _interrupt_after_first_checkpoint(tmp_path, args, sig):
    p = pyrank_proc(*args)
    partial = tmp_path / ".out.partial"
    _wait_for(lambda: partial.is_dir() and any(not e.startswith(".") for e in os.listdir(partial)), p)
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    return rc, p.stderr.read(), partial


def test_analyze_resumes_after_kill_9_with_the_same_report(tmp_path, big, long_run):
    """kill -9 halfway through; the same command with --resume finishes it, and the report
    is the one an uninterrupted run writes."""
    args = ["analyze", big / "base", "--run-dir", long_run, "--out", tmp_path / "out"]
    _, _, partial = _interrupt_after_first_checkpoint(tmp_path, args, signal.SIGKILL)
    assert not (tmp_path / "out").exists()
    done = sorted(e for e in os.listdir(partial) if not e.startswith("."))
    r = run_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert not partial.exists()  # complete: nothing left to resume
    whole = run_cli(*args[:-1], tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    a = json.loads((tmp_path / "out" / "report.json").read_text())["modules"]
    b = json.loads((tmp_path / "whole" / "report.json").read_text())["modules"]
    assert a == b and 1 <= len(done) < 8
    # --resume with nothing to resume says so
    _fails(run_cli(*args[:-1], tmp_path / "fresh", "--resume"), "no interrupted analysis")


def test_ctrl_c_is_one_line_and_resumable(tmp_path, big, long_run):
    args = ["analyze", big / "base", "--run-dir", long_run, "--out", tmp_path / "out"]
    rc, err, partial = _interrupt_after_first_checkpoint(tmp_path, args, signal.SIGINT)
    assert rc == 130 and "Traceback" not in err and "pyrank: interrupted" in err and "--resume" in err, (rc, err)
    assert not (tmp_path / "out").exists() and partial.is_dir()
    assert run_cli(*args, "--resume").returncode == 0 and not partial.exists()


def test_outputs_follow_the_umask(tmp_path, series):
    root, *_ = series
    out = tmp_path / "rank1"
    p = subprocess.run([sys.executable, "-m", "pyrank", "reconstruct", root / "base", root / "run" / "checkpoint-40",
                        "--out", out], capture_output=True, text=True, env=ENV, preexec_fn=lambda: os.umask(0o022))
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    for fn in os.listdir(out):
        assert stat.S_IMODE(os.stat(out / fn).st_mode) == 0o644, fn


# ------------------------------------------------------------------ files that are not what they claim


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/dev/zero", "ABS"], ids=["parent", "dev", "abs"])
def test_an_index_may_not_point_outside_its_checkpoint(tmp_path, series, shard):
    root, base, *_ = series
    other = tmp_path / "other"
    write_model(str(other), base)
    d = tmp_path / "ck"
    d.mkdir()
    target = str(other / "model.safetensors") if shard == "ABS" else shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in base}}))
    with pytest.raises(PyrankIOError, match="is not a file in"):
        open_weights(str(d))
    _fails(run_cli("reconstruct", root / "base", d, "--out", tmp_path / "o"), "model.safetensors.index.json")


@pytest.mark.parametrize("weight_map", [[1, 2], 7, {"a": 3}], ids=["list", "int", "int-value"])
def test_an_index_with_a_bad_weight_map_is_named(tmp_path, weight_map):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(PyrankIOError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        open_weights(str(d))


@pytest.mark.parametrize("where", ["single", "shard", "file"])
def test_a_fifo_is_refused_not_read_forever(tmp_path, series, where):
    root, base, *_ = series
    d = tmp_path / "ck"
    d.mkdir()
    if where == "single":
        os.mkfifo(d / "model.safetensors")
        path = d
    elif where == "shard":
        os.mkfifo(d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in base}}))
        path = d
    else:
        os.mkfifo(d / "w.safetensors")
        path = d / "w.safetensors"
    with pytest.raises(PyrankIOError, match="not a regular file"):
        open_weights(str(path))
    _fails(run_cli("reconstruct", root / "base", path, "--out", tmp_path / "o"), "not a regular file")


def test_a_bin_checkpoint_against_a_safetensors_base(tmp_path, series):
    root, base, sds, _ = series
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(sds[40], d / "pytorch_model.bin")
    r = run_cli("reconstruct", root / "base", d, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ runs that are not what they claim


def test_a_frozen_module_is_reported_not_fatal(tmp_path, series):
    root, base, sds, frozen = series
    r = run_cli("analyze", root / "base", "--run-dir", root / "run", "--metrics", root / "metrics.csv",
                "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "a" / "report.json").read_text())["modules"][frozen]
    assert m["sigma"] == [[0.0]] * 4 and m["r2_metric"] is None and m["r2_step"] is None
    assert m["drift_u"] == [None] * 4  # vectors of a zero update are arbitrary: no drift to report
    other = json.loads((tmp_path / "a" / "report.json").read_text())["modules"]
    assert all(v["r2_step"] is not None for k, v in other.items() if k != frozen)


def test_resume_refuses_another_runs_tracker(tmp_path, series):
    root, base, sds, _ = series
    first = tmp_path / "first"
    assert run_cli("analyze", root / "base", "--run-dir", root / "run", "--out", first).returncode == 0
    # another run: the same steps and shapes, other weights
    other = tmp_path / "other"
    for s in (10, 20, 30, 40):
        write_model(str(other / f"checkpoint-{s}"), llama_state(500 + s, base=base, scale=s / 10))
    _fails(run_cli("analyze", root / "base", "--run-dir", other, "--resume", first / "tracker", "--out",
                   tmp_path / "x"), "belongs to another run")
    # another base
    base2 = tmp_path / "base2"
    write_model(str(base2), llama_state(9))
    _fails(run_cli("analyze", base2, "--run-dir", root / "run", "--resume", first / "tracker", "--out",
                   tmp_path / "x"), "belongs to another run")
    # modules this selection does not have
    _fails(run_cli("analyze", root / "base", "--run-dir", root / "run", "--exclude", "layers\\.1\\.", "--resume",
                   first / "tracker", "--out", tmp_path / "x"), "module(s) this base and selection do not have")
    # steps this series does not have
    _fails(run_cli("analyze", root / "base", root / "run" / "checkpoint-10", root / "run" / "checkpoint-20",
                   root / "run" / "checkpoint-30", "--resume", first / "tracker", "--out", tmp_path / "x"),
           "step 40", "checkpoint steps: 10, 20, 30")
    # a truncated tracker
    vec = first / "tracker" / "vectors.safetensors"
    vec.write_bytes(vec.read_bytes()[:100])
    _fails(run_cli("analyze", root / "base", "--run-dir", root / "run", "--resume", first / "tracker", "--out",
                   tmp_path / "x"), "vectors.safetensors")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ bad arguments, caught before any compute


def test_bad_numbers_and_places_fail_before_reading(tmp_path, series):
    root, *_ = series
    ck = root / "run" / "checkpoint-40"
    for opt, val in (("--to-step", "nan"), ("--scale", "inf"), ("--target-metric", "nan")):
        extra = ["--metrics", root / "metrics.csv"] if opt == "--target-metric" else ["--to-step", 50]
        if opt == "--to-step":
            extra = []
        _fails(run_cli("extrapolate", root / "base", "--run-dir", root / "run", opt, val, *extra,
                       "--out", tmp_path / "o"), opt, "finite")
    _fails(run_cli("analyze", root / "base", ck, "--k", 0, "--out", tmp_path / "o"), "--k must be >= 1")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(run_cli("analyze", root / "base", "--run-dir", root / "run", "--out", blocker / "out"),
           "not a writable directory")
    _fails(run_cli("analyze", root / "base", ck, "--k", 100000, "--out", tmp_path / "o"),
           "--k 100000 exceeds the smaller side")
    _fails(run_cli("extrapolate", root / "base", "--run-dir", root / "run", "--window", "100:200", "--to-step", 300,
                   "--out", tmp_path / "o"), "holds 0 checkpoint", "checkpoint steps: 10, 20, 30, 40")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_metrics_files_that_say_something_odd(tmp_path, series):
    root, *_ = series
    args = ["analyze", root / "base", "--run-dir", root / "run", "--out", tmp_path / "o", "--metrics"]
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("step,value\n10,0.5\n20,0,6\xe9\n".encode("latin-1"))
    _fails(run_cli(*args, bad), "latin1.csv", "not UTF-8")
    dup = tmp_path / "dup.csv"
    dup.write_text("10,0.5\n20,0.6\n20,0.7\n")
    _fails(run_cli(*args, dup), "dup.csv", "step 20 appears twice")
    nan = tmp_path / "nan.csv"
    nan.write_text("10,0.5\n20,nan\n30,0.7\n40,0.8\n")
    r = run_cli(*args, nan)
    assert r.returncode == 0 and "ignoring non-finite values at step(s) 20" in r.stderr


def test_odd_tensors_are_named(tmp_path, series):
    root, base, sds, _ = series
    # an int32 tensor where a module is expected
    b = dict(base, **{"model.layers.0.mlp.up_proj.weight": base["model.layers.0.mlp.up_proj.weight"].int()})
    write_model(str(tmp_path / "intbase"), b)
    _fails(run_cli("reconstruct", tmp_path / "intbase", root / "run" / "checkpoint-40", "--out", tmp_path / "o"),
           "model.layers.0.mlp.up_proj.weight", "torch.int32")
    # a 1-D tensor the selection matches is skipped aloud; NaN outside the modules is carried over aloud
    ck = dict(sds[40], **{"model.norm.weight": torch.full_like(sds[40]["model.norm.weight"], float("nan"))})
    write_model(str(tmp_path / "nanck"), ck)
    r = run_cli("reconstruct", root / "base", tmp_path / "nanck", "--rest", "checkpoint", "--include",
                "input_layernorm", "--out", tmp_path / "o2")
    assert r.returncode == 0, r.stderr
    assert "skipping" in r.stderr and "input_layernorm" in r.stderr
    assert "'model.norm.weight' contains NaN or Inf" in r.stderr


def test_far_target_metric_warns(tmp_path, series):
    root, *_ = series
    r = run_cli("extrapolate", root / "base", "--run-dir", root / "run", "--metrics", root / "metrics.csv",
                "--target-metric", 1e6, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "pyrank: warning: target metric 1e+06 lies more than the observed range away" in r.stderr


def test_api_errors_are_clear():
    import pyrank

    assert callable(pyrank.analysis.update_sparsity) and callable(pyrank.adapters.pissa_init)
    with pytest.raises(TypeError, match="sparse_coo tensor"):
        pyrank.svd_lowrank(torch.eye(4).to_sparse())
    with pytest.raises(ValueError, match="meta device"):
        pyrank.svd_lowrank(torch.empty(4, 4, device="meta"))
    assert math.isnan(pyrank.fits.r2_in_step([1, 2, 3], torch.zeros(3, 4)))
