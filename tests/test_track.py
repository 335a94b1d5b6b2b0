"""Tracking, alignment, linearity fits and AlphaRL / temporal extrapolation (docs/METHODS.md §1–2)."""
import math

import pytest
import torch

import pyrank
from pyrank.fits import PLS1, r2_in_step
from pyrank.temporal import temporal_coefficients
from pyrank.testing import random_orthonormal

from helpers import exact_delta, merge_within_bound

M, N, STEPS = 96, 64, list(range(10, 110, 10))


def make_series(seed=0, noise=2e-5, drift=True):
    """ΔW_t = (t/100)·s·a·bᵀ + a smaller drifting rank-2 part + noise, rounded to bf16.

    Returns (W0, {step: W_t}, truth) where truth(t) is the exact rank-1 term's û = σ·a and b.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = random_orthonormal(M, 1, g)[:, 0], random_orthonormal(N, 1, g)[:, 0]
    P, Q = random_orthonormal(M, 2, g), random_orthonormal(N, 2, g)
    P -= torch.outer(a, a @ P)
    Q -= torch.outer(b, b @ Q)
    W0 = (torch.randn(M, N, generator=g, dtype=torch.float64) * 0.02).to(torch.bfloat16)
    s = 0.2
    series = {}
    for t in STEPS:
        x = t / 100
        dW = x * s * torch.outer(a, b)
        theta = 0.3 * x if drift else 0.0  # the rank-2 part turns slowly
        R = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                         dtype=torch.float64)
        dW += (P @ R * torch.tensor([0.25 * s * x, 0.1 * s * x], dtype=torch.float64)) @ Q.T
        dW += noise * torch.randn(M, N, generator=g, dtype=torch.float64)
        series[t] = (W0.double() + dW).to(torch.bfloat16)
    return W0, series, (lambda t: (t / 100) * s * a), b


def observe_all(tracker, W0, series, order=None, metric=None):
    for t in order or STEPS:
        tracker.observe(t, {"layer.q_proj.weight": series[t], "norm.weight": torch.ones(3)},
                        {"layer.q_proj.weight": W0, "norm.weight": torch.ones(3)},
                        metric=None if metric is None else metric(t))


def test_history_sorted_aligned_and_linear():
    W0, series, u_true, b = make_series()
    tr = pyrank.Rank1Tracker()
    observe_all(tr, W0, series, order=[50, 10, 100, 30, 20, 90, 40, 70, 60, 80])
    assert tr.modules == ["layer.q_proj.weight"]  # 1-D tensors are not modules
    h = tr.history("layer.q_proj.weight")
    assert h["steps"] == [float(s) for s in STEPS]
    U = h["u_hat"].double()
    cos = (U[:-1] * U[1:]).sum(1) / (U[:-1].norm(dim=1) * U[1:].norm(dim=1))
    assert bool((cos > 0.99).all())
    # û(t) matches the true rank-1 term up to one global sign
    sign = math.copysign(1.0, float(U[-1] @ u_true(100)))
    for i, t in enumerate(STEPS):
        assert (sign * U[i] - u_true(t)).norm() <= 0.02 * u_true(t).norm()
    assert tr.r2_step("layer.q_proj.weight") > 0.999
    assert bool((h["energy"] > 0.8).all() and (h["energy"] <= 1.0 + 1e-6).all())
    assert math.isnan(float(h["drift_u"][0])) and float(h["drift_u"][1:].max()) < 0.05
    # warm starts keep every observation after the first (step 50, cold) cheap; their
    # efficiency is tested in test_linalg. (The cold one takes 4–5 passes, seed by seed.)
    passes = dict(zip(STEPS, h["passes"]))
    assert passes.pop(50) <= 6 and max(passes.values()) <= 3
    assert bool((h["residual"] <= 1e-4).all())


def test_injected_sign_flips_are_undone():
    W0, series, _, _ = make_series(seed=1)
    tr = pyrank.Rank1Tracker()
    observe_all(tr, W0, series)
    clean = tr.history("layer.q_proj.weight")
    for t in (20, 50, 60):  # flip the raw SVD outputs of some checkpoints
        ob = tr._obs["layer.q_proj.weight"][float(t)]
        ob.U.neg_()
        ob.V.neg_()
    h = tr.history("layer.q_proj.weight")
    assert torch.equal(h["u_hat"], clean["u_hat"]) and torch.equal(h["v"], clean["v"])
    assert h["flipped"][:, 0].sum() != clean["flipped"][:, 0].sum()


def test_metric_and_step_modes_agree_and_predict_the_truth():
    W0, series, u_true, b = make_series(seed=2, drift=False)
    tr = pyrank.Rank1Tracker()
    metric = lambda t: 0.3 + 0.004 * t  # affine in t  # noqa: E731
    observe_all(tr, W0, series, metric=metric)
    name = "layer.q_proj.weight"
    # û(t) = σ₁(t)·u₁(t) grows along a fixed direction here: it explains the metric, while the
    # unit u₁ (AlphaRL's reported R², the default) is constant up to noise and cannot
    assert tr.r2_metric(name, vector="u_hat") > 0.999
    assert tr.r2_metric(name) < 0.9
    for t in tr.steps(name):  # a constant metric explains nothing: R² is undefined, not an error
        tr.set_metric(t, 0.5)
    assert math.isnan(tr.r2_metric(name)) and math.isnan(tr.r2_metric(name, vector="u_hat"))
    with pytest.raises(ValueError, match="constant"):
        tr.extrapolate(target_metric=0.6)
    observe_all(tr, W0, series, metric=metric)
    window = (10, 40)  # the first 40% of the run
    p_step = tr.extrapolate(to_step=100, window=window, base="initial")
    p_metric = tr.extrapolate(target_metric=metric(100), window=window, base="initial")
    fs, fm = p_step.factors[name], p_metric.factors[name]
    assert torch.allclose(fs.U, fm.U, rtol=1e-3, atol=1e-4 * float(fs.U.norm()))
    assert torch.equal(fs.V, fm.V)
    pred = (fs.U.double() @ fs.V.double().T)
    truth = torch.outer(u_true(100), b)
    truth *= math.copysign(1.0, float((pred * truth).sum()))
    assert (pred - truth).norm() <= 0.05 * truth.norm()
    assert p_step.applies_to is None and p_step.info["window"] == [10, 40]


def test_apply_equals_fp32_reference_rounded_once():
    W0, series, _, _ = make_series(seed=3)
    tr = pyrank.Rank1Tracker()
    observe_all(tr, W0, series)
    name = "layer.q_proj.weight"
    pred = tr.extrapolate(to_step=150, window=(10, 50), base="last", update="growth", scale=0.7)
    assert pred.applies_to == 50.0
    f = pred.factors[name]
    h = tr.history(name)
    i = h["steps"].index(50.0)
    # update="growth": W_k + λ(û*·v₁ᵀ − û(k)·v₁(k)ᵀ) with v₁ from step k
    u_star = pred.factors[name].U[:, 0].double() + h["u_hat"][i].double()
    assert torch.equal(f.V[:, 0], h["v"][i, :, 0])
    weights = {name: series[50], "other": torch.arange(4.0)}
    out = pred.apply(weights)
    assert set(out) == {name, "other"} and out["other"] is weights["other"]
    W = out[name]
    assert W.dtype == torch.bfloat16
    ref = (series[50].float() + 0.7 * (f.U @ f.V.T)).to(torch.bfloat16)
    assert merge_within_bound(W, ref, series[50], f.U, f.S, f.V, 0.7)
    assert (W == ref).double().mean() >= 0.99
    expect = series[50].double() + 0.7 * torch.outer(u_star - h["u_hat"][i].double(), h["v"][i, :, 0].double())
    assert (W.double() - expect).abs().max() <= 2 * 2**-8 * expect.abs().max()


def test_extrapolate_errors():
    W0, series, _, _ = make_series(seed=4)
    tr = pyrank.Rank1Tracker()
    with pytest.raises(ValueError, match="no module has been observed"):
        tr.extrapolate(to_step=5)
    observe_all(tr, W0, series)
    with pytest.raises(ValueError, match="exactly one of"):
        tr.extrapolate()
    with pytest.raises(ValueError, match="exactly one of"):
        tr.extrapolate(to_step=5, target_metric=0.5)
    with pytest.raises(ValueError, match="holds 2 checkpoints"):
        tr.extrapolate(to_step=200, window=(10, 20))
    with pytest.raises(ValueError, match="holds 0 checkpoints with a metric"):
        tr.extrapolate(target_metric=0.9)
    with pytest.raises(ValueError, match="base must be"):
        tr.extrapolate(to_step=200, base="middle")
    with pytest.raises(ValueError, match="has shape"):
        tr.observe(200, {"layer.q_proj.weight": torch.zeros(3, 3)}, {"layer.q_proj.weight": W0})
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = series[10].clone()
        bad[0, 0] = float("nan")
        tr.observe(7, {"layer.q_proj.weight": bad}, {"layer.q_proj.weight": W0})


def test_resume_equals_uninterrupted(tmp_path):
    W0, series, _, _ = make_series(seed=5)
    metric = lambda t: 0.1 + 0.003 * t + (0.01 if t == 40 else 0.0)  # noqa: E731
    full = pyrank.Rank1Tracker(k=2)
    observe_all(full, W0, series, metric=metric)
    part = pyrank.Rank1Tracker(k=2)
    observe_all(part, W0, series, order=STEPS[:5], metric=metric)
    part.save(str(tmp_path / "tr"))
    part.save(str(tmp_path / "tr"))  # overwriting a saved tracker is atomic too
    resumed = pyrank.Rank1Tracker.load(str(tmp_path / "tr"))
    observe_all(resumed, W0, series, order=STEPS[5:], metric=metric)
    name = "layer.q_proj.weight"
    a, b = full.history(name), resumed.history(name)
    for key in ("sigma", "u", "v", "fro", "residual", "metric"):
        assert torch.equal(a[key], b[key]), key
    assert a["passes"] == b["passes"]
    assert full.summary() == resumed.summary()
    pa = full.extrapolate(target_metric=0.5, window=(10, 60))
    pb = resumed.extrapolate(target_metric=0.5, window=(10, 60))
    assert torch.equal(pa.factors[name].U, pb.factors[name].U)
    pa.save(str(tmp_path / "pred"))
    back = pyrank.Prediction.load(str(tmp_path / "pred"))
    assert torch.equal(back.factors[name].U, pa.factors[name].U) and back.applies_to == pa.applies_to
    with pytest.raises(FileNotFoundError, match="not a saved Rank1Tracker"):
        pyrank.Rank1Tracker.load(str(tmp_path))


def test_pls_matches_sklearn():
    from sklearn import cross_decomposition as sk
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 30, generator=g, dtype=torch.float64)
    X[:, 3] = 1.0  # a constant column
    y = (X[:, :5] @ torch.randn(5, generator=g, dtype=torch.float64) + 0.1 * torch.randn(8, generator=g)).tolist()
    ours = PLS1(X, y)
    pls = sk.PLSRegression(n_components=1).fit(X.numpy(), y)
    z = torch.from_numpy(pls.transform(X.numpy())[:, 0])
    zc = z - z.mean()
    yt = torch.tensor(y, dtype=torch.float64)
    a = float(zc @ (yt - yt.mean())) / float(zc @ zc)
    b = float(yt.mean()) - a * float(z.mean())
    r2 = 1 - float(((yt - a * z - b) ** 2).sum()) / float(((yt - yt.mean()) ** 2).sum())
    assert abs(ours.r2 - r2) < 1e-10
    target = 1.7
    ref = torch.from_numpy(pls.inverse_transform(torch.tensor([[(target - b) / a]]).numpy()))[0]
    # sklearn finds the weights by NIPALS iterations (tol 1e-6); ours are the closed form
    assert torch.allclose(ours.invert(target), ref, rtol=1e-5, atol=1e-8)


def test_r2_in_step_needs_three_points():
    assert math.isnan(r2_in_step([1, 2], torch.randn(2, 4)))
    X = torch.arange(5.0)[:, None] * torch.tensor([1.0, -2.0])
    assert r2_in_step(range(5), X) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
def test_rank_k_reconstruction(dtype, k):
    W0, series, _, _ = make_series(seed=6)
    W0, Wt = W0.to(dtype), series[100].to(dtype)
    out = pyrank.rank_k_reconstruction(W0, Wt, k=k, scale=0.7)
    D = exact_delta(Wt, W0)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    alpha = D.norm() / S[:k].norm()
    ref = W0.double() + 0.7 * alpha * (U[:, :k] * S[:k]) @ Vh[:k]
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= 2 * torch.finfo(dtype).eps * ref.abs().max() + 1e-4 * float(D.norm())
    plain = pyrank.rank_k_reconstruction(W0, Wt, k=k, norm_match=False)
    ref1 = W0.double() + (U[:, :k] * S[:k]) @ Vh[:k]
    assert (plain.double() - ref1).abs().max() <= 2 * torch.finfo(dtype).eps * ref1.abs().max() + 1e-4 * float(D.norm())


def test_temporal_extrapolation_matches_dense_reference():
    g = torch.Generator().manual_seed(7)
    W0 = (torch.randn(40, 30, generator=g) * 0.02).to(torch.float32)
    Dir = torch.randn(40, 30, generator=g)
    steps = [1, 2, 3, 4]
    cks = [{"w": W0 + (0.01 * t + 0.002 * (-1) ** t) * Dir, "b": torch.ones(2)} for t in steps]
    base = {"w": W0, "b": torch.ones(2)}
    out = pyrank.temporal_extrapolate(base, cks, steps, to_step=8)
    assert set(out) == {"w", "b"} and torch.equal(out["b"], base["b"])
    # dense reference: SVD of the T × (m·n) matrix of flattened deltas
    Mx = torch.stack([(c["w"].double() - W0.double()).reshape(-1) for c in cks])
    Ua, Sa, Vha = torch.linalg.svd(Mx, full_matrices=False)
    c = Ua[:, 0] * Sa[0]
    if float(c.sum()) < 0:
        c, Vh0 = -c, -Vha[0]
    else:
        Vh0 = Vha[0]
    t = torch.tensor(steps, dtype=torch.float64)
    slope = float(((t - t.mean()) * (c - c.mean())).sum() / ((t - t.mean()) ** 2).sum())
    cT = float(c.mean()) + slope * (8 - float(t.mean()))
    ref = W0.double() + cT * Vh0.reshape(40, 30)
    assert torch.allclose(out["w"].double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        pyrank.temporal_extrapolate(base, cks[:1], steps[:1], 5)


def test_temporal_coefficients_exact_for_rank1_in_time():
    # ΔW_t = t·D exactly: β puts the prediction at T·D
    G = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])).double() * 4.0
    beta = temporal_coefficients(G, [1, 2, 3], 6)
    # Σ β_t ΔW_t = Σ β_t t D  ⇒ Σ β_t t = 6
    assert abs(float(beta @ torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)) - 6.0) < 1e-9


def test_save_after_a_zero_update(tmp_path):
    # A zero ΔW returns the warm basis as the result's own tensors; saving must still work.
    W0 = torch.randn(6, 5).to(torch.bfloat16)
    tr = pyrank.Rank1Tracker()
    tr.observe(1, {"layer.q_proj.weight": W0.clone()}, {"layer.q_proj.weight": W0})
    tr.save(str(tmp_path / "tr"))
    back = pyrank.Rank1Tracker.load(str(tmp_path / "tr"))
    assert float(back.history("layer.q_proj.weight")["sigma"][0, 0]) == 0.0


def test_official_update_and_float32_output():
    """AlphaRL's reference code: W_k + λ·û*·v_kᵀ, the model kept in float32 (every floating
    tensor, not only the predicted ones); growth differs from it by exactly λ·û(k)·v_kᵀ."""
    W0, series, _, _ = make_series(seed=4)
    tr = pyrank.Rank1Tracker()
    observe_all(tr, W0, series)
    name = "layer.q_proj.weight"
    official = tr.extrapolate(to_step=150, window=(10, 50), scale=0.7)  # the defaults: last, official
    growth = tr.extrapolate(to_step=150, window=(10, 50), update="growth", scale=0.7)
    assert official.info["update"] == "official" and official.applies_to == 50.0
    h = tr.history(name)
    i = h["steps"].index(50.0)
    fo, fg = official.factors[name], growth.factors[name]
    assert torch.allclose(fo.U[:, 0] - fg.U[:, 0], h["u_hat"][i], atol=1e-6 * float(h["u_hat"][i].norm()))
    weights = {name: series[50], "other": torch.arange(4.0).bfloat16(), "ids": torch.arange(3)}
    out = official.apply(weights, dtype=torch.float32)
    assert out[name].dtype == torch.float32 and out["other"].dtype == torch.float32
    assert out["ids"].dtype == torch.int64  # only floating tensors change dtype
    want = series[50].float() + 0.7 * (fo.U @ fo.V.T)
    assert torch.allclose(out[name], want, rtol=0, atol=1e-6 * float(want.abs().max()))
    with pytest.raises(ValueError, match="needs base='last'"):
        tr.extrapolate(to_step=150, base="initial", update="growth")
    with pytest.raises(ValueError, match="to_step must be finite"):
        tr.extrapolate(to_step=float("inf"))


def test_r2_metric_the_official_way():
    """AlphaRL's reference pipeline (StandardScaler, PLSRegression(n_components=1, scale=False),
    LinearRegression on the score, r2_score) on the unit, sign-aligned u₁(t) — here a direction
    that turns with training while σ₁ stays put, so only u₁ carries the metric — and on û(t)."""
    pytest.importorskip("sklearn")
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(5)
    a, a2 = random_orthonormal(M, 2, g).T
    b = random_orthonormal(N, 1, g)[:, 0]
    W0 = (torch.randn(M, N, generator=g, dtype=torch.float64) * 0.02).to(torch.bfloat16)
    tr = pyrank.Rank1Tracker()
    metric = {}
    for t in STEPS:
        th = 0.004 * t
        dW = 0.2 * torch.outer(math.cos(th) * a + math.sin(th) * a2, b) + 2e-5 * torch.randn(M, N, generator=g,
                                                                                             dtype=torch.float64)
        metric[t] = 0.3 + 0.002 * t + 0.01 * math.sin(t)  # not exactly linear: R² < 1
        tr.observe(t, {"w": (W0.double() + dW).to(torch.bfloat16)}, {"w": W0}, metric=metric[t])
    h = tr.history("w")
    y = [metric[t] for t in STEPS]
    for vector, X in (("u", h["u"][:, :, 0]), ("u_hat", h["u_hat"])):
        Xs = StandardScaler().fit_transform(X.double().numpy())
        z = PLSRegression(n_components=1, scale=False).fit(Xs, y).x_scores_
        want = r2_score(y, LinearRegression().fit(z, y).predict(z))
        assert tr.r2_metric("w", vector=vector) == pytest.approx(want, abs=1e-6)
    assert tr.r2_metric("w") > 0.9
    with pytest.raises(ValueError, match="vector must be"):
        tr.r2_metric("w", vector="v")
