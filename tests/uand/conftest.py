import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """U-AND tests use tiny matrices: one thread is as fast and immune to CPU oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
