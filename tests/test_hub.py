"""A series kept as revisions of one Hub repo, read from a cache that huggingface_hub's own
hf_hub_download wrote (from a local stand-in endpoint: the tests have no network)."""
import json
import os
import subprocess
import sys

import pytest

from hub_server import serve
from pyrank.io import PyrankIOError
from pyrank.io.hub import hub_revisions
from test_io_cli import llama_state, write_model

REVS = {"step_10": 1, "step_20": 2, "step_30": 3, "main": 3}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base = llama_state(0)
    write_model(root / "base", base)
    for rev, i in REVS.items():
        write_model(root / "served" / rev, llama_state(i, base=base, scale=0.05 * i))
    srv = serve(str(root / "served"))
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{srv.server_address[1]}", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1")
    script = ("import sys\nfrom huggingface_hub import hf_hub_download\n"
              "for rev in sys.argv[2:]:\n"
              "    for f in ('model.safetensors', 'config.json'):\n"
              "        hf_hub_download('org/rl-run', f, revision=rev, cache_dir=sys.argv[1])\n")
    p = subprocess.run([sys.executable, "-c", script, str(root / "cache"), *REVS], env=env, capture_output=True,
                       text=True, timeout=120)
    srv.shutdown()
    assert p.returncode == 0, p.stderr
    return root


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pyrank", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)


def test_revisions_from_the_cache(hub):
    got = hub_revisions("org/rl-run", "step_*", str(hub / "cache"))
    assert [s for s, _ in got] == [10, 20, 30]
    assert all(os.path.islink(os.path.join(p, "model.safetensors")) for _, p in got)  # cache symlinks to blobs
    with pytest.raises(PyrankIOError, match="revision 'main' matches '\\*' but has no step number"):
        hub_revisions("org/rl-run", "*", str(hub / "cache"))
    with pytest.raises(PyrankIOError, match="no cached revision matches 'v\\*' .*step_10"):
        hub_revisions("org/rl-run", "v*", str(hub / "cache"))
    with pytest.raises(PyrankIOError, match="other/repo: not in the cache .*org/rl-run"):
        hub_revisions("other/repo", "*", str(hub / "cache"))


def test_analyze_a_hub_series_as_the_same_directories(hub, tmp_path):
    p = cli("analyze", hub / "base", "--hf-repo", "org/rl-run", "--revisions", "step_*", "--hf-cache",
            hub / "cache", "--out", tmp_path / "hub", "--quiet")
    assert p.returncode == 0, p.stderr
    dirs = [hub / "served" / f"step_{s}" for s in (10, 20, 30)]
    p = cli("analyze", hub / "base", *dirs, "--steps", "10,20,30", "--out", tmp_path / "dirs", "--quiet")
    assert p.returncode == 0, p.stderr
    a, b = (json.load(open(tmp_path / d / "report.json")) for d in ("hub", "dirs"))
    assert a["modules"] == b["modules"] and [c["step"] for c in a["checkpoints"]] == [10, 20, 30]
    p = cli("analyze", hub / "base", "--hf-repo", "org/rl-run", "--run-dir", hub, "--out", tmp_path / "x")
    assert p.returncode == 2 and "give one of CHECKPOINTS, --run-dir and --hf-repo" in p.stderr
