"""saelab: a lab for superposition and sparse dictionary learning.

    import saelab
    saelab.list_architectures()            # every registered architecture and baseline
    result = saelab.train({"architecture": "topk", "d_in": 64, "d_sae": 512, "k": 8}, batches)
    results = saelab.train_many([{"architecture": "topk", "d_in": 64, "d_sae": 512, "k": k} for k in (4, 8)], source)
    result = saelab.train_e2e({"architecture": "topk", "d_sae": 2048, "k": 32}, model, tok, texts, "model.layers.6")
    records = saelab.run({"sae": {...}, "source": {"type": "world", ...}}, out="runs/x")  # train, evaluate, save
    saelab.save(result.sae, "my_sae")      # SAELens v6 layout (saelab's own for crosscoders)
    sae = saelab.load("my_sae")            # or a sparsify / dictionary_learning / Gemma Scope / Llama Scope / circuit-tracer folder

Every trained SAE comes back ready: it takes raw activations (the input scale is folded in).
"""

__version__ = "0.1.0"

from saelab.io.formats import load, save  # noqa: E402  (any known format; SAELens v6 where it fits)
from saelab.run import RunConfig, run  # noqa: E402
from saelab.sae import SAE, create, list_architectures  # noqa: E402
from saelab.train import TrainConfig, train, train_e2e, train_many  # noqa: E402

__all__ = [
    "SAE",
    "RunConfig",
    "TrainConfig",
    "create",
    "list_architectures",
    "load",
    "run",
    "save",
    "train",
    "train_many",
    "train_e2e",
    "__version__",
]
