// pyrank._C: the C++ CPU backend (pybind11, no torch headers).
// This first version only proves the native build path and reports the CPU's features;
// the kernels arrive with the native-kernels issue.
#include <pybind11/pybind11.h>

namespace py = pybind11;

static py::dict cpu_features() {
  py::dict d;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  d["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  d["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  d["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  d["avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyrank's C++ CPU backend";
  m.def("cpu_features", &cpu_features, "SIMD features of this CPU, as the dispatcher sees them");
  m.attr("has_kernels") = false;
}
