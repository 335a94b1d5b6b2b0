// pyrank's CPU kernels. Compiled once per SIMD variant with -DPYRANK_ISA=<variant> and that
// variant's -m flags (see setup.py); the dispatcher in pyrank_C.cpp picks one at run time.
//
// Everything lives in a namespace named after the variant and only C headers are included:
// no inline function with external linkage is shared between variants, so the linker can
// never substitute an AVX-512 copy of a helper into the portable path.
//
// The work is memory-bound (METHODS.md §6): each kernel reads A and B exactly once, converts
// a block of R rows × J columns of A − B to fp32 into an L1-resident buffer, and uses it for
// every product it was asked for. Vectorization is left to the compiler (`omp simd` loops
// over contiguous fp32 buffers), which is what lets one source serve every ISA.
// A 4-row × 4-column register-blocked micro-kernel (GCC vector extensions, vector partial
// sums kept across chunks) was measured against these one-column sweeps on the 2-core
// AVX-512 VM: 5–30% slower for k = 16–32 and no faster for k ≤ 8, so the simple form stays.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "kernels.h"

#ifndef PYRANK_ISA
#error "compile kernels.cpp with -DPYRANK_ISA=<variant>"
#endif
#define PR_CAT2(a, b) a##b
#define PR_CAT(a, b) PR_CAT2(a, b)
#define PR_STR2(a) #a
#define PR_STR(a) PR_STR2(a)

namespace pyrank {
namespace PYRANK_ISA {

constexpr int64_t R = 8;    // rows per register sweep: R FMAs per accumulator load/store
constexpr int64_t GMAX = 32;  // rows per tile when k is large: X and the Δᵀ·Y accumulators then
                              // stream once per 32 rows instead of once per 8
constexpr int64_t J = 256;  // columns per chunk: G×J fp32 = 32 KiB, stays in L1/L2

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------- element conversion

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float f16_to_f32(uint16_t h) {
  _Float16 x;  // F16C variants compile this to vcvtph2ps; the scalar one to libgcc's routine
  memcpy(&x, &h, 2);
  return (float)x;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN -> torch's canonical quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline uint16_t f32_to_f16(float f) {
  _Float16 h = (_Float16)f;  // IEEE round to nearest even
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}

template <int DT> struct Elem;
template <> struct Elem<kBF16> {
  typedef uint16_t T;
  static inline float load(T v) { return bf16_to_f32(v); }
  static inline T store(float f) { return f32_to_bf16(f); }
};
template <> struct Elem<kF16> {
  typedef uint16_t T;
  static inline float load(T v) { return f16_to_f32(v); }
  static inline T store(float f) { return f32_to_f16(f); }
};
template <> struct Elem<kF32> {
  typedef float T;
  static inline float load(T v) { return v; }
  static inline T store(float f) { return f; }
};

// d[0, len) = A[i, j0 : j0+len) − B[i, j0 : j0+len) in fp32 (B may be null).
template <int DT>
static inline void load_delta(const Mat& A, const Mat& B, int64_t i, int64_t j0, int64_t len,
                              float* __restrict d) {
  typedef typename Elem<DT>::T T;
  const T* a = (const T*)A.p + i * A.s0 + j0 * A.s1;
  if (B.p) {
    const T* b = (const T*)B.p + i * B.s0 + j0 * B.s1;
    if (A.s1 == 1 && B.s1 == 1) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) d[j] = Elem<DT>::load(a[j]) - Elem<DT>::load(b[j]);
    } else {
      for (int64_t j = 0; j < len; ++j)
        d[j] = Elem<DT>::load(a[j * A.s1]) - Elem<DT>::load(b[j * B.s1]);
    }
  } else if (A.s1 == 1) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) d[j] = Elem<DT>::load(a[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) d[j] = Elem<DT>::load(a[j * A.s1]);
  }
}

// ---------------------------------------------------------------- (A − B)·X and (A − B)ᵀ·Y

