"""Settings shared by every test."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def intra_op_threads():
    """Every test runs torch on OMP_NUM_THREADS intra-op threads, one when it is unset. The tests use
    small tensors, and on the project's 2-core machines two spinning intra-op threads made them
    5-70x slower whenever other work shared the cores, hence one by default; CI runs the suite once
    more with OMP_NUM_THREADS=2 (.ci/run), so that a result which depends on how a reduction is split
    across threads fails there too; that run leaves out the modules marked `thread_independent`
    (worker processes that set their threads themselves, smoke runs of examples and benchmarks).
    Where OMP_NUM_THREADS is set, the count is the one torch read from it at start-up: the variable is
    OpenMP's list (`4,2`: four threads at the outer level), which int() would refuse."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads if os.environ.get("OMP_NUM_THREADS", "").strip() else 1)
    yield
    torch.set_num_threads(threads)
