"""pyrank.torch_svd_lowrank keeps torch.svd_lowrank's contract.

The first test runs the cases and assertions of pytorch's own ``test_svd_lowrank``
(test/test_linalg.py: dense float64 and complex128, batched, sparse, TorchScript) with
``torch.svd_lowrank`` replaced by pyrank's, as a user checking the drop-in would. The others
check what the drop-in adds: a seeded call gives torch's answer (same algorithm, same RNG
draws) while every product of A − M is one fused read, bf16/fp16 inputs, broadcast M read
as a view, and the hand-over to torch wherever pyrank has no kernel.
"""
import pytest
import torch
from hypothesis import example, given, strategies as st

import pyrank
from pyrank import linalg, ops

pytest.importorskip("expecttest")  # torch.testing._internal needs it
from torch.testing._internal.common_utils import random_lowrank_matrix, random_sparse_matrix  # noqa: E402


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_dtype=False)


def _svd_lowrank_subtest(svd_lowrank, actual_rank, size, batches, dtype, density=1.0, with_m=False):
    """One subtest of pytorch's test_svd_lowrank, assertions and tolerances unchanged. With
    ``with_m`` the same low-rank matrix is handed over as A − M (A = a + N, M = N), which
    sends the large cases through pyrank's fused kernels instead of torch's matmuls."""
    rows, columns = size
    if density == 1:
        a = random_lowrank_matrix(actual_rank, rows, columns, *batches, dtype=dtype)
        a_input = a
    else:
        a_input = random_sparse_matrix(rows, columns, density, dtype=dtype)
        a = a_input.to_dense()
    M = None
    if with_m:
        M = torch.randn(a.shape, dtype=dtype)
        a_input = a_input + M
    q = min(*size)
    u, s, v = svd_lowrank(a_input, q=q, niter=3, M=M)
    u, s, v = u[..., :q], s[..., :q], v[..., :q]
    A = (u * s.unsqueeze(-2)).matmul(v.mH)
    _close(A, a, rtol=1e-7, atol=2e-7)
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    V = Vh.mH
    _close(s, S, rtol=5e-7, atol=1e-7)
    if density == 1:  # the top actual_rank subspaces agree: |det(uᴴU)| = |det(vᴴV)| = 1
        u, v = u[..., :actual_rank], v[..., :actual_rank]
        U, V = U[..., :actual_rank], V[..., :actual_rank]
        ones = u.mH.matmul(U).det().abs()
        torch.testing.assert_close(ones, torch.ones_like(ones))
        torch.testing.assert_close(v.mH.matmul(V).det().abs(), torch.ones_like(ones))


PYTORCH_DENSE = [(2, (17, 4)), (4, (17, 4)), (4, (17, 17)), (10, (100, 40)), (7, (1000, 1000))]
PYTORCH_SPARSE = [(17, 4), (4, 17), (17, 17), (100, 40), (40, 100), (1000, 1000)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["fp64", "c128"])
def test_pytorch_test_svd_lowrank_passes(dtype, monkeypatch):
    """pytorch's test_svd_lowrank, every subtest, against the drop-in (monkeypatched in, as
    a user would try it)."""
    monkeypatch.setattr(torch, "svd_lowrank", pyrank.torch_svd_lowrank)
    torch.manual_seed(0)
    for actual_rank, size in PYTORCH_DENSE:
        for batches in ([()] if size == (1000, 1000) else [(), (1,), (3,), (2, 3)]):
            for sz in {size, size[::-1]}:
                _svd_lowrank_subtest(torch.svd_lowrank, actual_rank, sz, batches, dtype)
    for size in PYTORCH_SPARSE:
        for density in (0.005, 0.1):
            _svd_lowrank_subtest(torch.svd_lowrank, None, size, (), dtype, density=density)
    jitted = torch.jit.script(torch.svd_lowrank)  # TorchScript runs torch's implementation
    _svd_lowrank_subtest(jitted, 2, (17, 4), (), dtype)


