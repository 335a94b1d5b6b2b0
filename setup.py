"""Build pyrank: the Python package, pyrank.triton_kernels, and the C++ extension pyrank._C.

Environment switches (documented in the README):
  PYRANK_SKIP_CPP=1    do not build pyrank._C (platforms without a C++17 compiler);
                       the cpu backend then reports itself unavailable, torch still works.
  PYRANK_CPU_ISAS=...  comma list of SIMD variants to compile on x86-64
                       (default "avx2,avx512,avx512bf16"; the portable one is always built).
  MAX_JOBS=N           parallel compile jobs for the variants (default: CPU count).

Every SIMD variant is its own translation unit compiled with its own -m flags and
selected at run time from the CPU's features, so one build runs on any x86-64 CPU.
"""
import os
import platform
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup

# The source tree and the import tree differ in two places, both mapped here: the top-level
# folder triton_kernels/ is installed as pyrank.triton_kernels (never as a top-level
# triton_kernels, a name Triton's own project and a PyPI package use), and csrc/ is compiled
# into the extension pyrank._C. Everything else is pyrank/ as it is, subpackages included.
PACKAGES = ["pyrank"] + [f"pyrank.{p}" for p in find_packages("pyrank")] + ["pyrank.triton_kernels"]
PACKAGE_DIR = {"pyrank": "pyrank", "pyrank.triton_kernels": "triton_kernels"}

# variant name -> (source, extra compiler flags); "scalar" is built everywhere
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                   "-mfma", "-mf16c"],
}


def _extensions():
    if os.environ.get("PYRANK_SKIP_CPP", "0") == "1":
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    isas = [s for s in os.environ.get("PYRANK_CPU_ISAS", "avx2,avx512,avx512bf16").split(",") if s]
    isas = [s for s in isas if is_x86 and s in ISA_FLAGS]
    common = ["-O3", "-fopenmp", "-fno-math-errno"]
    ext = Pybind11Extension(
        "pyrank._C",
        sources=["csrc/pyrank_C.cpp"],
        # kernels.cpp is compiled per variant below; listing it here makes an edit relink
        depends=["csrc/kernels.cpp", "csrc/kernels.h"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=common + [f"-DPYRANK_HAVE_{s.upper()}=1" for s in isas],
        extra_link_args=["-fopenmp"],
    )
    ext.pyrank_variants = [("scalar", [])] + [(s, ISA_FLAGS[s]) for s in isas]
    ext.pyrank_common = common

    class BuildExt(build_ext):
        """Compile each SIMD variant of csrc/kernels.cpp with its own flags, then link all."""

        def build_extension(self, ext):
            variants = getattr(ext, "pyrank_variants", [])
            if variants and os.path.exists("csrc/kernels.cpp"):
                jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))

                def compile_variant(item):
                    name, flags = item
                    return self.compiler.compile(
                        ["csrc/kernels.cpp"],
                        output_dir=os.path.join(self.build_temp, name),
                        include_dirs=["csrc"],
                        extra_postargs=ext.pyrank_common + ["-std=c++17", "-fPIC",
                                                            f"-DPYRANK_ISA={name}"] + flags,
                    )

                with ThreadPoolExecutor(max(1, jobs)) as pool:
                    for objs in pool.map(compile_variant, variants):
                        ext.extra_objects.extend(objs)
            super().build_extension(ext)

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
