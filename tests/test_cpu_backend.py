"""The C++ backend specifically: every SIMD variant built here, threads, layouts."""
import pytest
import torch

from pyrank import ops

from helpers import DT_ID, make_pair, merge_within_bound
from test_ops import _check_all, _merge_reference

_C = pytest.importorskip("pyrank._C", reason="pyrank._C not built (PYRANK_SKIP_CPP=1)")
VARIANTS = _C.isa_variants()


@pytest.fixture(params=VARIANTS)
def variant(request):
    before = _C.selected_isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)


def test_best_variant_selected_and_portable_one_built():
    assert "scalar" in VARIANTS  # the path every x86-64 (and non-x86) machine can run
    assert _C.selected_isa() == VARIANTS[-1]
    with pytest.raises(RuntimeError, match="no kernel variant named"):
        _C.set_isa("sse1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("shape_k", [(1, 1, 1), (7, 300, 3), (41, 9, 17), (300, 257, 40)],
                         ids=lambda s: f"m{s[0]}-n{s[1]}-k{s[2]}")
def test_every_variant_matches_reference(variant, dtype, layout, shape_k):
    m, n, k = shape_k  # k ≥ 16 reaches the 32-row tile path, odd m its padding rows
    A, B = make_pair(m, n, dtype, seed=k, layout=layout)
    _check_all("cpu", A, B, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_ID.get)
@pytest.mark.parametrize("with_base", [True, False], ids=["A-B", "A"])
@pytest.mark.parametrize("k", [2, 4, 5])
def test_every_variant_both_kernel_paths(variant, dtype, with_base, k):
    """Products of ≤ 4 columns a side take the register-only path on AVX2/AVX-512, wider ones
    the tiled path (_check_all's Y is k + 1 wide, so k = 4 mixes them); 29 rows leave padding
    rows in every row block, 83 columns a partial vector."""
    A, B = make_pair(29, 83, dtype, seed=k, with_base=with_base)
    _check_all("cpu", A, B, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_ID.get)
def test_every_variant_merges_like_reference(variant, dtype):
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(70, 301, generator=g) * 0.02).to(dtype)
    U, S, V = torch.randn(70, 5, generator=g), torch.rand(5, generator=g), torch.randn(301, 5, generator=g)
    out = ops.merge_lowrank(W, U, S, V, 0.003, backend="cpu")
    ref = _merge_reference(W, U, S, V, 0.003)
    if dtype != torch.float32:
        assert (out == ref).double().mean().item() >= 0.99
    assert merge_within_bound(out, ref, W, U, S, V, 0.003)


def test_bf16_merge_special_values(variant):
    """Denormals round exactly in every variant (vcvtneps2bf16 alone would flush them), and
    NaN stays NaN (its payload bits are not part of the contract)."""
    W = torch.tensor([[1e-39, -3e-40, float("nan"), 1.0] * 8], dtype=torch.float32).to(torch.bfloat16)
    zero = torch.zeros(1, 1), torch.zeros(1), torch.zeros(32, 1)
    out = ops.merge_lowrank(W, *zero, backend="cpu")
    ref = _merge_reference(W, *zero, 1.0)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), ref[~nan].view(torch.int16))


def _within_rounding(got, want, D, M):
    """|got − want| ≤ 1e-6 · |D|·|M| entrywise: fp32 rounding of the sums of a product D·M."""
    return bool(((got.double() - want.double()).abs() <= 1e-6 * (D.abs() @ M.double().abs())).all())


def _layouts(T):
    """T (rows × cols) as the solver and users hand it over: row-major, column-major (what QR
    returns), every other row of a taller buffer, columns of a wider one, and a broadcast row."""
    rows, cols = T.shape
    tall = torch.zeros(2 * rows, cols)
    tall[::2] = T
    wide = torch.zeros(rows, cols + 5)
    wide[:, 2:2 + cols] = T
    return {"row-major": T.contiguous(), "column-major": T.t().contiguous().t(), "row-strided": tall[::2],
            "in-wider": wide[:, 2:2 + cols], "broadcast": T[:1].expand(rows, cols)}


@pytest.mark.parametrize("cols", [3, 40], ids=["few-columns", "tiled"])
def test_every_variant_takes_operands_of_any_strides(variant, cols):
    """The kernels read X and Y through their strides (no transposing copy on the way in) and
    write Δᵀ·Y as rows: every layout gives the row-major operand's result, bitwise."""
    A, B = make_pair(67, 131, torch.bfloat16, seed=cols)
    g = torch.Generator().manual_seed(cols)
    X, Y = torch.randn(131, cols, generator=g), torch.randn(67, cols + 1, generator=g)
    D = A.double() - B.double()
    xs, ys = _layouts(X), _layouts(Y)
    for name in xs:
        x, y = xs[name], ys[name]
        ox, oy = ops.delta_mm_both(A, B, x, y, backend="cpu")
        assert ox.is_contiguous() and oy.is_contiguous(), name
        ref_x, ref_y = ops.delta_mm_both(A, B, x.contiguous(), y.contiguous(), backend="cpu")
        assert torch.equal(ox, ref_x) and torch.equal(oy, ref_y), name
        assert _within_rounding(ox, D @ x.double(), D, x), name
        assert _within_rounding(oy, D.T @ y.double(), D.T, y), name


