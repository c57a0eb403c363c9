"""Settings shared by every test."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Every test runs torch on one intra-op thread. The tests use small tensors, and on the
    project's 2-core machines two spinning intra-op threads made them 5-70x slower whenever other
    work shared the cores (test_distributed's processes set it themselves)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
