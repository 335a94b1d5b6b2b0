// pyrank's CPU kernels. Compiled once per SIMD variant with -DPYRANK_ISA=<variant> and that
// variant's -m flags (see setup.py); the dispatcher in pyrank_C.cpp picks one at run time.
//
// Everything lives in a namespace named after the variant and only C headers are included:
// no inline function with external linkage is shared between variants, so the linker can
// never substitute an AVX-512 copy of a helper into the portable path.
//
// The work is memory-bound (docs/METHODS.md §6): each kernel reads A and B exactly once. Products
// of up to 4 columns a side (the top-1 SVD, warm starts) keep a few rows of A − B in vector
// registers, converted straight from A and B, and use them for every product at once. Wider
// ones convert a tile of G rows × J columns of A − B to fp32 into an L1-resident buffer and
// run register-blocked products over it: a block of rows × up to 4 columns of partial sums
// stays in registers, so each load of Δ feeds several columns and each load of X or of an
// accumulator feeds several rows. Both use GCC vector extensions sized to the variant's ISA,
// so one source serves every ISA. What they replaced and what was measured: docs/DESIGN.md.
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

// ---------------------------------------------------------------- register-blocked products
//
// The products work on an fp32 tile of Δ in L1 (dt: G rows × J columns, zero-padded to a
// whole number of vectors). Each block keeps a few rows × a few columns of partial sums in
// vector registers, so one load of Δ feeds CB columns and one load of X or of the Δᵀ·Y
// accumulator feeds RB rows (where the time goes, and the tile sizes tried: docs/DESIGN.md).
#if defined(__AVX512F__)
constexpr int64_t VL = 16;
#elif defined(__AVX__)
constexpr int64_t VL = 8;
#else
constexpr int64_t VL = 4;  // SSE2 on x86-64, NEON etc. elsewhere; scalar code if none
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));  // a vf compare's lane masks
static inline vf vload(const float* p) {
  vf v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vf v) {
  float s = 0;
  for (int64_t l = 0; l < VL; ++l) s += v[l];
  return s;
}

// Δ·X partial sums of RB tile rows × CB columns over one chunk: acc[r·kx + q] (vectors, kept
// across chunks; reduced to scalars once per tile). x: column c of XT at this chunk.
template <int RB, int CB>
static inline void dx_block(const float* dt, const float* x, int64_t xs, int64_t lenv, vf* acc,
                            int64_t kx) {
  vf s[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int q = 0; q < CB; ++q) s[r][q] = acc[r * kx + q];
  for (int64_t j = 0; j < lenv; j += VL) {
    vf xv[CB];
    for (int q = 0; q < CB; ++q) xv[q] = vload(x + q * xs + j);
    for (int r = 0; r < RB; ++r) {
      const vf d = vload(dt + r * J + j);
      for (int q = 0; q < CB; ++q) s[r][q] += d * xv[q];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int q = 0; q < CB; ++q) acc[r * kx + q] = s[r][q];
}

// Δᵀ·Y for 8 tile rows × CB columns over one chunk: a[q·as + j] += Σ_r dt[r][j]·y[r·ky + q].
template <int CB>
static inline void dty_block(const float* dt, const float* y, int64_t ky, float* a, int64_t as,
                             int64_t lenv) {
  float yr[R][CB];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < CB; ++q) yr[r][q] = y[r * ky + q];
  for (int64_t j = 0; j < lenv; j += VL) {
    vf s[CB];
    for (int q = 0; q < CB; ++q) s[q] = vload(a + q * as + j);
    for (int r = 0; r < R; ++r) {
      const vf d = vload(dt + r * J + j);
      for (int q = 0; q < CB; ++q) s[q] += d * yr[r][q];
    }
    for (int q = 0; q < CB; ++q) vstore(a + q * as + j, s[q]);
  }
}

// Rows per Δ·X block: 8 × ≤ 2 or 4 × ≤ 4 partial sums fit in 16 vector registers.
static void dx_rows(const float* dt, int64_t rows, const float* XT, int64_t xs, int64_t kx,
                    int64_t lenv, vf* acc) {
  for (int64_t c = 0; c < kx; c += 4) {
    const int64_t cb = imin(4, kx - c);
    const float* x = XT + c * xs;
    for (int64_t r = 0; r < rows; r += (cb <= 2 ? 8 : 4)) {
      const float* d = dt + r * J;
      vf* a = acc + r * kx + c;
      switch (cb) {
        case 1: dx_block<8, 1>(d, x, xs, lenv, a, kx); break;
        case 2: dx_block<8, 2>(d, x, xs, lenv, a, kx); break;
        case 3: dx_block<4, 3>(d, x, xs, lenv, a, kx); break;
        default: dx_block<4, 4>(d, x, xs, lenv, a, kx); break;
      }
    }
  }
}

