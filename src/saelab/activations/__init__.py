"""Sources of activation batches."""

from saelab.activations.base import ActivationSource, Batch, IteratorSource, as_source

__all__ = ["ActivationSource", "Batch", "IteratorSource", "as_source"]
