"""Reading latents: contexts, autointerp explanations and scores, and Patchscope self-descriptions."""