static void dty_rows(const float* dt, int64_t rows, const float* Ytile, int64_t ky, float* acc,
                     int64_t as, int64_t lenv) {
  for (int64_t c = 0; c < ky; c += 4) {
    const int64_t cb = imin(4, ky - c);
    for (int64_t r = 0; r < rows; r += R) {
      const float* d = dt + r * J;
      const float* y = Ytile + r * ky + c;
      float* a = acc + c * as;
      switch (cb) {
        case 1: dty_block<1>(d, y, ky, a, as, lenv); break;
        case 2: dty_block<2>(d, y, ky, a, as, lenv); break;
        case 3: dty_block<3>(d, y, ky, a, as, lenv); break;
        default: dty_block<4>(d, y, ky, a, as, lenv); break;
      }
    }
  }
}

// ---------------------------------------------------------------- few-column fast path
//
// The top-1 SVD and warm starts multiply 1–3 columns a side. There the fp32 tile costs
// more than its reuse saves: this path converts RR rows of Δ straight from A and B into
// registers and uses each vector for every product at once (the Δ·X partial sums stay in
// registers for a whole row, the Δᵀ·Y accumulator chunk is loaded and stored once per RR
// rows). AVX2 / AVX-512 variants only.
#if defined(__AVX2__) || defined(__AVX512F__)
#define PYRANK_FAST_PATH 1
constexpr int FAST_K = 4;  // the fast path serves kx, ky ≤ FAST_K
constexpr int NREG = VL == 16 ? 32 : 16;
typedef uint32_t vu32 __attribute__((vector_size(VL * 4)));
typedef uint16_t vu16 __attribute__((vector_size(VL * 2)));
typedef _Float16 vh16 __attribute__((vector_size(VL * 2)));

template <int DT> static inline vf vload_w(const typename Elem<DT>::T* p);
template <> inline vf vload_w<kBF16>(const uint16_t* p) {
  vu16 h;
  memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu32) << 16);
}
template <> inline vf vload_w<kF16>(const uint16_t* p) {
  vh16 h;
  memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vf);  // vcvtph2ps
}
template <> inline vf vload_w<kF32>(const float* p) { return vload(p); }

// rows per sweep: as many as leave registers for each row's KX partial sums
template <int KX> constexpr int fast_rows() {
  return KX == 0 ? 8 : ((NREG - 8) / (KX + 1) > 8 ? 8 : ((NREG - 8) / (KX + 1) < 2 ? 2 : (NREG - 8) / (KX + 1)));
}

