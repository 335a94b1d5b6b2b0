"""Every backend's primitives against a float64 dense reference."""
import os

import pytest
import torch
from hypothesis import given, strategies as st

import pyrank
from pyrank import ops

from helpers import DT_ID, DTYPES, compute_eps, exact_delta, make_pair, merge_within_bound, rel_err

BACKENDS = [b for b, why in ops.backend_status().items() if why is None]
REQUIRED = [b for b in os.environ.get("PYRANK_REQUIRE_BACKENDS", "").split(",") if b]


def test_required_backends_are_available():
    """CI sets PYRANK_REQUIRE_BACKENDS so that a broken build cannot hide behind skips."""
    status = ops.backend_status()
    missing = {b: status.get(b, "unknown backend") for b in REQUIRED if status.get(b) is not None}
    assert not missing, f"required backends unavailable: {missing}"


def _tol(dtype, n):
    # fp32 accumulation of n terms: error grows ~ sqrt(n)·eps relative to the result's norm
    return 20 * compute_eps(dtype) * max(1.0, n) ** 0.5


def _check_all(backend, A, B, k, seed=0):
    m, n = A.shape
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g)
    Y = torch.randn(m, k + 1, generator=g)  # different widths on purpose
    D = exact_delta(A, B)
    tol = _tol(A.dtype, max(m, n))
    assert rel_err(ops.delta_mm(A, B, X, backend=backend), D @ X.double()) <= tol
    assert rel_err(ops.delta_mm_t(A, B, Y, backend=backend), D.T @ Y.double()) <= tol
    ox, oy = ops.delta_mm_both(A, B, X, Y, backend=backend)
    assert rel_err(ox, D @ X.double()) <= tol
    assert rel_err(oy, D.T @ Y.double()) <= tol
    ref_sq = (D**2).sum().item()
    sq = ops.delta_sqnorm(A, B, backend=backend)
    assert sq.dim() == 0
    assert abs(sq.item() - ref_sq) <= tol * max(ref_sq, 1e-30)
    # the norm from the same read as a product
    px, s1 = ops.delta_mm(A, B, X, sqnorm=True, backend=backend)
    py, s2 = ops.delta_mm_t(A, B, Y, sqnorm=True, backend=backend)
    bx, by, s3 = ops.delta_mm_both(A, B, X, Y, sqnorm=True, backend=backend)
    # (same values; the Triton grid, and so the summation order, depends on what is asked)
    for got, want in ((px, ox), (bx, ox), (py, oy), (by, oy)):
        assert rel_err(got, want) <= tol
    for s in (s1, s2, s3):
        assert abs(s.item() - ref_sq) <= tol * max(ref_sq, 1e-30)
    # the changed count from the same read: exact, whichever product carries it
    want = int(torch.count_nonzero(D))
    assert ops.delta_mm(A, B, X, nnz=True, backend=backend)[1] == want
    assert ops.delta_mm_t(A, B, Y, sqnorm=True, nnz=True, backend=backend)[2] == want
    assert ops.delta_mm_both(A, B, X, Y, nnz=True, backend=backend)[2] == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape_k", [(1, 7, 1), (13, 1, 3), (67, 131, 8), (257, 61, 16), (97, 203, 128)],
                         ids=lambda s: f"m{s[0]}-n{s[1]}-k{s[2]}")
def test_primitives_match_reference(backend, dtype, layout, shape_k):
    m, n, k = shape_k
    A, B = make_pair(m, n, dtype, seed=m * n + k, layout=layout)
    _check_all(backend, A, B, k)


@pytest.mark.parametrize("backend", BACKENDS)
@given(m=st.integers(1, 40), n=st.integers(1, 90), frac=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
       dtype=st.sampled_from(DTYPES), k=st.sampled_from([1, 3, 9]), seed=st.integers(0, 2**16),
       transposed=st.booleans())
def test_changed_count_is_exact(backend, m, n, frac, dtype, k, seed, transposed):
    """#{A ≠ B} from a product's read equals a float64 count: sparse updates, ±0 (equal as
    numbers), tails shorter than a vector, the SIMD and the tiled paths (k = 9), views."""
    if backend == "triton" and m * n > 600:
        return  # the interpreter is slow; small shapes cover its masks
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g).to(dtype)
    B = A.clone()
    hit = torch.rand(m, n, generator=g) < frac
    B[hit] = (A[hit].double() * 1.01 + 1e-3).to(dtype)
    A[0, 0], B[0, 0] = 0.0, -0.0
    want = int(torch.count_nonzero(A.double() - B.double()))
    if transposed:
        A, B = A.t().contiguous().t(), B.t().contiguous().t()
    X = torch.randn(n, k, generator=g)
    got = ops.delta_mm(A, B, X, nnz=True, backend=backend)[1]
    assert got == want
    assert pyrank.svd_lowrank(A, 1, base=B, fro=True, backend=backend, max_passes=1).nnz == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_none_and_mixed_layouts(backend):
    A, _ = make_pair(31, 47, torch.bfloat16, layout="contiguous", with_base=False)
    _check_all(backend, A, None, 5)
    B, _ = make_pair(31, 47, torch.bfloat16, seed=3, layout="transposed", with_base=False)
    _check_all(backend, A, B, 5)  # A row-major, B column-major


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    m=st.integers(1, 90), n=st.integers(1, 90), k=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_primitives_hypothesis(backend, m, n, k, dtype, layout, seed):
    A, B = make_pair(m, n, dtype, seed=seed, layout=layout)
    _check_all(backend, A, B, k, seed=seed)


