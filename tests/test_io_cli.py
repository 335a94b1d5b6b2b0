"""pyrank.io readers/writers and the pyrank command, end to end (subprocess), bad input included."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import pyrank
from pyrank.io import PyrankIOError, find_checkpoints, open_weights, select_modules, write_hf_dir

H, F, L = 24, 40, 2  # hidden, MLP width, layers: a tiny Llama-shaped model


def llama_state(seed, base=None, scale=0.0):
    """A Llama-named bf16 state dict; with ``base``, base + scale·(rank-1 + noise) per module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (50, H), "model.norm.weight": (H,), "lm_head.weight": (50, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H // 2, H),
                       p + "self_attn.v_proj.weight": (H // 2, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F), p + "input_layernorm.weight": (H,)})
    sd = {}
    for name, shp in shapes.items():
        if base is None:
            sd[name] = (torch.randn(*shp, generator=g) * 0.02).to(torch.bfloat16)
        else:
            W0 = base[name].float()
            if W0.dim() == 2 and "layers" in name and "norm" not in name:
                gd = torch.Generator().manual_seed(sum(map(ord, name)))  # one direction per module
                a = torch.randn(shp[0], generator=gd)
                b = torch.randn(shp[1], generator=gd)
                d = scale * (torch.outer(a, b) / math.sqrt(shp[0] * shp[1]) * 0.05
                             + 0.0005 * torch.randn(*shp, generator=g))
                sd[name] = (W0 + d).to(torch.bfloat16)
            else:
                sd[name] = base[name].clone()
    return sd


def write_model(d, sd, shards=1, config=True):
    os.makedirs(d, exist_ok=True)
    names = list(sd)
    if shards == 1:
        save_file(sd, os.path.join(d, "model.safetensors"))
    else:
        per = math.ceil(len(names) / shards)
        wm = {}
        for s in range(shards):
            part = {n: sd[n] for n in names[s * per:(s + 1) * per]}
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, os.path.join(d, fn))
            wm.update({n: fn for n in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
    if config:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "hidden_size": H}, f)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"x": 1}, f)