// One sweep over RR whole rows. a[r], b[r]: row r of A and B (padding rows point both at one
// row: Δ = 0 exactly); y: RR×KY rows of Y (zero for padding rows); acc (KY rows, stride as)
// += Δᵀ·y; sx (RR×KX) = Δ·X with XT rows of stride xs; with SQ, *sq += ‖Δ‖² and *nz += the
// number of nonzero Δ entries of these rows (padding rows are exactly zero: never counted).
template <int DT, int KX, int KY, bool SQ>
static void fast_sweep(const void* const* av, const void* const* bv, int64_t n, const float* XT,
                       int64_t xs, const float* y, float* acc, int64_t as, float* sx, double* sq,
                       int64_t* nz) {
  typedef typename Elem<DT>::T T;
  constexpr int RR = fast_rows<KX>();
  const T* const* a = (const T* const*)av;
  const T* const* b = (const T* const*)bv;
  vf s[RR][KX > 0 ? KX : 1] = {};
  vf q0 = {}, q1 = {};  // two chains: the squares of RR rows are added per vector
  vi cnt = {};          // per lane, minus the nonzero count (a true compare is all ones = -1)
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    vf d[RR];
    for (int r = 0; r < RR; ++r) d[r] = vload_w<DT>(a[r] + j) - vload_w<DT>(b[r] + j);
    for (int c = 0; c < KX; ++c) {
      const vf x = vload(XT + c * xs + j);
      for (int r = 0; r < RR; ++r) s[r][c] += d[r] * x;
    }
    for (int c = 0; c < KY; ++c) {
      vf t = vload(acc + c * as + j);
      for (int r = 0; r < RR; ++r) t += d[r] * y[r * KY + c];
      vstore(acc + c * as + j, t);
    }
    if (SQ) {
      for (int r = 0; r < RR; r += 2) q0 += d[r] * d[r];
      for (int r = 1; r < RR; r += 2) q1 += d[r] * d[r];
      for (int r = 0; r < RR; ++r) cnt += (d[r] != vf{});
    }
  }
  float ps[RR][KX > 0 ? KX : 1];
  float qs = SQ ? hsum(q0 + q1) : 0.0f;
  int64_t zs = 0;
  if (SQ)
    for (int64_t l = 0; l < VL; ++l) zs -= cnt[l];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < KX; ++c) ps[r][c] = hsum(s[r][c]);
  for (; j < n; ++j) {  // the last n mod VL columns
    for (int r = 0; r < RR; ++r) {
      const float d = Elem<DT>::load(a[r][j]) - Elem<DT>::load(b[r][j]);
      for (int c = 0; c < KX; ++c) ps[r][c] += d * XT[c * xs + j];
      for (int c = 0; c < KY; ++c) acc[c * as + j] += d * y[r * KY + c];
      if (SQ) {
        qs += d * d;
        zs += d != 0.0f;
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < KX; ++c) sx[r * KX + c] = ps[r][c];
  if (SQ) {
    *sq += qs;
    *nz += zs;
  }
}

typedef void (*FastFn)(const void* const*, const void* const*, int64_t, const float*, int64_t,
                       const float*, float*, int64_t, float*, double*, int64_t*);

template <int DT, int KX, bool SQ> static FastFn fast_for_ky(int64_t ky) {
  switch (ky) {
    case 0: return &fast_sweep<DT, KX, 0, SQ>;
    case 1: return &fast_sweep<DT, KX, 1, SQ>;
    case 2: return &fast_sweep<DT, KX, 2, SQ>;
    case 3: return &fast_sweep<DT, KX, 3, SQ>;
    default: return &fast_sweep<DT, KX, 4, SQ>;
  }
}

template <int DT, bool SQ> static FastFn fast_for(int64_t kx, int64_t ky, int* rows) {
  switch (kx) {
    case 0: *rows = fast_rows<0>(); return fast_for_ky<DT, 0, SQ>(ky);
    case 1: *rows = fast_rows<1>(); return fast_for_ky<DT, 1, SQ>(ky);
    case 2: *rows = fast_rows<2>(); return fast_for_ky<DT, 2, SQ>(ky);
    case 3: *rows = fast_rows<3>(); return fast_for_ky<DT, 3, SQ>(ky);
    default: *rows = fast_rows<4>(); return fast_for_ky<DT, 4, SQ>(ky);
  }
}

// Requires unit column strides (the caller checks). XT rows have stride xs, acc rows as.
template <int DT>
static void fast_impl(int64_t m, int64_t n, Mat A, Mat B, const float* XT, int64_t xs, int64_t kx,
                      float* out_x, int64_t oxs, const float* Y, int64_t ys0, int64_t ys1, int64_t ky,
                      float* acc_all, int64_t as, double* sq, int64_t* nz, int nthreads) {
  typedef typename Elem<DT>::T T;
  int RR = 0;
  const FastFn fn = sq ? fast_for<DT, true>(kx, ky, &RR) : fast_for<DT, false>(kx, ky, &RR);
  // Δ = A alone: subtract a shared zero row (it stays in cache), so one sweep serves both
  T* zero = B.p ? nullptr : (T*)calloc((size_t)n, sizeof(T));
  if (!B.p && !zero) abort();
  const int64_t ntiles = (m + RR - 1) / RR;
  double sqsum = 0.0;
  int64_t nzsum = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : sqsum, nzsum)
  {
    const int t = omp_get_thread_num();
    float* acc = ky > 0 ? acc_all + (int64_t)t * ky * as : nullptr;
    const void* pa[8];
    const void* pb[8];
    float y[8 * FAST_K];
    float sx[8 * FAST_K];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t i0 = tile * RR, rows = imin(RR, m - i0);
      for (int64_t r = 0; r < RR; ++r) {
        if (r < rows) {
          pa[r] = (const T*)A.p + (i0 + r) * A.s0;
          pb[r] = B.p ? (const T*)B.p + (i0 + r) * B.s0 : zero;
        } else {  // padding: Δ = row − itself = 0 exactly
          pa[r] = pb[r] = pa[0];
        }
        for (int64_t c = 0; c < ky; ++c) y[r * ky + c] = r < rows ? Y[(i0 + r) * ys0 + c * ys1] : 0.0f;
      }
      fn(pa, pb, n, XT, xs, y, acc, as, sx, &sqsum, &nzsum);
      for (int64_t r = 0; r < rows && kx > 0; ++r)
        memcpy(out_x + (i0 + r) * oxs, sx + r * kx, sizeof(float) * kx);
    }
  }
  free(zero);
  if (sq) {
    *sq = sqsum;
    *nz = nzsum;
  }
}
#endif  // AVX2 / AVX-512

