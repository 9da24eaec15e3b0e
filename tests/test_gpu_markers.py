"""The rule that keeps `gpu` tests running on CPUs (tests/conftest.py): checked on a throwaway test file run by
pytest itself, with this suite's conftest."""

import os

import pytest

from conftest import cuda_available

pytest_plugins = ["pytester"]
CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")

CASES = '''
import pytest
from conftest import skip_cuda_only

@pytest.mark.gpu
def test_vague_skip(device):
    pytest.skip("needs a GPU")

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="no CUDA here")
def test_skipif_without_kernel(device):
    pass

@pytest.mark.gpu
def test_named_kernel(device):
    skip_cuda_only("FA3", "Hopper only")

@pytest.mark.gpu
def test_runs_its_body(device):
    assert device in ("cpu", "cuda")

@pytest.mark.gpu
def test_without_device_fixture():
    pass

def test_plain_skip_is_not_policed():
    pytest.skip("nothing to do with GPUs")
'''


def test_gpu_skip_rules(pytester):
    cuda = cuda_available()  # imports torch now: the in-process run unloads modules it imported itself
    with open(CONFTEST) as f:
        pytester.makeconftest(f.read())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: a gpu test\n")
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rA")
    outcomes = result.parseoutcomes()
    if cuda:  # on a GPU machine skips are the GPU's business
        result.assert_outcomes(passed=1, skipped=4, errors=1)
        return
    # a skip at setup (skipif) is turned into a setup failure: pytest counts it as an error
    result.assert_outcomes(passed=1, skipped=2, failed=1, errors=2)
    out = result.stdout.str()
    assert "test_vague_skip" in out and "test_skipif_without_kernel" in out
    assert "without naming the CUDA-only kernel" in out
    assert "needs the CUDA-only kernel FA3: Hopper only" in out
    assert "must be device-parametrized" in out, outcomes
