"""Where the pack's Triton kernels run in tests: compiled on a GPU; on the CPU in Triton's interpreter, which
must be chosen before Triton is first imported, so a CPU session runs those tests in a child pytest."""
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.support.flux_fixtures import PACK_DIR

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel_device = pytest.mark.skipif(KERNEL_DEVICE == "cpu" and not INTERPRETED,
                                         reason="on the CPU, run in a child pytest in Triton's interpreter")
runs_kernel_tests_in_a_child = pytest.mark.skipif(KERNEL_DEVICE == "cuda" or INTERPRETED,
                                                  reason="the kernel tests run in this process here")


def assert_passes_in_tritons_interpreter(test_file, keyword, expected_passed):
    """Runs `test_file`'s tests matching `keyword` in a child pytest under Triton's interpreter."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword]
    child = subprocess.run(command, cwd=PACK_DIR,
                           env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and re.search(rf"\b{expected_passed} passed", child.stdout), \
        child.stdout[-3000:] + child.stderr[-3000:]
