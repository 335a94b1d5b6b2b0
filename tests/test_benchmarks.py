"""The benchmark scripts still run against the current API (tiny sizes, nothing written).

They are not timed tests: they only prove each script runs end to end and prints its table,
so that a change of API cannot silently break the measurements RESULTS.md is built from.
"""
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

CASES = {
    "bench_ops": ["--shape", "64x96", "--ks", "1,3", "--repeats", "1", "--backends", "cpu,torch"],
    "bench_svd": ["--shapes", "120x200", "--ks", "1,3", "--repeats", "1", "--backends", "cpu,torch"],
    "bench_track": ["--shape", "128x256", "--modules", "2", "--steps", "3"],
    "bench_adapters": ["--shape", "200x300", "--ranks", "4", "--tols", "1e-2", "--model-hidden", "48",
                       "--model-mlp", "96"],
    "bench_lowrank": ["--small", "--repeats", "1"],
    "bench_io": ["--layers", "1", "--hidden", "64", "--mlp", "128", "--checkpoints", "2"],
    "bench_series": ["--shape", "tiny", "--steps", "2"],
    "bench_formats": ["--shape", "tiny", "--layers", "2", "--steps", "2", "--deepspeed", "3"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_script_runs(name, tmp_path):
    before = {f: os.path.getmtime(os.path.join(BENCH, f)) for f in os.listdir(BENCH)
              if f.endswith(".md")}
    out = subprocess.run([sys.executable, os.path.join(BENCH, f"{name}.py"), *CASES[name], "--no-write"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Machine:" in out.stdout and "|---" in out.stdout  # the report and its table
    after = {f: os.path.getmtime(os.path.join(BENCH, f)) for f in before}
    assert before == after, "--no-write must leave the recorded results alone"


@pytest.mark.parametrize("name", ["bench_svd", "bench_track"])
def test_cuda_device_without_gpu_is_a_clear_error(name, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, os.path.join(BENCH, f"{name}.py"), "--device", "cuda", "--no-write"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "torch sees no CUDA device" in out.stderr
