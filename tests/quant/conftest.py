import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests multiply tiny matrices: waking a second intra-op thread costs more than it saves,
    and on a busy machine much more (the suite took 56 s with 2 threads, 7 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
