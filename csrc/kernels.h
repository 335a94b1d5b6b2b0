// The interface between pyrank._C's dispatcher and each SIMD variant of csrc/kernels.cpp.
//
// csrc/kernels.cpp is compiled once per variant (scalar, avx2, avx512, avx512bf16), each
// time with its own -m flags and -DPYRANK_ISA=<name>, and exports one function that fills
// a KernelTable. The dispatcher picks a table at run time from the CPU's features.
//
// Conventions: matrices are (pointer, row stride, column stride) in elements; weights are
// bf16 / fp16 (as raw uint16) or fp32; every small operand and output is fp32, laid out as
// each function says. B may be null (then A alone). The caller owns every operand and output (the
// kernels keep only a per-thread scratch of their own: kernels.cpp).
#pragma once
#include <stdint.h>

namespace pyrank {

enum DType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };

struct Mat {
  const void* p;
  int64_t s0, s1;  // element strides of rows and columns
};

struct KernelTable {
  const char* name;
  // out_x (m×kx, row stride oxs) = Δ·X with X (n×kx); out_y (n×ky, row stride oys) = Δᵀ·Y
  // with Y (m×ky); X and Y may have any strides. When sq is not null, *sq = ‖Δ‖_F² and *nz =
  // the number of entries with Δ ≠ 0 in fp32 (A ≠ B as numbers: ±0 are equal). Either product
  // may be skipped (k = 0). One read of A and B serves all. A.s1 == B.s1 == 1 is the fast
  // path; any other strides are gathered.
  void (*delta_products)(int dtype, int64_t m, int64_t n, Mat A, Mat B, Mat X, int64_t kx,
                        float* out_x, int64_t oxs, Mat Y, int64_t ky, float* out_y, int64_t oys,
                        double* sq, int64_t* nz, int nthreads);
  // out = round_to_dtype(W + US·VT), US (m×k) = α·U·diag(S), VT (k×n); out may alias W
  // exactly (same pointer and strides).
  void (*merge_lowrank)(int dtype, int64_t m, int64_t n, Mat W, void* out, int64_t os0,
                        int64_t os1, const float* US, const float* VT, int64_t k, int nthreads);
  // G (T×T, row-major, double) = ⟨A_i − B, A_j − B⟩; one read of every A_i and of B.
  void (*delta_gram)(int dtype, int64_t m, int64_t n, const Mat* As, int64_t T, Mat B,
                     double* G, int nthreads);
};

}  // namespace pyrank

extern "C" {
void pyrank_kernels_scalar(pyrank::KernelTable*);
void pyrank_kernels_avx2(pyrank::KernelTable*);
void pyrank_kernels_avx512(pyrank::KernelTable*);
void pyrank_kernels_avx512bf16(pyrank::KernelTable*);
}