// The general path: any k, any strides. XT rows and the per-thread Δᵀ·Y accumulators
// (acc_all: one ky×np block per thread) have stride np, n rounded up to whole vectors.
template <int DT>
static void tiled_impl(int64_t m, int64_t n, int64_t np, Mat A, Mat B, const float* XT,
                       int64_t kx, float* out_x, int64_t oxs, const float* Y, int64_t ys0,
                       int64_t ys1, int64_t ky, float* acc_all, double* sq, int64_t* nz,
                       int nthreads) {
  // Few columns: the pass is memory-bound and 8-row tiles keep 16 row streams for the
  // prefetchers. More columns: cache traffic of X and the Δᵀ·Y accumulators (once per tile)
  // dominates, and taller tiles cut it. Measured on 4096×11008 bf16, 2 cores, interleaved
  // A/B: 32-row tiles made k=1 slower (7.2 → 9.7 ms); 16-row tiles beat 32-row ones by
  // 10–20% for kx + ky = 16–32 and lost by 10–15% at kx + ky = 64.
  const int64_t G = kx + ky < 16 ? R : (kx + ky < 48 ? 16 : GMAX);
  const int64_t ntiles = (m + G - 1) / G;
  double sqsum = 0.0;
  int64_t nzsum = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : sqsum, nzsum)
  {
    const int t = omp_get_thread_num();
    float* acc = ky > 0 ? acc_all + (int64_t)t * ky * np : nullptr;
    alignas(64) float dt[GMAX * J];
    vf* sx = kx > 0 ? (vf*)aligned_alloc(64, sizeof(vf) * GMAX * kx) : nullptr;
    float* ytile = ky > 0 ? (float*)malloc(sizeof(float) * GMAX * ky) : nullptr;
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t i0 = tile * G, rows = imin(G, m - i0);
      const int64_t prow = (rows + R - 1) / R * R;  // rows rounded up to whole 8-row blocks
      for (int64_t q = 0; q < G * kx; ++q) sx[q] = vf{};
      for (int64_t r = 0; r < prow; ++r)  // padding rows have y = 0
        for (int64_t c = 0; c < ky; ++c) ytile[r * ky + c] = r < rows ? Y[(i0 + r) * ys0 + c * ys1] : 0.0f;
      for (int64_t j0 = 0; j0 < n; j0 += J) {
        const int64_t len = imin(J, n - j0), lenv = (len + VL - 1) / VL * VL;
        for (int64_t r = 0; r < prow; ++r) {
          float* d = dt + r * J;
          if (r < rows) load_delta<DT>(A, B, i0 + r, j0, len, d);
          else memset(d, 0, sizeof(float) * len);  // padding rows contribute zero
          for (int64_t j = len; j < lenv; ++j) d[j] = 0.0f;
        }
        if (sq) {  // ‖Δ‖² from the tile already in L1: no extra read of A and B
          for (int64_t r = 0; r < rows; ++r) {
            const float* __restrict dr = dt + r * J;
            float s = 0;
            int64_t z = 0;
#pragma omp simd reduction(+ : s, z)
            for (int64_t j = 0; j < len; ++j) {
              s += dr[j] * dr[j];
              z += dr[j] != 0.0f;
            }
            sqsum += s;
            nzsum += z;
          }
        }
        if (kx > 0) dx_rows(dt, prow, XT + j0, np, kx, lenv, sx);
        if (ky > 0) dty_rows(dt, prow, ytile, ky, acc + j0, np, lenv);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < kx; ++c) out_x[(i0 + r) * oxs + c] = hsum(sx[r * kx + c]);
    }
    free(sx);
    free(ytile);
  }
  if (sq) {
    *sq = sqsum;
    *nz = nzsum;
  }
}

