"""Installs adan_plugin and builds its fused-kernel extension ``adan_plugin._C``.

Environment switches:
  ADAN_NO_EXT=1          build no extension (everything but ``fused=True`` works)
  FORCE_CUDA=1           build the CUDA kernels even when the toolkit check fails
  ADAN_NO_CUDA=1         build the CPU kernels only
  TORCH_CUDA_ARCH_LIST   GPU architectures (default: the visible GPUs, else "9.0")
  MAX_JOBS               parallel compile jobs (default 2)
  CUDA_HOME              CUDA toolkit root (default: found from nvcc, /usr/local/cuda first)

The CPU sources are always compiled; the CUDA sources when a CUDA toolkit and a
CUDA build of torch are present.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def _find_cuda_home():
    # torch.utils.cpp_extension guesses dirname(dirname(which nvcc)), which
    # is wrong when nvcc is a wrapper script (e.g. /usr/local/bin/nvcc), so
    # the toolkit root is settled here, before that module is imported.
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _is_toolkit(root):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        with open(nvcc, "rb") as f:
            head = f.read(512)
        if head.startswith(b"#!"):  # a wrapper: follow the exec'd path
            for word in head.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc") and _is_toolkit(os.path.dirname(os.path.dirname(word))):
                    return os.path.dirname(os.path.dirname(word))
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(root):
            return root
    return None


def _pip_cuda_includes():
    # pip CUDA wheels (nvidia-*-cu13) ship headers such as cusparse.h that
    # torch's CUDA headers include; a bare toolkit may lack them.
    try:
        import importlib.util
        spec = importlib.util.find_spec("nvidia")
    except ImportError:
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extensions():
    if os.environ.get("ADAN_NO_EXT", "0") == "1":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", "2")

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (torch.version.cuda is not None and cuda_home)
    if os.environ.get("ADAN_NO_CUDA", "0") == "1":
        with_cuda = False
    sources = [os.path.join(CSRC, f) for f in ("adan_ops.cpp", "adan_cpu.cpp", "adan_cpu_avx2.cpp", "adan_cpu_avx512.cpp",
                                                  "adan_cpu_avx512_bf16.cpp", "adan_cuda_on_cpu.cpp")]
    # -fopenmp: at::parallel_for is inline and runs serially unless the
    # extension itself is compiled with OpenMP (torch's CPU build uses it).
    # GOMP symbols then resolve against the libgomp that libtorch_cpu loads.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi"]
    include_dirs = [os.path.join(HERE, CSRC)]
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # No GPU to ask: one architecture keeps the build (and CI) short.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        ext = CUDAExtension(
            "adan_plugin._C",
            sources + [os.path.join(CSRC, "adan_cuda.cu")],
            include_dirs=include_dirs + _pip_cuda_includes(),
            define_macros=[("ADAN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
        )
    else:
        ext = CppExtension("adan_plugin._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="adan_plugin",
    version="0.1.0",
    description="Adan optimizer for PyTorch vision training, with fused kernels and timm/OpenMMLab integration",
    packages=find_packages(include=["adan_plugin", "adan_plugin.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "timm": ["timm>=1.0"],
        "mm": ["mmengine>=0.10", "mmpretrain>=1.2", "mmcv-lite>=2.0"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
