"""The tiny models and tokenizer of tests/models, for the reading tests."""

from tests.models.conftest import _one_thread, llama, tokenizer  # noqa: F401
