"""pyrank's Triton kernels, installed as ``pyrank.triton_kernels``.

Never importable as a top-level ``triton_kernels`` (Triton's own project ships a
package of that name). Importing this package does not import triton.
"""
