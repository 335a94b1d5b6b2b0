"""pyrank's Triton kernels, installed as ``pyrank.triton_kernels``.

Never importable as a top-level ``triton_kernels`` (Triton's own project ships a
package of that name). Importing this package does not import triton: the kernel
modules (``delta``, ``merge``) do, and pyrank's dispatcher imports them only when the
triton backend is asked for.

* ``delta.delta_products(A, B, X, Y, sqnorm)`` — (A − B)·X, (A − B)ᵀ·Y, ‖A − B‖_F² in one read
* ``delta.delta_gram(As, B)``          — ⟨A_i − B, A_j − B⟩
* ``merge.merge_lowrank(W, US, V, out)`` — round(W + US·Vᵀ), in place when out is W
"""
