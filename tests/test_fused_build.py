"""Properties of the built extension that no numerical test can see."""
import shutil
import subprocess
import sys

import pytest

from adan_plugin import _ext


@pytest.mark.skipif(not _ext.extension_loaded(), reason="needs the compiled fused kernels")
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs nm (Linux)")
def test_cpu_kernel_is_built_with_openmp():
    # at::parallel_for is inline: compiled without -fopenmp it silently runs
    # the whole step on one core (it did, before setup.py passed the flag).
    from adan_plugin import _C

    symbols = subprocess.run(["nm", "-D", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "GOMP_parallel" in symbols


_SELECT_EXTENSIONS = """
import json, os, runpy, shutil, setuptools
setuptools.setup = lambda **kw: None  # setup.py's module body: pick the extensions, build nothing
real_isfile = os.path.isfile
# No CUDA toolkit anywhere: every nvcc and cuda_runtime.h is hidden (also /usr/local/cuda's).
os.path.isfile = lambda p: False if os.path.basename(str(p)) in ("nvcc", "cuda_runtime.h") else real_isfile(p)
shutil.which = lambda name, *a, **k: None if name == "nvcc" else _which(name, *a, **k)
g = runpy.run_path("setup.py", run_name="setup")
ext = g["ext_modules"][0]
print(json.dumps({"type": type(ext).__name__, "sources": ext.sources,
                  "macros": [m[0] for m in ext.define_macros], "cuda_home": os.environ.get("CUDA_HOME")}))
"""


def test_setup_without_a_cuda_toolkit_still_builds_the_cpu_kernels():
    # A CUDA build of torch (as here) on a machine without nvcc: setup.py must pick the CPU-only
    # extension (CppExtension, no .cu source, no ADAN_WITH_CUDA) instead of failing on CUDA.
    import json
    import os

    from conftest import REPO_ROOT
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "FORCE_CUDA", "ADAN_NO_CUDA", "ADAN_NO_EXT")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "cuda" not in p.lower())
    code = "import shutil\n_which = shutil.which\n" + _SELECT_EXTENSIONS
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    chosen = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(s.endswith(".cu") for s in chosen["sources"])
    assert "ADAN_WITH_CUDA" not in chosen["macros"]
    assert any(s.endswith("adan_cpu.cpp") for s in chosen["sources"])
    assert chosen["cuda_home"] is None