STEPS = [10, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base model and a transformers-style run directory of 5 checkpoints (sharded ones too)."""
    root = tmp_path_factory.mktemp("run")
    base = llama_state(0)
    write_model(str(root / "base"), base)
    sds = {}
    for i, s in enumerate(STEPS):
        sds[s] = llama_state(100 + s, base=base, scale=s / 10)
        d = str(root / "run" / f"checkpoint-{s}")
        write_model(d, sds[s], shards=2 if i % 2 else 1)
        with open(os.path.join(d, "trainer_state.json"), "w") as f:
            json.dump({"global_step": s}, f)
    with open(root / "metrics.csv", "w") as f:
        f.write("step,value\n" + "".join(f"{s},{0.2 + 0.01 * s}\n" for s in STEPS))
    return root, base, sds


def cli(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "pyrank", *map(str, args)], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"pyrank {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


# ------------------------------------------------------------------ readers


def test_layouts_read_the_same_tensors(tmp_path, run):
    root, base, sds = run
    sd = sds[20]
    layouts = {}
    write_model(str(tmp_path / "single"), sd)
    layouts["single"] = str(tmp_path / "single")
    write_model(str(tmp_path / "sharded"), sd, shards=3)
    layouts["sharded"] = str(tmp_path / "sharded")
    save_file(sd, str(tmp_path / "w.safetensors"))
    layouts["file"] = str(tmp_path / "w.safetensors")
    torch.save(sd, str(tmp_path / "w.pt"))
    layouts["pt"] = str(tmp_path / "w.pt")
    os.makedirs(tmp_path / "bin")
    torch.save(sd, str(tmp_path / "bin" / "pytorch_model.bin"))
    layouts["bin dir"] = str(tmp_path / "bin")
    for what, path in layouts.items():
        w = open_weights(path)
        assert set(w) == set(sd), what
        for n in sd:
            assert torch.equal(w[n], sd[n]), (what, n)


def test_find_checkpoints_in_every_run_layout(tmp_path, run):
    root, base, sds = run
    assert [s for s, _ in find_checkpoints(str(root / "run"))] == STEPS
    for s in (2, 1):  # verl
        write_model(str(tmp_path / "verl" / f"global_step_{s}" / "actor" / "huggingface"), sds[10])
    os.makedirs(tmp_path / "verl" / "global_step_3" / "actor")  # no weights folder: ignored
    found = find_checkpoints(str(tmp_path / "verl"))
    assert [s for s, _ in found] == [1, 2] and found[0][1].endswith(os.path.join("actor", "huggingface"))
    for s in (7, 3):  # OpenRLHF
        write_model(str(tmp_path / "orlhf" / f"global_step{s}_hf"), sds[10])
    assert [s for s, _ in find_checkpoints(str(tmp_path / "orlhf"))] == [3, 7]
    with pytest.raises(PyrankIOError, match="no checkpoints"):
        find_checkpoints(str(tmp_path / "verl" / "global_step_1"))


def test_module_selection_is_not_llama_only():
    names = {
        # llama / qwen / mistral
        "model.layers.3.self_attn.q_proj.weight": True, "model.layers.3.mlp.down_proj.weight": True,
        "model.layers.3.input_layernorm.weight": False, "model.embed_tokens.weight": False,
        "lm_head.weight": False, "model.norm.weight": False,
        # gpt-2
        "transformer.h.0.attn.c_attn.weight": True, "transformer.h.0.mlp.c_fc.weight": True,
        "transformer.wte.weight": False, "transformer.h.0.ln_1.weight": False,
        # gpt-neox / pythia
        "gpt_neox.layers.1.attention.query_key_value.weight": True,
        "gpt_neox.layers.1.mlp.dense_4h_to_h.weight": True, "gpt_neox.embed_in.weight": False,
        # phi / mixformer
        "model.layers.0.mlp.fc1.weight": True, "layers.1.mixer.Wqkv.weight": True,
        # bert-like
        "encoder.layer.0.attention.self.query.weight": True, "encoder.layer.0.attention.output.dense.weight": True,
        # LLaDA / diffusion LMs (TraceRL's models)
        "model.transformer.blocks.0.q_proj.weight": True, "model.transformer.blocks.0.ff_proj.weight": True,
        "model.transformer.blocks.0.attn_out.weight": True, "model.transformer.wte.weight": False,
        # biases never
        "model.layers.3.self_attn.q_proj.bias": False,
    }
    got = set(select_modules(list(names)))
    assert got == {n for n, want in names.items() if want}
    got = select_modules(list(names), include=[r"^lm_head\."], exclude=[r"\.mlp\."])
    assert "lm_head.weight" in got and not any(".mlp." in n for n in got)


# ------------------------------------------------------------------ commands


def test_analyze_end_to_end(tmp_path, run):
    root, base, sds = run
    out = tmp_path / "report"
    p = cli("analyze", root / "base", "--run-dir", root / "run", "--metrics", root / "metrics.csv", "--out", out)
    assert "q_proj" in p.stdout and "R² step" in p.stdout
    rep = json.load(open(out / "report.json"))
    assert len(rep["selected_modules"]) == 7 * L
    assert not any("norm" in n or "embed" in n or "lm_head" in n for n in rep["selected_modules"])
    assert [c["step"] for c in rep["checkpoints"]] == STEPS
    n = "model.layers.1.mlp.up_proj.weight"
    m = rep["modules"][n]
    D = sds[50][n].double() - base[n].double()
    s = torch.linalg.svdvals(D)
    assert abs(m["sigma"][-1][0] - float(s[0])) <= 1e-4 * float(s[0])
    assert abs(m["energy"][-1] - float(s[0] ** 2 / (s**2).sum())) < 1e-4
    assert m["r2_step"] > 0.9 and m["r2_metric"] > 0.9
    assert 0.0 <= m["sparsity"][0] <= 1.0
    assert (open(out / "modules.csv").read().count("\n")) == 1 + 7 * L * len(STEPS)
    for png in ("sigma1.png", "energy_heatmap.png", "r2_heatmap.png"):
        assert (out / png).stat().st_size > 1000
    tr = pyrank.Rank1Tracker.load(str(out / "tracker"))  # the report's tracker resumes in Python
    assert tr.steps(n) == [float(x) for x in STEPS]
    # explicit checkpoints, steps from their names, any order; k > 1
    out2 = tmp_path / "report2"
    cli("analyze", root / "base", root / "run" / "checkpoint-30", root / "run" / "checkpoint-10",
        root / "run" / "checkpoint-20", "--k", 2, "--out", out2)
    rep2 = json.load(open(out2 / "report.json"))
    assert rep2["modules"][n]["steps"] == [10, 20, 30] and len(rep2["modules"][n]["sigma"][0]) == 2
    # --resume continues that tracker over the whole run: the same as analyzing it in one go
    cli("analyze", root / "base", "--run-dir", root / "run", "--k", 2, "--resume", out2 / "tracker",
        "--out", tmp_path / "resumed")
    cli("analyze", root / "base", "--run-dir", root / "run", "--k", 2, "--out", tmp_path / "whole")
    a = json.load(open(tmp_path / "resumed" / "report.json"))["modules"]
    b = json.load(open(tmp_path / "whole" / "report.json"))["modules"]
    assert a == b
    _fails(cli("analyze", root / "base", "--run-dir", root / "run", "--resume", out2 / "tracker",
               "--out", tmp_path / "x", check=False), "k=2", "--k is 1")
    _fails(cli("analyze", root / "base", "--run-dir", root / "run", "--resume", tmp_path / "nope",
               "--out", tmp_path / "x", check=False), "not a saved pyrank tracker")
    assert not (tmp_path / "x").exists()


def test_a_reader_that_stops_early_ends_the_command_quietly_with_the_report_written(tmp_path, run):
    """`pyrank analyze … | head -1`: the summary goes to a pipe nobody reads any more."""
    root, base, sds = run
    out = tmp_path / "report"
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is printed
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "pyrank", "analyze", str(root / "base"), "--run-dir", str(root / "run"),
                        "--out", str(out), "--quiet"], stdout=w, stderr=subprocess.PIPE, text=True, env=env)
    os.close(w)
    assert p.returncode == 141 and p.stderr == ""
    assert len(json.load(open(out / "report.json"))["modules"]) == 7 * L


def test_extrapolate_writes_the_predicted_model(tmp_path, run):
    root, base, sds = run
    out = tmp_path / "pred"
    cli("extrapolate", root / "base", *[root / "run" / f"checkpoint-{s}" for s in STEPS],
        "--window", "10:30", "--to-step", 50, "--scale", 0.8, "--out", out)
    got = open_weights(str(out))
    assert json.load(open(out / "config.json"))["model_type"] == "llama"
    info = json.load(open(out / "pyrank_extrapolation.json"))
    assert info["base"] == "last" and info["update"] == "official" and info["applied_to"].endswith("checkpoint-30")
    assert json.load(open(out / "config.json"))["torch_dtype"] == "float32"  # what was written
    # the same computation in Python: AlphaRL's reference update, the model in float32
    tr = pyrank.Rank1Tracker()
    names = select_modules(list(base))
    for s in (10, 20, 30):
        tr.observe(s, {n: sds[s][n] for n in names}, {n: base[n] for n in names})
    pred = tr.extrapolate(to_step=50, window=(10, 30), scale=0.8)
    want = pred.apply(sds[30], dtype=torch.float32)
    assert set(got) == set(sds[30])
    for n in sds[30]:
        assert torch.equal(got[n], want[n]), n
    assert not torch.equal(got[names[0]], sds[30][names[0]].float())
    # --dtype same --update growth: the checkpoint's dtype, only the rank-1 part's growth added
    out3 = tmp_path / "pred3"
    cli("extrapolate", root / "base", *[root / "run" / f"checkpoint-{s}" for s in STEPS],
        "--window", "10:30", "--to-step", 50, "--scale", 0.8, "--update", "growth", "--dtype", "same", "--out", out3)
    got3 = open_weights(str(out3))
    want3 = tr.extrapolate(to_step=50, window=(10, 30), scale=0.8, update="growth").apply(sds[30])
    assert all(torch.equal(got3[n], want3[n]) for n in sds[30])
    assert json.load(open(out3 / "config.json")) == json.load(open(root / "run" / "checkpoint-30" / "config.json"))
    # metric mode and base=initial
    out2 = tmp_path / "pred2"
    cli("extrapolate", root / "base", "--run-dir", root / "run", "--window", "10:30", "--metrics",
        root / "metrics.csv", "--target-metric", 0.7, "--base", "initial", "--out", out2)
    got2 = open_weights(str(out2))
    assert torch.equal(got2["model.embed_tokens.weight"], base["model.embed_tokens.weight"].float())


def test_reconstruct_writes_rank_k_model(tmp_path, run):
    root, base, sds = run
    ck = dict(sds[50], **{"lm_head.weight": sds[50]["lm_head.weight"] * 2})  # trained beyond the modules
    write_model(str(tmp_path / "ck"), ck)
    out = tmp_path / "rank1"
    cli("reconstruct", root / "base", tmp_path / "ck", "--rank", 1, "--out", out)
    got = open_weights(str(out))
    n = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(got[n], pyrank.rank_k_reconstruction(base[n], ck[n], k=1))
    # every tensor that is not reconstructed comes from the base, as in AlphaRL's reference code
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    out2 = tmp_path / "rank1-rest"
    cli("reconstruct", root / "base", tmp_path / "ck", "--rank", 1, "--rest", "checkpoint", "--out", out2)
    got2 = open_weights(str(out2))
    assert torch.equal(got2[n], got[n]) and torch.equal(got2["lm_head.weight"], ck["lm_head.weight"])


def test_help_has_examples():
    for cmd in ("analyze", "extrapolate", "reconstruct", "demo", "env"):
        p = cli(cmd, "--help")
        assert "example" in p.stdout
    env = cli("env").stdout
    assert "available" in env and "transformers" in env and "peft" in env


# ------------------------------------------------------------------ bad input


def _fails(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("pyrank: error")]
    assert len(lines) == 1, p.stderr
    for nd in needles:
        assert nd in lines[0], (nd, lines[0])


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path, run):
    root, base, sds = run
    out = tmp_path / "out"
    ck = [root / "run" / f"checkpoint-{s}" for s in (10, 20, 30)]
    # missing path; a directory with no weights
    _fails(cli("analyze", tmp_path / "nope", *ck, "--out", out, check=False), "nope", "no such file")
    os.makedirs(tmp_path / "empty")
    _fails(cli("analyze", tmp_path / "empty", *ck, "--out", out, check=False), "empty", "no weights found")
    if not torch.cuda.is_available():  # --device cuda where there is none: said, not crashed
        _fails(cli("analyze", root / "base", *ck, "--device", "cuda", "--out", out, check=False),
               "--device cuda", "no CUDA device")
    # a checkpoint missing a module; a different shape; a different dtype
    for kind in ("missing", "shape", "dtype"):
        sd = dict(sds[20])
        n = "model.layers.1.mlp.gate_proj.weight"
        if kind == "missing":
            del sd[n]
        elif kind == "shape":
            sd[n] = torch.zeros(F + 1, H, dtype=torch.bfloat16)
        else:
            sd[n] = sd[n].float()
        write_model(str(tmp_path / kind / "checkpoint-20"), sd)
        _fails(cli("analyze", root / "base", ck[0], tmp_path / kind / "checkpoint-20", "--out", out, check=False),
               "checkpoint-20", "gate_proj")
    # NaN in a weight: named, with its step
    sd = dict(sds[20])
    bad = sd["model.layers.0.mlp.up_proj.weight"].clone()
    bad[1, 2] = float("nan")
    sd["model.layers.0.mlp.up_proj.weight"] = bad
    write_model(str(tmp_path / "nan" / "checkpoint-20"), sd)
    _fails(cli("analyze", root / "base", ck[0], tmp_path / "nan" / "checkpoint-20", "--out", out, check=False),
           "up_proj", "step 20", "NaN")
    # truncated and corrupted safetensors
    for kind in ("truncated", "corrupt"):
        d = tmp_path / kind / "checkpoint-20"
        write_model(str(d), sds[20])
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\x07" * 8 + data[8:])
        _fails(cli("analyze", root / "base", ck[0], d, "--out", out, check=False), "model.safetensors")
    # a metrics file that doesn't match the steps, or isn't one
    (tmp_path / "m.csv").write_text("step,value\n10,0.1\n15,0.2\n")
    _fails(cli("analyze", root / "base", *ck, "--metrics", tmp_path / "m.csv", "--out", out, check=False),
           "m.csv", "step 15")
    (tmp_path / "m.json").write_text("[1, 2")
    _fails(cli("analyze", root / "base", *ck, "--metrics", tmp_path / "m.json", "--out", out, check=False), "m.json")
    # output = an input, inside an input, or already existing
    _fails(cli("analyze", root / "base", *ck, "--out", ck[0], check=False), "refusing")
    _fails(cli("analyze", root / "base", *ck, "--out", ck[0] / "sub", check=False), "refusing")
    os.makedirs(tmp_path / "exists")
    _fails(cli("analyze", root / "base", *ck, "--out", tmp_path / "exists", check=False), "already exists", "--force")
    # a pickle-only checkpoint
    torch.save({"model": _Opaque()}, str(tmp_path / "pickled.pt"))
    _fails(cli("analyze", root / "base", ck[0], tmp_path / "pickled.pt", "--steps", "10,20", "--out", out,
               check=False), "pickled.pt", "weights_only")
    # a window too small
    _fails(cli("extrapolate", root / "base", *ck, "--window", "10:20", "--to-step", 50, "--out", out, check=False),
           "at least 3")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temporary left behind


class _Opaque:
    pass


def test_writer_is_atomic_when_the_disk_fills(tmp_path, run):
    root, base, sds = run

    class Filling(dict):
        def __getitem__(self, n):
            if n.startswith("model.layers.1"):
                raise OSError(28, "No space left on device")
            return sds[10][n]

        def __iter__(self):
            return iter(sds[10])

        def __len__(self):
            return len(sds[10])

    with pytest.raises(PyrankIOError, match="No space left on device"):
        write_hf_dir(str(tmp_path / "full"), Filling(), max_shard_bytes=4096)
    assert os.listdir(tmp_path) == []
    # and a finished write is complete, sharded, and loads back
    write_hf_dir(str(tmp_path / "ok"), sds[10], base_dir=str(root / "base"), max_shard_bytes=8192)
    assert (tmp_path / "ok" / "model.safetensors.index.json").exists()
    assert (tmp_path / "ok" / "config.json").exists()
    back = open_weights(str(tmp_path / "ok"))
    assert all(torch.equal(back[n], sds[10][n]) for n in sds[10])
    with pytest.raises(PyrankIOError, match="NaN or Inf"):
        bad = dict(sds[10])
        bad["lm_head.weight"] = torch.full((2, 2), float("inf"))
        write_hf_dir(str(tmp_path / "nan"), bad, modified={"lm_head.weight"})
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("layout", ["verl", "openrlhf"])
def test_analyze_other_run_layouts_end_to_end(tmp_path, run, layout):
    root, base, sds = run
    for s in (10, 20, 30):
        sub = f"global_step_{s}/actor/huggingface" if layout == "verl" else f"global_step{s}_hf"
        write_model(str(tmp_path / "run" / sub), sds[s], shards=2 if s == 20 else 1)
    out = tmp_path / "rep"
    cli("analyze", root / "base", "--run-dir", tmp_path / "run", "--out", out)
    rep = json.load(open(out / "report.json"))
    assert [c["step"] for c in rep["checkpoints"]] == [10, 20, 30]
    n = "model.layers.0.mlp.down_proj.weight"
    s1 = float(torch.linalg.svdvals(sds[30][n].double() - base[n].double())[0])
    assert abs(rep["modules"][n]["sigma"][-1][0] - s1) <= 1e-4 * s1


def test_analyze_diagnostics_columns_match_the_library(tmp_path, run):
    from pyrank import analysis

    root, base, sds = run
    out = tmp_path / "diag"
    p = cli("analyze", root / "base", "--run-dir", root / "run", "--diagnostics", "--diag-k", 3, "--alpha", 0.1,
            "--out", out)
    assert "diagnostics at the last checkpoint" in p.stdout and "∩princ" in p.stdout
    rep = json.load(open(out / "report.json"))
    assert rep["diagnostics"]["k"] == 3 and rep["diagnostics"]["alpha"] == 0.1
    n = "model.layers.0.self_attn.q_proj.weight"
    d = rep["modules"][n]["diagnostics"]
    assert len(d) == len(STEPS) and d[0]["jaccard_prev"] is None
    W0, W1, W2 = base[n], sds[STEPS[1]][n], sds[STEPS[2]][n]
    want = analysis.diagnostics(W0, W2, 3, 0.1)
    for key, v in want.items():
        assert d[2][key] == pytest.approx(v, rel=1e-6, abs=1e-9), key
    ang_u, _ = analysis.principal_angles(W0, W2, 3)
    assert d[2]["angle_u_max"] == pytest.approx(float(ang_u.max().rad2deg()), rel=1e-6)
    j, jb = analysis.mask_jaccard(analysis.changed_mask(W0, W1), analysis.changed_mask(W0, W2))
    assert d[2]["jaccard_prev"] == pytest.approx(j) and d[2]["jaccard_baseline"] == pytest.approx(jb)
    header = (out / "modules.csv").read_text().splitlines()[0].split(",")
    assert {"angle_u_max", "nss", "overlap_princ", "overlap_low", "jaccard_prev"} <= set(header)
    assert (out / "diagnostics.png").stat().st_size > 1000
    assert (out / "principal_overlap_heatmap.png").stat().st_size > 1000
    _fails(cli("analyze", root / "base", "--run-dir", root / "run", "--diagnostics", "--alpha", 1.5,
               "--out", tmp_path / "x", check=False), "--alpha")
    assert not (tmp_path / "x").exists()


def test_on_device_view_moves_each_tensor_and_passes_metadata_through(run):
    from pyrank.io.readers import OnDevice

    root, base, _ = run
    w = pyrank.io.open_weights(str(root / "base"))
    v = OnDevice(w, torch.device("meta"))
    n = "model.layers.0.self_attn.q_proj.weight"
    assert v[n].device.type == "meta" and v[n].shape == base[n].shape
    assert v.shape_dtype(n) == w.shape_dtype(n) and v.source == w.source and v.file_of(n) == w.file_of(n)
    assert list(v) == list(w) and len(v) == len(w) and n in v and "nope" not in v


def test_analyze_diagnostics_with_an_unchanged_checkpoint(tmp_path, run):
    # A checkpoint equal to the base: ΔW = 0 everywhere; σ = 0, nothing changed (overlaps
    # undefined → null), plots and tracker still written.
    root, base, sds = run
    same = tmp_path / "run" / "checkpoint-5"
    write_model(str(same), base)
    out = tmp_path / "rep"
    cli("analyze", root / "base", same, root / "run" / "checkpoint-10", "--diagnostics", "--diag-k", 2,
        "--out", out)
    rep = json.load(open(out / "report.json"))
    m = rep["modules"]["model.layers.0.mlp.up_proj.weight"]
    assert m["steps"] == [5, 10] and m["sigma"][0] == [0.0] and m["sparsity"][0] == 1.0
    d0 = m["diagnostics"][0]
    assert d0["overlap_princ"] is None and d0["nss"] == 0.0 and d0["changed_fraction"] == 0.0
    assert m["diagnostics"][1]["jaccard_prev"] == 0.0
    assert (out / "principal_overlap_heatmap.png").exists() and (out / "tracker" / "tracker.json").exists()


def test_the_pipeline_is_what_the_command_runs(tmp_path, run):
    """`pyrank analyze` is argv around pyrank.pipeline: the library call gives the same report."""
    from pyrank import pipeline
    from pyrank.report import jsonable

    root, base, sds = run
    cli("analyze", root / "base", "--run-dir", root / "run", "--metrics", root / "metrics.csv", "--k", 2,
        "--out", tmp_path / "cli")
    series = pipeline.open_series(str(root / "base"), run_dir=str(root / "run"), metrics=str(root / "metrics.csv"))
    result = pipeline.analyze_run(series, pipeline.AnalyzeOptions(k=2, quiet=True))
    want = json.load(open(tmp_path / "cli" / "report.json"))
    assert json.loads(json.dumps(jsonable(result.report))) == want
    with pytest.raises(pipeline.PipelineError, match="--k must be >= 1"):
        pipeline.analyze_run(series, pipeline.AnalyzeOptions(k=0))
    pipeline.write_analysis(result, str(tmp_path / "lib"), inputs=series.inputs)
    assert json.load(open(tmp_path / "lib" / "report.json")) == want


def test_importing_the_demo_or_the_pipeline_does_not_import_the_cli():
    code = ("import sys, pyrank.demo, pyrank.demo.run, pyrank.pipeline, pyrank.report; "
            "assert 'pyrank.cli' not in sys.modules, 'imported the CLI'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_the_series_loop_copies_where_it_computes_and_the_reader_thread_only_prefetches(run, monkeypatch):
    """On the CPU a copy on the read-ahead thread competes with the kernels: safetensors
    tensors are asked of the OS ahead (prefetch) and copied on the thread that computes."""
    import threading

    from pyrank import pipeline
    from pyrank.io import readers

    root, base, sds = run
    where = {"read": set(), "prefetch": set()}
    read, prefetch = readers.LazyWeights.read, readers.LazyWeights.prefetch
    monkeypatch.setattr(readers.LazyWeights, "read", lambda self, *a, **kw: (
        where["read"].add(threading.current_thread().name), read(self, *a, **kw))[1])
    monkeypatch.setattr(readers.LazyWeights, "prefetch", lambda self, name: (
        where["prefetch"].add(threading.current_thread().name), prefetch(self, name))[1])
    series = pipeline.open_series(str(root / "base"), run_dir=str(root / "run"))
    result = pipeline.analyze_run(series, pipeline.AnalyzeOptions(k=1, quiet=True))
    assert where["read"] == {threading.main_thread().name}
    assert where["prefetch"] and all(t.startswith("pyrank-read") for t in where["prefetch"])
    assert len(result.report["modules"]) == len(series.modules)


def test_prefetch_asks_for_every_byte_of_the_tensor_in_readahead_sized_pieces(tmp_path, monkeypatch):
    # Linux reads at most one readahead window per WILLNEED request: one request for the whole
    # tensor would prefetch only its first 128 KiB
    from safetensors.torch import save_file

    from pyrank.io import readers

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this OS: prefetch is a no-op")
    path = str(tmp_path / "model.safetensors")
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(700, 301)}, path)
    w = open_weights(path)
    asked = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: asked.append((off, n, advice)))
    w.prefetch("b")
    e = w._entry("b")
    assert all(a == os.POSIX_FADV_WILLNEED and 0 < n <= readers.PREFETCH_CHUNK for _, n, a in asked)
    assert [o for o, _, _ in asked] == list(range(e.start, e.start + e.nbytes, readers.PREFETCH_CHUNK))
    assert sum(n for _, n, _ in asked) == e.nbytes == 700 * 301 * 4
    w.prefetch("no such tensor")  # a hint: nothing to ask, nothing raised
    assert len(asked) == len(range(e.start, e.start + e.nbytes, readers.PREFETCH_CHUNK))