// Scratch that outlives a call: the padded XT and the Δᵀ·Y accumulators. Fresh pages cost a
// fault each, and memory freed by a solve is handed back to the OS before the next: measured
// on this project's 2-core Intel VM, a 72-column Δᵀ·Y pass over 4096×11008 bf16 faulted 3836
// times (~6 µs each) and took 76 ms where the same pass on reused memory took 51. So each
// calling thread keeps its largest scratch, up to SCRATCH_KEEP bytes (larger ones are freed
// after the call).
constexpr size_t SCRATCH_KEEP = size_t(64) << 20;
struct Scratch {
  float* p = nullptr;
  size_t bytes = 0;
  ~Scratch() { free(p); }
};
static thread_local Scratch t_scratch;

static float* scratch_get(size_t bytes, bool* owned) {
  bytes = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
  if (bytes > SCRATCH_KEEP) {
    *owned = true;
    float* p = (float*)aligned_alloc(64, bytes);
    if (!p) abort();
    return p;
  }
  *owned = false;
  if (t_scratch.bytes < bytes) {
    free(t_scratch.p);
    t_scratch.p = (float*)aligned_alloc(64, bytes);
    if (!t_scratch.p) abort();
    t_scratch.bytes = bytes;
  }
  return t_scratch.p;
}

template <int DT>
static void delta_products_impl(int64_t m, int64_t n, Mat A, Mat B, Mat X, int64_t kx, float* out_x,
                                int64_t oxs, Mat Y, int64_t ky, float* out_y, int64_t oys,
                                double* sq, int64_t* nz, int nthreads) {
  if (nthreads < 1) nthreads = 1;
  const int64_t np = (n + VL - 1) / VL * VL;  // row length padded to whole vectors
  const int64_t per = ky * np;
  // keep the private Δᵀ·Y accumulators within ~512 MiB whatever the thread count
  while (nthreads > 1 && (int64_t)nthreads * per * 4 > (int64_t(1) << 29)) --nthreads;
  bool owned = false;
  float* XT = scratch_get(sizeof(float) * (size_t)(kx * np + nthreads * per), &owned);
  float* acc_all = ky > 0 ? XT + kx * np : nullptr;
  const float* xp = (const float*)X.p;
  const float* yp = (const float*)Y.p;
  constexpr int64_t TB = 64;  // rows of X (and of the Δᵀ·Y output) per block of a transposing copy
  // X transposed, rows padded to np (the last chunk's vector loads then stay in bounds, and the
  // padding multiplies the zero padding of dt), and each thread's accumulators zeroed by it.
#pragma omp parallel num_threads(nthreads)
  {
    if (kx > 0) {
#pragma omp for schedule(static) nowait
      for (int64_t j0 = 0; j0 < np; j0 += TB) {
        const int64_t j1 = imin(j0 + TB, np);
        for (int64_t c = 0; c < kx; ++c) {
          float* xt = XT + c * np;
          for (int64_t j = j0; j < j1; ++j) xt[j] = j < n ? xp[j * X.s0 + c * X.s1] : 0.0f;
        }
      }
    }
    if (ky > 0) {
#pragma omp for schedule(static)
      for (int t = 0; t < nthreads; ++t) memset(acc_all + (int64_t)t * per, 0, sizeof(float) * per);
    }
  }
#if defined(PYRANK_FAST_PATH)
  if (kx <= FAST_K && ky <= FAST_K && A.s1 == 1 && (!B.p || B.s1 == 1))
    fast_impl<DT>(m, n, A, B, XT, np, kx, out_x, oxs, yp, Y.s0, Y.s1, ky, acc_all, np, sq, nz, nthreads);
  else
#endif
    tiled_impl<DT>(m, n, np, A, B, XT, kx, out_x, oxs, yp, Y.s0, Y.s1, ky, acc_all, sq, nz, nthreads);
  if (ky > 0) {
    // the threads' partial sums, added in thread order, written as rows of out_y
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j0 = 0; j0 < n; j0 += TB) {
      const int64_t j1 = imin(j0 + TB, n);
      for (int64_t c = 0; c < ky; ++c)
        for (int64_t j = j0; j < j1; ++j) {
          float s = 0;
          for (int t = 0; t < nthreads; ++t) s += acc_all[(int64_t)t * per + c * np + j];
          out_y[j * oys + c] = s;
        }
    }
  }
  if (owned) free(XT);
}