def test_scratch_reuse_across_sizes_and_threads():
    """Each calling thread keeps its kernel scratch between calls (fresh pages cost a fault
    each): a call after a larger or a smaller one gives the same bits as the first call of
    its shape, and calls from several threads at once the same results (Δ·X bitwise; Δᵀ·Y
    to rounding, since a new thread's OpenMP team may have another size)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [_operands(m, n, c) for m, n, c in ((300, 257, 40), (29, 83, 2), (61, 1031, 9))]
    first = [ops.delta_mm_both(A, B, X, Y, backend="cpu") for A, B, X, Y in cases]
    again = [ops.delta_mm_both(A, B, X, Y, backend="cpu") for A, B, X, Y in reversed(cases)][::-1]
    for (ox, oy), want in zip(again, first):
        assert torch.equal(ox, want[0]) and torch.equal(oy, want[1])
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda c: ops.delta_mm_both(*c, backend="cpu"), cases * 4))
    for i, (ox, oy) in enumerate(threaded):
        (A, B, _, Y), want = cases[i % len(cases)], first[i % len(cases)]
        assert torch.equal(ox, want[0])
        assert _within_rounding(oy, want[1], (A.double() - B.double()).T, Y)


def test_scratch_beyond_what_a_thread_keeps():
    """A call whose scratch (padded X plus the threads' Δᵀ·Y accumulators) exceeds the 64 MiB
    a thread keeps allocates it for the call alone: same results as the float64 product."""
    g = torch.Generator().manual_seed(7)
    m, n, k = 5, 100_003, 96  # X alone is 37 MiB; with the accumulators well over 64 MiB
    A = torch.randn(m, n, generator=g).to(torch.bfloat16)
    B = torch.randn(m, n, generator=g).to(torch.bfloat16)
    X, Y = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    D = A.double() - B.double()
    ox, oy = ops.delta_mm_both(A, B, X, Y, backend="cpu")
    assert _within_rounding(ox, D @ X.double(), D, X)
    assert _within_rounding(oy, D.T @ Y.double(), D.T, Y)
    # and a small call after it still gets a kept scratch of the right size
    _check_all("cpu", *make_pair(29, 83, torch.bfloat16, seed=1), 5)


def _operands(m, n, cols):
    """A bf16 pair (m × n) and the blocks X (n × cols), Y (m × cols) the thread tests multiply."""
    A, B = make_pair(m, n, torch.bfloat16, seed=2)
    g = torch.Generator().manual_seed(3)
    return A, B, torch.randn(n, cols, generator=g), torch.randn(m, cols, generator=g)


def test_threads_do_not_change_results_beyond_rounding():
    A, B, X, Y = _operands(257, 129, 6)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.delta_mm_both(A, B, X, Y, backend="cpu")
        torch.set_num_threads(max(2, old))
        many = ops.delta_mm_both(A, B, X, Y, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0])  # rows are never split across threads
    # Δᵀ·Y sums over rows split between threads: equal up to fp32 rounding of |Δ|ᵀ|Y|
    assert _within_rounding(one[1], many[1], (A.double() - B.double()).T, Y)


def test_serial_small_ops_keeps_the_kernels_threads():
    """The series loop runs torch's own ops on one thread and the kernels on the threads
    torch had: inside serial_small_ops the kernels' results are bitwise those of the same
    thread count outside, and torch's count comes back on exit, on an error too."""
    from pyrank.backends import kernel_threads, serial_small_ops

    A, B, X, Y = _operands(1031, 129, 3)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        outside = ops.delta_mm_both(A, B, X, Y, backend="cpu")
        with pytest.raises(RuntimeError, match="boom"):
            with serial_small_ops():
                assert torch.get_num_threads() == 1 and kernel_threads() == 2
                with serial_small_ops():  # nested: still the outer count
                    assert torch.get_num_threads() == 1 and kernel_threads() == 2
                inside = ops.delta_mm_both(A, B, X, Y, backend="cpu")
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2 and kernel_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outside[0], inside[0]) and torch.equal(outside[1], inside[1])


def test_float64_is_computed_in_float64():
    A, B = make_pair(20, 30, torch.float64, seed=0)
    X = torch.randn(30, 2, dtype=torch.float64)
    out = ops.delta_mm(A, B, X, backend="cpu")
    assert out.dtype == torch.float64
    assert torch.allclose(out, (A - B) @ X, rtol=1e-12, atol=1e-12)
