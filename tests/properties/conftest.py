import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """These models are tiny: on a busy CPU, extra intra-op threads only add contention (5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
