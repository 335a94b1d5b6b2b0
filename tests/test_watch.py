"""`pyrank watch` against a writer that saves checkpoints slowly in another process."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time


from test_io_cli import cli, llama_state, write_model

# The writer: each checkpoint's index first, then its one shard in slow pieces, then
# trainer_state.json — the watcher sees every half-written state of it on the way.
WRITER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from safetensors.torch import save
    sys.path.insert(0, {tests!r})
    from test_io_cli import llama_state
    run, steps = sys.argv[1], [int(s) for s in sys.argv[2:]]
    base = llama_state(0)
    for i, step in enumerate(steps):
        time.sleep(0.6)
        d = os.path.join(run, f"checkpoint-{{step}}")
        os.makedirs(d)
        sd = llama_state(100 + i, base=base, scale=(i + 1) * 0.05)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({{"metadata": {{}}, "weight_map": {{n: "model-00001-of-00001.safetensors" for n in sd}}}}, f)
        data = save(sd)
        with open(os.path.join(d, "model-00001-of-00001.safetensors"), "wb") as f:
            for j in range(0, len(data), len(data) // 4 + 1):
                f.write(data[j:j + len(data) // 4 + 1])
                f.flush()
                time.sleep(0.4)
        with open(os.path.join(d, "trainer_state.json"), "w") as f:
            json.dump({{"global_step": step}}, f)
""")


def _writer(run, steps):
    script = WRITER.format(tests=os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, "-c", script, str(run), *map(str, steps)])


def _watch(base, run, out, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "pyrank", "watch", str(run), "--base", str(base), "--out", str(out),
                             "--interval", "0.1", "--settle", "0.3", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_watch_follows_a_slow_writer_and_matches_analyze(tmp_path):
    base, run, out = tmp_path / "base", tmp_path / "run", tmp_path / "watched"
    write_model(base, llama_state(0))
    os.makedirs(run)
    writer = _writer(run, [10, 20, 30])
    watch = _watch(base, run, out, "--idle-exit", "4")
    updates = []
    while watch.poll() is None:  # every report seen while it runs is whole and of finished checkpoints
        try:
            rep = json.load(open(out / "report.json"))
            updates.append([c["step"] for c in rep["checkpoints"]])
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert writer.wait(60) == 0
    stdout, stderr = watch.communicate()
    assert watch.returncode == 0, stderr
    assert "step 10 analyzed" in stderr and "step 30 analyzed" in stderr
    assert updates and updates[-1] == [10, 20, 30]
    assert all(u in ([10], [10, 20], [10, 20, 30]) for u in updates)  # never a half-read checkpoint
    # the same report as analyzing the finished run in one go
    cli("analyze", base, "--run-dir", run, "--out", tmp_path / "once", "--quiet")
    a, b = json.load(open(out / "report.json")), json.load(open(tmp_path / "once" / "report.json"))
    assert a["selected_modules"] == b["selected_modules"]
    for n in a["selected_modules"]:
        for key in ("sigma", "fro", "sparsity", "passes", "drift_u"):
            assert a["modules"][n][key] == b["modules"][n][key], (n, key)


def test_ctrl_c_leaves_the_last_whole_report(tmp_path):
    base, run, out = tmp_path / "base", tmp_path / "run", tmp_path / "watched"
    write_model(base, llama_state(0))
    write_model(run / "checkpoint-5", llama_state(1, base=llama_state(0), scale=0.05))
    watch = _watch(base, run, out)
    deadline = time.time() + 60
    while not (out / "report.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    watch.send_signal(signal.SIGINT)
    stdout, stderr = watch.communicate(timeout=60)
    assert watch.returncode == 0, stderr
    assert "holds the report of 1 checkpoint" in stdout
    rep = json.load(open(out / "report.json"))
    assert [c["step"] for c in rep["checkpoints"]] == [5]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".watched")]  # no temporaries left


def test_watch_refuses_bad_input_up_front(tmp_path):
    base = tmp_path / "base"
    write_model(base, llama_state(0))
    p = cli("watch", tmp_path / "nowhere", "--base", base, "--out", tmp_path / "o", "--idle-exit", "1", check=False)
    assert p.returncode == 2 and "nowhere: not a directory" in p.stderr
    os.makedirs(tmp_path / "run")
    p = cli("watch", tmp_path / "run", "--base", base, "--out", tmp_path / "run" / "o", check=False)
    assert p.returncode == 2 and "refusing to write into" in p.stderr
    p = cli("watch", tmp_path / "run", "--base", base, "--out", tmp_path / "o", "--interval", "0", check=False)
    assert p.returncode == 2 and "--interval" in p.stderr