@pytest.mark.parametrize("size", [(1000, 1000), (1000, 300), (300, 1000)], ids=str)
def test_pytorch_assertions_hold_on_the_fused_path(size, monkeypatch):
    """The same assertions when the matrix arrives as A − M, so pyrank's kernels do the reads."""
    calls = []
    real = linalg._fused_svd_lowrank
    monkeypatch.setattr(linalg, "_fused_svd_lowrank", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(1)
    _svd_lowrank_subtest(pyrank.torch_svd_lowrank, 7, size, (), torch.float64, with_m=True)
    _svd_lowrank_subtest(pyrank.torch_svd_lowrank, 5, size, (2,), torch.float64, with_m=True)
    assert len(calls) == 2


# M shapes that broadcast to (*batch, m, n), as torch.svd_lowrank allows
M_SHAPES = {
    "none": None,
    "full": lambda batch, m, n: (*batch, m, n),
    "column-mean": lambda batch, m, n: (1, n),  # PCA centering: A.mean(-2, keepdim=True)
    "row-mean": lambda batch, m, n: (m, 1),
    "batch-broadcast": lambda batch, m, n: (*batch[:1], *([1] * len(batch[1:])), m, n),
}


@given(
    batch=st.sampled_from([(), (1,), (3,), (2, 2)]),
    m=st.sampled_from([1, 2, 7, 61, 127, 131, 257]), n=st.sampled_from([1, 3, 64, 127, 131, 263]),
    q=st.integers(1, 12), niter=st.integers(0, 4),
    mshape=st.sampled_from(list(M_SHAPES)),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
# shapes that take the fused path, whatever the draw: each orientation, each dtype
@example(batch=(2,), m=257, n=131, q=6, niter=2, mshape="column-mean", dtype=torch.float32, seed=1)
@example(batch=(), m=127, n=263, q=12, niter=3, mshape="full", dtype=torch.float64, seed=2)
@example(batch=(3,), m=131, n=131, q=1, niter=0, mshape="batch-broadcast", dtype=torch.bfloat16, seed=3)
@example(batch=(), m=257, n=64, q=9, niter=4, mshape="none", dtype=torch.float16, seed=4)
@example(batch=(), m=1, n=263, q=5, niter=2, mshape="row-mean", dtype=torch.bfloat16, seed=5)
def test_seeded_call_gives_torchs_answer(batch, m, n, q, niter, mshape, dtype, seed):
    """Same algorithm and the same random draws as torch.svd_lowrank: to rounding, the same
    singular values and the same rank-k approximation (vectors compared only through it).
    bf16/fp16 inputs, which torch cannot take, against torch on their float32 copies."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, m, n, generator=g, dtype=torch.float64).to(dtype)
    M = None if M_SHAPES[mshape] is None else torch.randn(
        M_SHAPES[mshape](batch, m, n), generator=g, dtype=torch.float64).to(dtype)
    torch.manual_seed(seed)
    U, S, V = pyrank.torch_svd_lowrank(A, q=q, niter=niter, M=M)
    half = dtype in (torch.bfloat16, torch.float16)
    At, Mt = (A.float(), None if M is None else M.float()) if half else (A, M)
    torch.manual_seed(seed)
    Ut, St, Vt = torch.svd_lowrank(At, q=q, niter=niter, M=Mt)
    k = min(q, m, n)
    assert U.shape == (*batch, m, k) and S.shape == (*batch, k) and V.shape == (*batch, n, k)
    assert U.dtype == S.dtype == V.dtype == (torch.float32 if half else dtype)
    scale = float(St.abs().max()) if St.numel() else 0.0
    tol = (1e-10 if dtype == torch.float64 else 2e-4) * scale + 1e-12
    assert float((S.double() - St.double()).abs().max()) <= tol
    approx = (U.double() * S.double()[..., None, :]) @ V.double().mT
    approx_t = (Ut.double() * St.double()[..., None, :]) @ Vt.double().mT
    assert float((approx - approx_t).abs().max()) <= tol


def _route(monkeypatch):
    """Record which way the drop-in ran each call."""
    seen = []
    real = linalg._dropin_route
    monkeypatch.setattr(linalg, "_dropin_route", lambda A, M: seen.append(real(A, M)) or seen[-1])
    return seen


def test_routes(monkeypatch):
    seen = _route(monkeypatch)
    big, small = torch.randn(300, 200), torch.randn(40, 30)
    cases = [
        ((big, big * 0.5), "pyrank"),                  # the ΔW case: A − M in fused reads
        ((big.bfloat16(), None), "pyrank"),            # torch cannot take bf16 at all
        ((small.bfloat16(), small.bfloat16()), "upcast"),
        ((big, None), "torch"),                        # fp32 without M: the same reads either way
        ((small, small * 0.5), "torch"),               # below DROPIN_MIN_ELEMS
        ((big.to_sparse(), None), "torch"),
        ((big.to(torch.complex64), None), "torch"),
        ((big.clone().requires_grad_(), big * 0.5), "torch"),  # differentiable, as torch's is
    ]
    for (A, M), want in cases:
        pyrank.torch_svd_lowrank(A, q=3, niter=1, M=M)
        assert seen[-1] == want, (A.layout, A.dtype, want)
    with torch.no_grad():  # no graph wanted: pyrank's kernels again
        pyrank.torch_svd_lowrank(big.clone().requires_grad_(), q=3, niter=1, M=big * 0.5)
    assert seen[-1] == "pyrank"


def test_handed_over_calls_are_torchs_exactly(monkeypatch):
    """Where pyrank hands over, the result is bit for bit torch's (same seed), gradients,
    empty inputs and errors included."""
    A = torch.randn(3, 20, 12, dtype=torch.float64)
    for inp in (A, A.to(torch.complex128), A[0].to_sparse(), torch.zeros(5, 0), torch.zeros(0, 4, 3)):
        torch.manual_seed(7)
        got = pyrank.torch_svd_lowrank(inp, q=2)
        torch.manual_seed(7)
        want = torch.svd_lowrank(inp, q=2)
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    X = torch.randn(30, 20, dtype=torch.float64, requires_grad=True)
    U, S, V = pyrank.torch_svd_lowrank(X, q=3, niter=2)
    S.sum().backward()  # differentiable like torch's
    assert X.grad is not None and bool(torch.isfinite(X.grad).all())
    with pytest.raises(RuntimeError):  # torch's own error for an int matrix
        pyrank.torch_svd_lowrank(torch.ones(3, 3, dtype=torch.int64))
    scripted = torch.jit.script(pyrank.torch_svd_lowrank)
    torch.manual_seed(3)
    got = scripted(A, 4, 2, None)
    torch.manual_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(got, torch.svd_lowrank(A, 4, 2)))


def test_rank_deficient_full_q_returns(monkeypatch):
    """q close to min(m, n) on a rank-7 matrix: a fixed amount of work, no retry loop (the
    tolerance-driven version of the drop-in never returned here)."""
    torch.manual_seed(0)
    a = torch.randn(100, 7, dtype=torch.float64) @ torch.randn(7, 100, dtype=torch.float64)
    m = torch.randn(100, 100, dtype=torch.float64)
    for A, M in ((a, None), (a + m, m)):
        U, S, V = pyrank.torch_svd_lowrank(A, q=100, M=M)
        assert S.shape == (100,)
        s = torch.linalg.svdvals(a)
        assert float((S - s).abs().max()) <= 1e-9 * float(s[0])


def test_broadcast_m_is_read_as_a_view(monkeypatch):
    """A (1, n) mean is handed to every product as a stride-0 view of its own storage."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 300, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 200, generator=g,
                                                                            dtype=torch.float64)
    A += 5 * torch.randn(200, generator=g, dtype=torch.float64)  # a mean to remove
    C = A.mean(-2, keepdim=True)
    bases = []
    for name in ("delta_mm", "delta_mm_t"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda A_, B_, X, *, backend, _real=real: bases.append(B_) or
                            _real(A_, B_, X, backend=backend))
    U, S, V = pyrank.torch_svd_lowrank(A, q=3, niter=2, M=C)
    assert len(bases) == 2 * (2 * 2 + 2)  # two matrices, 2·niter + 2 reads each
    for b in bases:
        assert b.stride(0) == 0 and b.untyped_storage().data_ptr() == C.untyped_storage().data_ptr()
    s = torch.linalg.svdvals(A - C)[..., :3]  # PCA centering, as pca_lowrank would materialize it
    assert torch.allclose(S, s, rtol=0, atol=1e-10 * float(s.max()))


@pytest.mark.parametrize("backend", [b for b, why in ops.backend_status().items() if why is None])
def test_fused_path_on_every_backend(backend):
    g = torch.Generator().manual_seed(4)
    A = torch.randn(131, 67, generator=g).bfloat16()
    M = torch.randn(131, 67, generator=g).bfloat16()
    torch.manual_seed(2)
    U, S, V = linalg._fused_svd_lowrank(A, 5, 2, M, backend)
    torch.manual_seed(2)
    Ut, St, Vt = torch.svd_lowrank(A.float(), 5, 2, M.float())
    assert float((S - St).abs().max()) <= 1e-4 * float(St[0])


def test_errors_name_the_argument():
    A = torch.randn(300, 200)
    with pytest.raises(ValueError, match=r"M has shape \(3, 200\), which does not broadcast"):
        pyrank.torch_svd_lowrank(A, M=torch.zeros(3, 200))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="q must be a positive int"):
            pyrank.torch_svd_lowrank(A, q=bad, M=A)
    with pytest.raises(ValueError, match="niter must be"):
        pyrank.torch_svd_lowrank(A, niter=-1, M=A)