template <int DT>
static void fused_impl(int64_t m, int64_t n, Mat A, Mat B, const float* XT, int64_t kx,
                       float* out_x, const float* Y, int64_t ky, float* out_yT, double* sq,
                       int nthreads) {
  if (nthreads < 1) nthreads = 1;
  // Δᵀ·Y: each thread accumulates its rows' contribution privately, then one reduction.
  float* acc_all = nullptr;
  if (ky > 0) {
    const int64_t per = ky * n;
    // keep the private accumulators within ~512 MiB whatever the thread count
    while (nthreads > 1 && (int64_t)nthreads * per * 4 > (int64_t(1) << 29)) --nthreads;
    acc_all = (float*)calloc((size_t)nthreads * per, sizeof(float));
    if (!acc_all) abort();
  }
  // Few columns: the pass is memory-bound and 8-row tiles keep 16 row streams for the
  // prefetchers. Many columns: L2 traffic of X and the accumulators dominates; 32-row tiles
  // cut it 4×. (One A/B on 4096×11008 bf16, 2 cores: 32-row tiles made k=1 slower, 7.2 →
  // 9.7 ms, and the k=32 fused pass faster, 80 → 64 ms; this VM's timings vary ±30%.)
  const int64_t G = (kx + ky >= 16) ? GMAX : R;
  const int64_t ntiles = (m + G - 1) / G;
  double sqsum = 0.0;
#pragma omp parallel num_threads(nthreads) reduction(+ : sqsum)
  {
    const int t = omp_get_thread_num();
    float* acc = ky > 0 ? acc_all + (int64_t)t * ky * n : nullptr;
    alignas(64) float dt[GMAX * J];
    float* sx = kx > 0 ? (float*)malloc(sizeof(float) * GMAX * kx) : nullptr;
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t i0 = tile * G, rows = imin(G, m - i0);
      const int64_t nsub = (rows + R - 1) / R;  // 8-row sweeps that hold real rows
      if (kx > 0) memset(sx, 0, sizeof(float) * G * kx);
      for (int64_t j0 = 0; j0 < n; j0 += J) {
        const int64_t len = imin(J, n - j0);
        for (int64_t r = 0; r < nsub * R; ++r) {
          if (r < rows) load_delta<DT>(A, B, i0 + r, j0, len, dt + r * J);
          else memset(dt + r * J, 0, sizeof(float) * len);  // padding rows contribute zero
        }
        if (sq) {  // ‖Δ‖² from the tile already in L1: no extra read of A and B
          for (int64_t r = 0; r < rows; ++r) {
            const float* __restrict dr = dt + r * J;
            float s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < len; ++j) s += dr[j] * dr[j];
            sqsum += s;
          }
        }
        for (int64_t c = 0; c < kx; ++c) {  // Δ·X: R dot products share each load of X
          const float* __restrict x = XT + c * n + j0;
          for (int64_t sb = 0; sb < nsub; ++sb) {
            const float* d = dt + sb * R * J;
            const float *d0 = d, *d1 = d + J, *d2 = d + 2 * J, *d3 = d + 3 * J, *d4 = d + 4 * J,
                        *d5 = d + 5 * J, *d6 = d + 6 * J, *d7 = d + 7 * J;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
            for (int64_t j = 0; j < len; ++j) {
              const float xv = x[j];
              s0 += d0[j] * xv; s1 += d1[j] * xv; s2 += d2[j] * xv; s3 += d3[j] * xv;
              s4 += d4[j] * xv; s5 += d5[j] * xv; s6 += d6[j] * xv; s7 += d7[j] * xv;
            }
            float* sc = sx + sb * R * kx + c;
            sc[0] += s0; sc[kx] += s1; sc[2 * kx] += s2; sc[3 * kx] += s3;
            sc[4 * kx] += s4; sc[5 * kx] += s5; sc[6 * kx] += s6; sc[7 * kx] += s7;
          }
        }
        for (int64_t c = 0; c < ky; ++c) {  // Δᵀ·Y: this accumulator chunk stays hot for G rows
          float* __restrict a = acc + c * n + j0;
          for (int64_t sb = 0; sb < nsub; ++sb) {
            const float* d = dt + sb * R * J;
            const float *d0 = d, *d1 = d + J, *d2 = d + 2 * J, *d3 = d + 3 * J, *d4 = d + 4 * J,
                        *d5 = d + 5 * J, *d6 = d + 6 * J, *d7 = d + 7 * J;
            float y[R];
            for (int64_t r = 0; r < R; ++r) {
              const int64_t row = sb * R + r;
              y[r] = row < rows ? Y[(i0 + row) * ky + c] : 0.0f;
            }
#pragma omp simd
            for (int64_t j = 0; j < len; ++j)
              a[j] += d0[j] * y[0] + d1[j] * y[1] + d2[j] * y[2] + d3[j] * y[3] + d4[j] * y[4] +
                      d5[j] * y[5] + d6[j] * y[6] + d7[j] * y[7];
          }
        }
      }
      for (int64_t r = 0; r < rows && kx > 0; ++r)
        memcpy(out_x + (i0 + r) * kx, sx + r * kx, sizeof(float) * kx);
    }
    free(sx);
  }
  if (sq) *sq = sqsum;
  if (ky > 0) {
    const int64_t total = ky * n;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t idx = 0; idx < total; ++idx) {
      float s = 0;
      for (int t = 0; t < nthreads; ++t) s += acc_all[(int64_t)t * total + idx];
      out_yT[idx] = s;
    }
    free(acc_all);
  }
}

