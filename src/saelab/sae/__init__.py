"""SAE architectures. Importing this package registers every built-in architecture."""

from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput
from saelab.sae.registry import create, get_class, list_architectures, make_config, register

# Each import registers its architectures.
from saelab.sae import relu, gated, jumprelu, topk  # noqa: E402,F401
from saelab.sae import matryoshka, panneal, switch, tokenized, matching_pursuit, archetypal, mdl  # noqa: E402,F401
import saelab.activations.tokens  # noqa: E402,F401  (registers the toy_tokens source)
import saelab.baselines  # noqa: E402,F401  (PCA, ICA, NMF, dictionary learning)

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
