// pyrank._C: the C++ CPU backend (pybind11, no torch headers).
//
// The Python side (pyrank/backends/cpu.py) validates and lays out the tensors, keeps them
// alive, and passes raw pointers, shapes and element strides. This file picks the best SIMD
// variant of csrc/kernels.cpp that the CPU supports, once at import (PYRANK_CPU_ISA or
// set_isa() may choose a lower one, e.g. to test every variant on one machine), and releases
// the GIL while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#define PYRANK_HAVE_PREAD 1
#endif

namespace py = pybind11;
using pyrank::KernelTable;
using pyrank::Mat;

namespace {

struct Variant {
  const char* name;
  void (*fill)(KernelTable*);
  bool supported;
};

bool cpu_has(const char* what) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  std::string w(what);
  if (w == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (w == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  if (w == "avx512bf16") return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
#endif
  (void)what;
  return false;
}

std::vector<Variant>& variants() {  // best last
  static std::vector<Variant> v = [] {
    std::vector<Variant> out{{"scalar", pyrank_kernels_scalar, true}};
#if PYRANK_HAVE_AVX2
    out.push_back({"avx2", pyrank_kernels_avx2, cpu_has("avx2")});
#endif
#if PYRANK_HAVE_AVX512
    out.push_back({"avx512", pyrank_kernels_avx512, cpu_has("avx512")});
#endif
#if PYRANK_HAVE_AVX512BF16
    out.push_back({"avx512bf16", pyrank_kernels_avx512bf16, cpu_has("avx512bf16")});
#endif
    return out;
  }();
  return v;
}

KernelTable g_table;

void set_isa(const std::string& name) {
  for (auto& v : variants()) {
    if (name == v.name) {
      if (!v.supported) throw std::runtime_error("this CPU lacks the instructions of variant " + name);
      v.fill(&g_table);
      return;
    }
  }
  throw std::runtime_error("no kernel variant named '" + name + "' was built");
}

void select_best() {
  const char* forced = std::getenv("PYRANK_CPU_ISA");
  if (forced && *forced) return set_isa(forced);
  for (auto it = variants().rbegin(); it != variants().rend(); ++it)
    if (it->supported) return it->fill(&g_table);
}

inline Mat mat(uintptr_t p, int64_t s0, int64_t s1) { return Mat{reinterpret_cast<const void*>(p), s0, s1}; }

py::dict cpu_features() {
  py::dict d;
  for (const char* f : {"avx2", "avx512", "avx512bf16"}) d[f] = cpu_has(f);
  return d;
}

}  // namespace

#ifdef PYRANK_HAVE_PREAD
// Bytes [offset, offset + nbytes) of the file at `path` into dst, as `parts` contiguous ranges
// read in parallel (pread) on the kernels' OpenMP threads: one thread copies out of the page
// cache at ~5 GB/s, and the series loop waits for each copy (pyrank/io/readers.py). Threads of
// another pool would find the kernels' team still spinning on the cores right after a pass.
// Returns (0, 0) when every byte was read, (1, bytes missing) when the file ends early, and
// (2, errno) on an error; the file is opened read-only and closed again.
std::pair<int, int64_t> read_file(const std::string& path, int64_t offset, int64_t nbytes, uintptr_t dst,
                                  int parts) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {2, errno};
  if (parts < 1) parts = 1;
  int err = 0;
  int64_t missing = 0;
  char* out = reinterpret_cast<char*>(dst);
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(+ : missing)
  for (int p = 0; p < parts; ++p) {
    int64_t lo = nbytes * p / parts, hi = nbytes * (p + 1) / parts;
    while (lo < hi) {
      // (at most 1 GiB a call: Linux transfers at most ~2 GiB per read)
      ssize_t r = pread(fd, out + lo, (size_t)std::min<int64_t>(hi - lo, int64_t(1) << 30), offset + lo);
      if (r < 0) {
        if (errno == EINTR) continue;
        int e = errno;
#pragma omp atomic write
        err = e;
        break;
      }
      if (r == 0) {  // end of file: the rest of this range is missing
        missing += hi - lo;
        break;
      }
      lo += r;
    }
  }
  close(fd);
  if (err) return {2, err};
  if (missing) return {1, missing};
  return {0, 0};
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyrank's C++ CPU backend: fused kernels on (A - B), runtime SIMD dispatch";
  select_best();
  m.def("cpu_features", &cpu_features, "SIMD features of this CPU, as the dispatcher sees them");
  m.def("selected_isa", [] { return std::string(g_table.name); }, "the kernel variant in use");
  m.def("set_isa", &set_isa, py::arg("name"), "use another built, supported kernel variant");
  m.def("isa_variants", [] {
    std::vector<std::string> out;
    for (auto& v : variants()) if (v.supported) out.push_back(v.name);
    return out;
  }, "kernel variants built into this module that this CPU can run");
  m.def(
      "delta_products",
      [](int dtype, int64_t rows, int64_t cols, uintptr_t a, int64_t as0, int64_t as1, uintptr_t b,
         int64_t bs0, int64_t bs1, uintptr_t x, int64_t xs0, int64_t xs1, int64_t kx, uintptr_t out_x,
         int64_t oxs, uintptr_t y, int64_t ys0, int64_t ys1, int64_t ky, uintptr_t out_y, int64_t oys,
         bool sqnorm, int nthreads) {
        double sq = 0.0;
        int64_t nz = 0;
        g_table.delta_products(dtype, rows, cols, mat(a, as0, as1), mat(b, bs0, bs1), mat(x, xs0, xs1), kx,
                              reinterpret_cast<float*>(out_x), oxs, mat(y, ys0, ys1), ky,
                              reinterpret_cast<float*>(out_y), oys, sqnorm ? &sq : nullptr, &nz, nthreads);
        return std::make_pair(sq, nz);
      },
      py::call_guard<py::gil_scoped_release>());
#ifdef PYRANK_HAVE_PREAD
  m.def("read_file", &read_file, py::arg("path"), py::arg("offset"), py::arg("nbytes"), py::arg("dst"),
        py::arg("parts"), "read a byte range of a file into memory on `parts` threads (see read_file)",
        py::call_guard<py::gil_scoped_release>());
#endif
  m.def(
      "merge_lowrank",
      [](int dtype, int64_t rows, int64_t cols, uintptr_t w, int64_t ws0, int64_t ws1, uintptr_t out,
         int64_t os0, int64_t os1, uintptr_t us, uintptr_t vt, int64_t k, int nthreads) {
        g_table.merge_lowrank(dtype, rows, cols, mat(w, ws0, ws1), reinterpret_cast<void*>(out), os0,
                              os1, reinterpret_cast<const float*>(us),
                              reinterpret_cast<const float*>(vt), k, nthreads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "delta_gram",
      [](int dtype, int64_t rows, int64_t cols, std::vector<uintptr_t> ptrs, std::vector<int64_t> s0,
         std::vector<int64_t> s1, uintptr_t b, int64_t bs0, int64_t bs1, uintptr_t g, int nthreads) {
        if (ptrs.size() != s0.size() || ptrs.size() != s1.size())
          throw std::invalid_argument("delta_gram: pointer and stride lists differ in length");
        std::vector<Mat> mats;
        for (size_t i = 0; i < ptrs.size(); ++i) mats.push_back(mat(ptrs[i], s0[i], s1[i]));
        py::gil_scoped_release release;
        g_table.delta_gram(dtype, rows, cols, mats.data(), (int64_t)mats.size(), mat(b, bs0, bs1),
                           reinterpret_cast<double*>(g), nthreads);
      });
}
