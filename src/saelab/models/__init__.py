"""Real language models: hooks by module path, text data, a shuffling activation source,
model loading (offline only) and the default small model.

`transformers` and `datasets` are imported only when a model or dataset is actually used, so
`import saelab` stays light.
"""

from saelab.models.hooks import Hookpoint, near_matches, resolve, run
from saelab.models.source import Harvester, ModelSource, load_model, source_from_spec
from saelab.models.text import TokenRows, load_texts, pydoc_texts

__all__ = [
    "Harvester",
    "Hookpoint",
    "ModelSource",
    "TokenRows",
    "load_model",
    "load_texts",
    "near_matches",
    "pydoc_texts",
    "resolve",
    "run",
    "source_from_spec",
]
