"""Reading latents: the contexts they fire on (a streaming collector), feature dashboards,
autointerp explanations and scores, and Patchscope self-descriptions.

`collect_contexts` makes one pass over token batches and keeps, per latent, its exact top-k
contexts, a uniform sample of its firing contexts split by activation quantile, its density and
an exact value histogram, in memory that does not grow with the number of tokens. Dashboards
(`saelab.reading.dashboard`), autointerp (`saelab.reading.autointerp`) and Patchscope
(`saelab.reading.patchscope`) read it.
"""

from saelab.reading.contexts import Context, ContextCollection, Histogram, LatentContexts, collect_contexts

__all__ = ["Context", "ContextCollection", "Histogram", "LatentContexts", "collect_contexts"]
