"""A saelab SAE as SAEBench (`sae-bench` 0.6) evaluates it: `for_saebench(sae, model_name, hook_layer)`.

SAEBench's evals read `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`, `encode`,
`decode`, `forward`, `device`, `dtype`, `to()` and a mutable `cfg` carrying the model and hook it
runs on (they add fields to it while standardising). saelab's own config is strict, so the view
carries its own `cfg`; the weights are the SAE's own tensors (no copy), and `encode` accepts any
leading shape ([batch, seq, d_in] as the evals pass it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.sae.base import SAE

# SAELens' names, which SAEBench compares against (e.g. "gated" selects b_mag as the encoder bias).
_ARCHITECTURE_NAMES = {"relu": "standard"}


@dataclass
class SAEBenchConfig:
    """The fields of SAEBench's CustomSAEConfig, plus `architecture_str`, which its core eval reads."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    architecture_str: str = ""
    apply_b_dec_to_input: bool = True
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = ""
    activation_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAEBenchSAE(torch.nn.Module):
    """A view of a saelab SAE with SAEBench's attribute contract."""

    def __init__(self, sae: SAE, cfg: SAEBenchConfig):
        super().__init__()
        self.sae = sae
        self.cfg = cfg

    @property
    def W_enc(self) -> torch.Tensor:
        return self.sae.W_enc

    @property
    def W_dec(self) -> torch.Tensor:
        return self.sae.W_dec

    @property
    def b_enc(self) -> torch.Tensor:
        """The bias of the pre-activations that decide firing (the gate's for a gated SAE)."""
        if "b_enc" in self.sae._parameters or self.sae.architecture == "gated":
            return self.sae.encoder_bias()
        return torch.zeros(self.sae.cfg.d_sae, device=self.device, dtype=self.dtype)  # tied encoders have none

    @property
    def b_dec(self) -> torch.Tensor:
        return self.sae.b_dec

    @property
    def b_mag(self) -> torch.Tensor:
        if self.sae.architecture != "gated":
            raise AttributeError("b_mag exists only on gated SAEs")
        return self.sae.b_mag

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    def to(self, *args, **kwargs) -> SAEBenchSAE:
        super().to(*args, **kwargs)
        self.cfg.device, self.cfg.dtype = str(self.device), str(self.dtype).removeprefix("torch.")
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.sae.encode(x.reshape(-1, x.shape[-1]).to(self.dtype)).reshape(*lead, self.sae.cfg.d_sae)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        lead = feature_acts.shape[:-1]
        return self.sae.decode(feature_acts.reshape(-1, feature_acts.shape[-1])).reshape(*lead, self.sae.cfg.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        norms = self.W_dec.norm(dim=1)
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5))


def for_saebench(
    sae: SAE,
    model_name: str,
    hook_layer: int,
    hook_name: str | None = None,
    context_size: int = 128,
    prepend_bos: bool = True,
) -> SAEBenchSAE:
    """`sae` as SAEBench's evals take a custom SAE. `hook_name` (TransformerLens naming, as SAEBench
    hooks HookedTransformer) defaults to the one the SAE's file recorded, else `blocks.L.hook_resid_post`."""
    recorded = (getattr(sae, "provenance", None) or {}).get("hook_name")
    hook = hook_name or (recorded if recorded and str(recorded).startswith(("blocks.", "hook_")) else None)
    hook = hook or f"blocks.{hook_layer}.hook_resid_post"
    if sae.uses_tokens:
        raise ConfigError(f"'{sae.architecture}' decodes with token ids, which SAEBench's evals do not pass")
    arch = _ARCHITECTURE_NAMES.get(sae.architecture, sae.architecture)
    cfg = SAEBenchConfig(
        model_name=model_name,
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        hook_layer=hook_layer,
        hook_name=hook,
        context_size=context_size,
        architecture=arch,
        architecture_str=arch,
        apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
        prepend_bos=prepend_bos,
        dtype=str(sae.W_dec.dtype).removeprefix("torch."),
        device=str(sae.W_dec.device),
    )
    return SAEBenchSAE(sae.eval(), cfg)
