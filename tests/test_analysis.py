"""RLVR diagnostics and SVD-initialized adapters against dense float64 references."""
import numpy as np
import pytest
import scipy.linalg
import torch

from pyrank import analysis
from pyrank.adapters import milora_init, pissa_init, smallest_triplets
from pyrank.testing import with_spectrum


def _pair_with_changes(m, n, changed, seed=0):
    """bf16 (W0, Wt) where exactly ``changed`` entries differ (by at least one ulp, relatively ≫ 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    W0 = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16)
    Wt = W0.clone()
    idx = torch.randperm(m * n, generator=g)[:changed]
    flat = Wt.view(-1)
    v = flat[idx].float()
    flat[idx] = (v * 1.1 + torch.where(v >= 0, 1e-3, -1e-3)).to(torch.bfloat16)  # away from 0: always changes
    return W0, Wt, idx


def test_update_sparsity_and_mask_are_exact():
    W0, Wt, idx = _pair_with_changes(67, 129, 1000)
    assert analysis.changed_count(W0, Wt) == 1000
    assert analysis.update_sparsity(W0, Wt) == pytest.approx(1 - 1000 / (67 * 129))
    mask = analysis.changed_mask(W0, Wt)
    want = torch.zeros(67 * 129, dtype=torch.bool)
    want[idx] = True
    assert torch.equal(mask.view(-1), want)
    assert analysis.update_sparsity(W0, W0) == 1.0


def test_principal_angles_and_spectral_shift_match_scipy():
    g = torch.Generator().manual_seed(1)
    W0 = with_spectrum(80, 60, [10, 8, 6, 4, 2, 1, 0.5], seed=2)
    Wt = W0 + 0.3 * torch.randn(80, 60, generator=g, dtype=torch.float64)
    for k in (1, 3, 5):
        tu, tv = analysis.principal_angles(W0.float(), Wt.float(), k)
        U0, S0, V0h = np.linalg.svd(W0.numpy())
        Ut, St, Vth = np.linalg.svd(Wt.numpy())
        ref_u = np.sort(scipy.linalg.subspace_angles(U0[:, :k], Ut[:, :k]))
        ref_v = np.sort(scipy.linalg.subspace_angles(V0h[:k].T, Vth[:k].T))
        assert np.allclose(tu.numpy(), ref_u, atol=2e-3), (tu, ref_u)
        assert np.allclose(tv.numpy(), ref_v, atol=2e-3)
        nss = np.linalg.norm(St[:k] - S0[:k]) / np.linalg.norm(S0[:k])
        assert analysis.spectral_shift(W0.float(), Wt.float(), k) == pytest.approx(nss, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_principal_weight_overlap_matches_dense(alpha):
    W0, Wt, _ = _pair_with_changes(90, 70, 2500, seed=3)
    k = 4
    got = analysis.principal_weight_overlap(W0, Wt, k, alpha)
    # dense reference (float64 SVD, full reconstruction, sort-based thresholds)
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    rec = ((U[:, :k] * S[:k]) @ Vh[:k]).abs().reshape(-1)
    cnt = int(np.ceil(alpha * W0.numel()))
    thr_p = rec.sort(descending=True).values[cnt - 1]
    a0 = W0.double().abs().reshape(-1)
    thr_l = a0.sort().values[cnt - 1]
    M = analysis.changed_mask(W0, Wt).reshape(-1)
    princ = (M & (rec >= thr_p * (1 - 1e-5))).sum().item() / M.sum().item()
    low = (M & (a0 <= thr_l)).sum().item() / M.sum().item()
    assert got["baseline"] == alpha and got["changed_fraction"] == pytest.approx(2500 / W0.numel())
    assert got["low"] == pytest.approx(low, abs=1e-12)
    assert got["princ"] == pytest.approx(princ, abs=2 / M.sum().item())  # fp32 vs fp64 ties at the edge
    with pytest.raises(ValueError, match="alpha"):
        analysis.principal_weight_overlap(W0, Wt, k, 1.5)


def test_kth_threshold_is_exact():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(300, 77, generator=g)
    for count in (1, 17, 5000, X.numel()):
        top = analysis._kth_threshold(X, 300, 77, count, largest=True)
        bot = analysis._kth_threshold(X, 300, 77, count, largest=False)
        a = X.abs().reshape(-1)
        assert top == a.sort(descending=True).values[count - 1].item()
        assert bot == a.sort().values[count - 1].item()


def test_mask_jaccard():
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)
    j, base = analysis.mask_jaccard(a, b)
    assert j == pytest.approx(2 / 4)
    p = q = 3 / 5
    assert base == pytest.approx(p * q / (p + q - p * q))
    with pytest.raises(ValueError, match="differ in shape"):
        analysis.mask_jaccard(a, b[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", ["pissa", "milora"])
def test_adapters_follow_peft_conventions(dtype, init):
    W = with_spectrum(96, 64, [3.0 * 0.8**i for i in range(64)], seed=5).to(dtype)
    r, lora_alpha = 8, 16
    s = lora_alpha / r
    fn = pissa_init if init == "pissa" else milora_init
    A, B, W_res = fn(W, r, lora_alpha, **({"tol": 1e-6} if init == "pissa" else {}))
    assert A.shape == (r, 64) and B.shape == (96, r)
    assert A.dtype == B.dtype == W_res.dtype == dtype
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    sl = slice(0, r) if init == "pissa" else slice(64 - r, 64)
    part = (U[:, sl] * S[sl]) @ Vh[sl]  # the top (PiSSA) or bottom (MiLoRA) r-part of W
    BA = s * B.double() @ A.double()
    eps = torch.finfo(dtype).eps
    assert (BA - part).abs().max() <= 4 * eps * S[0] + 1e-5 * S[0]
    # W_res + s·B·A reconstructs W up to rounding
    assert (W_res.double() + BA - W.double()).abs().max() <= 4 * eps * W.double().abs().max() + 1e-5 * S[0]


def test_smallest_triplets_match_lapack():
    W = with_spectrum(50, 40, [1.0 / (i + 1) for i in range(40)], seed=6)
    U, S, V = smallest_triplets(W, 5)
    ref = torch.linalg.svdvals(W).flip(0)[:5]
    assert torch.allclose(S, ref, rtol=1e-8)
    assert torch.allclose((W @ V).abs(), (U * S).abs(), atol=1e-10)
    # a rank-deficient matrix: zero singular values come back as zeros
    Z = with_spectrum(30, 20, [1.0, 0.5], seed=7)
    _, S0, _ = smallest_triplets(Z, 3)
    assert torch.allclose(S0, torch.zeros(3, dtype=torch.float64), atol=1e-7)
    with pytest.raises(ValueError, match="r must be"):
        pissa_init(W.float(), 0, 8)


def _peft_model(init_lora_weights=True, use_rslora=False, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lcfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=init_lora_weights, use_rslora=use_rslora)
    return peft.get_peft_model(model, lcfg), original


@pytest.mark.parametrize("use_rslora", [False, True])
def test_init_peft_model_pissa_matches_peft_and_preserves_the_model(use_rslora):
    from pyrank.adapters import init_peft_model

    ours, original = _peft_model(use_rslora=use_rslora)
    with pytest.warns(UserWarning, match="reloads correctly only onto these residual weights"):
        done = init_peft_model(ours, "pissa", tol=1e-6)  # to float32 accuracy, as peft's full SVD
    assert len(done) == 3 * 2 and all(d["r"] == 6 for d in done.values())
    theirs, _ = _peft_model(init_lora_weights="pissa", use_rslora=use_rslora)  # peft's full-SVD path
    ids = torch.arange(20)[None] % 64
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for name, info in done.items():
        lo = ours.get_submodule(name)
        lt = theirs.get_submodule(name)
        s = info["scaling"]
        assert s == pytest.approx(12 / (6 ** 0.5) if use_rslora else 2.0)
        BA_o = (lo.lora_B["default"].weight.double() @ lo.lora_A["default"].weight.double()).detach()
        BA_t = (lt.lora_B["default"].weight.double() @ lt.lora_A["default"].weight.double()).detach()
        assert torch.allclose(BA_o, BA_t, atol=1e-5 * float(BA_t.norm()))
        W = original[name.replace("base_model.model.", "") + ".weight"].double()
        # W_res + s·B·A reproduces W; s·B·A is W's top-6 part (float64 LAPACK)
        rec = lo.get_base_layer().weight.double() + s * BA_o
        assert torch.allclose(rec, W, atol=1e-6)
        U, S, Vh = torch.linalg.svd(W)
        assert torch.allclose(s * BA_o, (U[:, :6] * S[:6]) @ Vh[:6], atol=1e-5 * float(S[0]))


def test_init_peft_model_milora_bf16_and_errors():
    from pyrank.adapters import init_peft_model

    model, original = _peft_model(dtype=torch.bfloat16)
    with pytest.warns(UserWarning):
        done = init_peft_model(model, "milora")
    for name, info in done.items():
        layer = model.get_submodule(name)
        W0 = original[name.replace("base_model.model.", "") + ".weight"]
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        BA = (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()).detach()
        U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
        want = (U[:, -6:] * S[-6:]) @ Vh[-6:]
        assert torch.allclose(info["scaling"] * BA, want, atol=0.02 * float(S[-6]))
        rec = layer.get_base_layer().weight.double() + info["scaling"] * BA
        assert (rec - W0.double()).abs().max() <= 2 ** -7 * float(W0.double().abs().max())
    with pytest.raises(ValueError, match="method"):
        init_peft_model(model, "olora")
    with pytest.raises(ValueError, match="no peft LoRA layer"):
        init_peft_model(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="adapter 'other'"):
        init_peft_model(model, adapter_name="other")


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_adapter_reloads_on_the_original_model(method, tmp_path):
    """peft's own save flow for PiSSA: the initial adapter saved at init, a 'trained' adapter
    saved converted to a plain LoRA relative to the original weights, reloaded on an
    untouched copy of the original model: the same outputs to float32 rounding."""
    peft = pytest.importorskip("peft")
    from pyrank.adapters import init_peft_model

    model, _ = _peft_model()
    pristine = _peft_model()[0].unload()  # same seed: the original weights, no LoRA layers
    init_peft_model(model, method, initial_dir=str(tmp_path / "init"))
    assert (tmp_path / "init" / "adapter_config.json").exists()
    with torch.no_grad():  # "training": the adapter moves away from its initial value
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(2.0)
    ids = torch.arange(20)[None] % 64
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    reloaded = peft.PeftModel.from_pretrained(pristine, tmp_path / "final")
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_init_peft_model_is_all_or_nothing():
    """An error in any layer (here a NaN in the last one) leaves every weight as it was."""
    from pyrank.adapters import init_peft_model

    model, _ = _peft_model()
    lora = [m for m in model.modules() if hasattr(m, "lora_A")]
    with torch.no_grad():
        lora[-1].get_base_layer().weight[3, 4] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj: A contains NaN"):
        init_peft_model(model, "pissa")
    after = dict(model.named_parameters())
    assert all(torch.allclose(before[n], after[n].detach(), rtol=0, atol=0, equal_nan=True) for n in before)


@pytest.mark.parametrize("tol", [None, 1e-6])
def test_init_peft_model_when_the_krylov_space_is_exhausted(tol):
    """Hidden 256, r = 16: the solver's basis covers most of each weight's space, and a
    tolerance below float32's reach (1e-6) used to crash it; both now finish, every layer."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from pyrank.adapters import init_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]))
    with pytest.warns(UserWarning):
        done = init_peft_model(model, "pissa", **({} if tol is None else {"tol": tol}))
    assert len(done) == 14