static void delta_mm_both(int dtype, int64_t m, int64_t n, Mat A, Mat B, const float* XT,
                          int64_t kx, float* out_x, const float* Y, int64_t ky, float* out_yT,
                          double* sq, int nthreads) {
  switch (dtype) {
    case kBF16: return fused_impl<kBF16>(m, n, A, B, XT, kx, out_x, Y, ky, out_yT, sq, nthreads);
    case kF16: return fused_impl<kF16>(m, n, A, B, XT, kx, out_x, Y, ky, out_yT, sq, nthreads);
    default: return fused_impl<kF32>(m, n, A, B, XT, kx, out_x, Y, ky, out_yT, sq, nthreads);
  }
}

// ---------------------------------------------------------------- W + U·diag(αS)·Vᵀ

template <int DT>
static inline void store_row(typename Elem<DT>::T* o, int64_t os1, const float* buf, int64_t len) {
  if (os1 != 1) {
    for (int64_t j = 0; j < len; ++j) o[j * os1] = Elem<DT>::store(buf[j]);
    return;
  }
  int64_t j = 0;
#if defined(__AVX512BF16__)
  if (DT == kBF16) {
    // vcvtneps2bf16 rounds to nearest even like the software path, except that it flushes
    // denormals and keeps NaN payloads: such vectors take the software path.
    const __m512 tiny = _mm512_set1_ps(1.17549435e-38f);
    for (; j + 16 <= len; j += 16) {
      const __m512 x = _mm512_loadu_ps(buf + j);
      const __m512 ax = _mm512_abs_ps(x);
      __mmask16 odd = _mm512_cmp_ps_mask(ax, tiny, _CMP_LT_OQ) &
                      _mm512_cmp_ps_mask(ax, _mm512_setzero_ps(), _CMP_NEQ_OQ);
      odd |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      if (odd) {
        for (int q = 0; q < 16; ++q) o[j + q] = Elem<DT>::store(buf[j + q]);
      } else {
        const __m256bh h = _mm512_cvtneps_pbh(x);
        _mm256_storeu_si256((__m256i*)(o + j), (__m256i)h);
      }
    }
  }
#endif
#pragma omp simd
  for (int64_t jj = j; jj < len; ++jj) o[jj] = Elem<DT>::store(buf[jj]);
}

