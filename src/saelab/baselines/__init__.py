"""Classic sparse-decomposition baselines behind the SAE interface (registered on import).

The matching-pursuit SAE is trained by gradient and lives in saelab.sae.matching_pursuit.
"""

from saelab.baselines.sklearn_models import (  # noqa: F401
    DictionaryLearningBaseline,
    FittedSAE,
    ICABaseline,
    NMFBaseline,
    PCABaseline,
)
