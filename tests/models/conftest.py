"""Fixtures for the real-model tests: tiny models and a tokenizer built offline (see tiny.py)."""

import pytest
import torch

from tests.models import tiny


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="session")
def texts():
    return tiny.make_texts()


@pytest.fixture(scope="session")
def gpt2():
    return tiny.make_gpt2()


@pytest.fixture(scope="session")
def llama():
    return tiny.make_llama()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
