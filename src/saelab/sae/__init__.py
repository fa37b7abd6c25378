"""SAE architectures. Importing this package registers every built-in architecture."""

import saelab.activations.tokens  # noqa: E402,F401  (registers the toy_tokens source)
import saelab.baselines  # noqa: E402,F401  (PCA, ICA, NMF, dictionary learning)

# Each import registers its architectures.
from saelab.sae import (  # noqa: E402,F401  # noqa: E402,F401
    archetypal,
    gated,
    jumprelu,
    matching_pursuit,
    matryoshka,
    mdl,
    panneal,
    relu,
    switch,
    tokenized,
    topk,
)
from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput
from saelab.sae.registry import create, get_class, list_architectures, make_config, register

__all__ = [
    "SAE",
    "SAEConfig",
    "StepContext",
    "TrainOutput",
    "create",
    "get_class",
    "list_architectures",
    "make_config",
    "register",
]
