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