static void delta_products(int dtype, int64_t m, int64_t n, Mat A, Mat B, Mat X, int64_t kx,
                           float* out_x, int64_t oxs, Mat Y, int64_t ky, float* out_y, int64_t oys,
                           double* sq, int64_t* nz, int nthreads) {
  switch (dtype) {
    case kBF16:
      return delta_products_impl<kBF16>(m, n, A, B, X, kx, out_x, oxs, Y, ky, out_y, oys, sq, nz,
                                        nthreads);
    case kF16:
      return delta_products_impl<kF16>(m, n, A, B, X, kx, out_x, oxs, Y, ky, out_y, oys, sq, nz,
                                        nthreads);
    default:
      return delta_products_impl<kF32>(m, n, A, B, X, kx, out_x, oxs, Y, ky, out_y, oys, sq, nz,
                                        nthreads);
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

// t (RB rows × J) = US·VT over one chunk, RB output rows in vector registers: each load of
// VT feeds RB rows. Summation order per element is c = 0, 1, …, as in the fp32 reference.
template <int RB>
static void lowrank_rows(const float* US, int64_t k, const float* VT, int64_t vs, int64_t lenv,
                         float* t) {
  for (int64_t j = 0; j < lenv; j += VL) {
    vf acc[RB] = {};
    for (int64_t c = 0; c < k; ++c) {
      const vf v = vload(VT + c * vs + j);
      for (int r = 0; r < RB; ++r) acc[r] += US[r * k + c] * v;
    }
    for (int r = 0; r < RB; ++r) vstore(t + r * J + j, acc[r]);
  }
}

constexpr int64_t MR = 4;  // rows per merge block

template <int DT>
static void merge_impl(int64_t m, int64_t n, Mat W, void* out, int64_t os0, int64_t os1,
                       const float* US, const float* VT_in, int64_t k, int nthreads) {
  typedef typename Elem<DT>::T T;
  const Mat none = {nullptr, 0, 0};
  // VT with rows padded to whole vectors (zeros), so the last chunk's loads stay in bounds
  const int64_t np = (n + VL - 1) / VL * VL;
  float* VT = (float*)calloc((size_t)(k * np > 0 ? k * np : 1), sizeof(float));
  if (!VT) abort();
  for (int64_t c = 0; c < k; ++c) memcpy(VT + c * np, VT_in + c * n, sizeof(float) * n);
  const int64_t nblocks = (m + MR - 1) / MR;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
  {
    alignas(64) float w[J];
    alignas(64) float t[MR * J];
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i0 = blk * MR, rows = imin(MR, m - i0);
      const float* u = US + i0 * k;
      for (int64_t j0 = 0; j0 < n; j0 += J) {
        const int64_t len = imin(J, n - j0), lenv = (len + VL - 1) / VL * VL;
        // the low-rank term first, then W: the order the fp32 reference W + (U·S)·Vᵀ uses
        switch (rows) {
          case 1: lowrank_rows<1>(u, k, VT + j0, np, lenv, t); break;
          case 2: lowrank_rows<2>(u, k, VT + j0, np, lenv, t); break;
          case 3: lowrank_rows<3>(u, k, VT + j0, np, lenv, t); break;
          default: lowrank_rows<MR>(u, k, VT + j0, np, lenv, t); break;
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* tr = t + r * J;
          load_delta<DT>(W, none, i0 + r, j0, len, w);  // read this chunk before writing it
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) tr[j] += w[j];
          store_row<DT>((T*)out + (i0 + r) * os0 + j0 * os1, os1, tr, len);
        }
      }
    }
  }
  free(VT);
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
  t->delta_products = &pyrank::PYRANK_ISA::delta_products;
  t->merge_lowrank = &pyrank::PYRANK_ISA::merge_lowrank;
  t->delta_gram = &pyrank::PYRANK_ISA::delta_gram;
}