template <int DT>
static void merge_impl(int64_t m, int64_t n, Mat W, void* out, int64_t os0, int64_t os1,
                       const float* US, const float* VT, int64_t k, int nthreads) {
  typedef typename Elem<DT>::T T;
  const Mat none = {nullptr, 0, 0};
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
  {
    alignas(64) float w[J];
    alignas(64) float t[J];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      const float* u = US + i * k;
      for (int64_t j0 = 0; j0 < n; j0 += J) {
        const int64_t len = imin(J, n - j0);
        // the low-rank term first, then W: the order the fp32 reference W + (U·S)·Vᵀ uses
        memset(t, 0, sizeof(float) * len);
        for (int64_t c = 0; c < k; ++c) {
          const float uc = u[c];
          const float* __restrict v = VT + c * n + j0;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) t[j] += uc * v[j];
        }
        load_delta<DT>(W, none, i, j0, len, w);  // read this chunk before writing it (in place)
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) t[j] += w[j];
        store_row<DT>((T*)out + i * os0 + j0 * os1, os1, t, len);
      }
    }
  }
}

static void merge_lowrank(int dtype, int64_t m, int64_t n, Mat W, void* out, int64_t os0,
                          int64_t os1, const float* US, const float* VT, int64_t k, int nthreads) {
  switch (dtype) {
    case kBF16: return merge_impl<kBF16>(m, n, W, out, os0, os1, US, VT, k, nthreads);
    case kF16: return merge_impl<kF16>(m, n, W, out, os0, os1, US, VT, k, nthreads);
    default: return merge_impl<kF32>(m, n, W, out, os0, os1, US, VT, k, nthreads);
  }
}

// ---------------------------------------------------------------- Gram matrix of deltas

template <int DT>
static void gram_impl(int64_t m, int64_t n, const Mat* As, int64_t T, Mat B, double* G,
                      int nthreads) {
  const int64_t TT = T * T;
  memset(G, 0, sizeof(double) * TT);
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
  {
    float* d = (float*)malloc(sizeof(float) * T * J);  // the T deltas of one row chunk
    double* g = (double*)calloc(TT, sizeof(double));   // this thread's partial Gram matrix
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j0 = 0; j0 < n; j0 += J) {
        const int64_t len = imin(J, n - j0);
        for (int64_t t = 0; t < T; ++t) load_delta<DT>(As[t], B, i, j0, len, d + t * J);
        for (int64_t a = 0; a < T; ++a) {
          const float* __restrict da = d + a * J;
          for (int64_t b = a; b < T; ++b) {
            const float* __restrict db = d + b * J;
            float s = 0;  // fp32 within a chunk of ≤ 256, double across chunks
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < len; ++j) s += da[j] * db[j];
            g[a * T + b] += s;
          }
        }
      }
    }
#pragma omp critical
    for (int64_t a = 0; a < T; ++a)
      for (int64_t b = a; b < T; ++b) G[a * T + b] += g[a * T + b];
    free(d);
    free(g);
  }
  for (int64_t a = 0; a < T; ++a)
    for (int64_t b = 0; b < a; ++b) G[a * T + b] = G[b * T + a];
}

static void delta_gram(int dtype, int64_t m, int64_t n, const Mat* As, int64_t T, Mat B, double* G,
                       int nthreads) {
  switch (dtype) {
    case kBF16: return gram_impl<kBF16>(m, n, As, T, B, G, nthreads);
    case kF16: return gram_impl<kF16>(m, n, As, T, B, G, nthreads);
    default: return gram_impl<kF32>(m, n, As, T, B, G, nthreads);
  }
}

}  // namespace PYRANK_ISA
}  // namespace pyrank

extern "C" void PR_CAT(pyrank_kernels_, PYRANK_ISA)(pyrank::KernelTable* t) {
  t->name = PR_STR(PYRANK_ISA);
  t->delta_mm_both = &pyrank::PYRANK_ISA::delta_mm_both;
  t->merge_lowrank = &pyrank::PYRANK_ISA::merge_lowrank;
  t->delta_gram = &pyrank::PYRANK_ISA::delta_gram;
}