def _merge_reference(W, U, S, V, alpha):
    cd = torch.float64 if W.dtype == torch.float64 else torch.float32
    return (W.to(cd) + alpha * (U.to(cd) * S.to(cd)) @ V.to(cd).T).to(W.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape_k", [(1, 1, 1), (5, 123, 3), (123, 5, 7), (257, 300, 16)],
                         ids=lambda s: f"m{s[0]}-n{s[1]}-k{s[2]}")
def test_merge_lowrank_rounds_once(backend, dtype, shape_k):
    m, n, k = shape_k
    g = torch.Generator().manual_seed(k)
    W = (torch.randn(m, n, generator=g) * 0.02).to(dtype)
    U, S, V = torch.randn(m, k, generator=g), torch.rand(k, generator=g), torch.randn(n, k, generator=g)
    ref = _merge_reference(W, U, S, V, 0.01)
    out = ops.merge_lowrank(W, U, S, V, 0.01, backend=backend)
    # the only rounding is the final one: at most one ulp of disagreement from fp32
    # summation order, and bitwise equality almost everywhere
    assert merge_within_bound(out, ref, W, U, S, V, 0.01)
    if dtype in (torch.bfloat16, torch.float16):  # rounding dominates: bitwise equal almost always
        assert (out == ref).double().mean().item() >= 0.99
    assert out.dtype == dtype and out.shape == W.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_lowrank_in_place_and_out(backend):
    W, _ = make_pair(40, 33, torch.bfloat16, layout="transposed", with_base=False)
    U, S, V = torch.randn(40, 2), torch.ones(2), torch.randn(33, 2)
    expected = ops.merge_lowrank(W, U, S, V, -0.5, backend=backend)  # out of place
    assert not torch.equal(expected, W)
    dst = torch.empty_like(W)
    assert ops.merge_lowrank(W, U, S, V, -0.5, out=dst, backend=backend) is dst
    assert torch.equal(dst, expected)
    assert ops.merge_lowrank(W, U, S, V, -0.5, out=W, backend=backend) is W  # in place, strided W
    assert torch.equal(W, expected)
    big = torch.zeros(41, 33, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="overlaps"):
        ops.merge_lowrank(big[:40], U, S, V, 1.0, out=big[1:], backend=backend)


def test_validation_errors_name_the_tensor():
    A = torch.randn(4, 5)
    with pytest.raises(ValueError, match="B has shape"):
        ops.delta_mm(A, torch.randn(5, 4), torch.randn(5, 1))
    with pytest.raises(TypeError, match="B has dtype"):
        ops.delta_mm(A, A.double(), torch.randn(5, 1))
    with pytest.raises(ValueError, match="A must be 2-D"):
        ops.delta_mm(torch.randn(3), None, torch.randn(3, 1))
    with pytest.raises(TypeError, match="A has dtype torch.int64"):
        ops.delta_mm(torch.ones(2, 2, dtype=torch.long), None, torch.randn(2, 1))
    with pytest.raises(ValueError, match=r"X must have shape \(5, k\)"):
        ops.delta_mm(A, None, torch.randn(4, 1))
    with pytest.raises(ValueError, match=r"Y must have shape \(4, k\)"):
        ops.delta_mm_t(A, None, torch.randn(5, 1))
    with pytest.raises(ValueError, match="U has 2 columns but V has 3"):
        ops.merge_lowrank(A, torch.randn(4, 2), torch.ones(2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        ops.delta_sqnorm(A, backend="fortran")


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setitem(ops._loaded, "cpu", (None, "pyrank._C is not built (test)"))
    with pytest.raises(pyrank.BackendUnavailable, match="'cpu' is unavailable: pyrank._C is not built"):
        ops.delta_sqnorm(torch.ones(2, 2), backend="cpu")
    # auto falls back to the torch reference instead of failing
    assert ops.resolve_backend("auto", torch.device("cpu"))[0] in ("torch", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("T,mixed", [(4, True), (19, False)], ids=["4-mixed-layouts", "19-contiguous"])
def test_delta_gram(backend, dtype, with_base, T, mixed):
    # 19 contiguous checkpoints take the Triton kernel's fused path in 16-checkpoint blocks
    # (an off-diagonal block included); a column-major weight among them takes the pairwise one
    g = torch.Generator().manual_seed(3)
    B = torch.randn(13, 29, generator=g).to(dtype) if with_base else None
    As = [torch.randn(13, 29, generator=g).to(dtype) for _ in range(T)]
    if mixed:
        As[2] = As[2].t().contiguous().t()
    G = ops.delta_gram(As, B, backend=backend)
    D = torch.stack([exact_delta(A, B).reshape(-1) for A in As])
    ref = D @ D.T
    assert G.dtype == torch.float64 and G.shape == (T, T)
    scale = torch.outer(ref.diagonal(), ref.diagonal()).sqrt()  # ‖ΔA_i‖·‖ΔA_j‖ bounds the rounding
    assert ((G - ref).abs() <= 50 * compute_eps(dtype) * scale).all()
    assert torch.equal(G, G.T)
    with pytest.raises(ValueError, match=r"As\[1\] has shape"):
        ops.delta_gram([As[0], torch.zeros(2, 2, dtype=dtype)], B, backend=backend)
