"""The SAE base class: orientation, encode/decode/forward, named loss terms and trainer hooks.

Orientation follows SAELens so files interoperate: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`,
`b_enc [d_sae]`, `b_dec [d_in]`. An architecture subclasses `SAE`, declares its `Config`, and
overrides `activation` (pre-activations to latents) and `loss_terms`. The trainer only calls the
hooks defined here and never branches on the architecture's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, PositiveInt

from saelab.config import StrictModel, describe_validation_error  # noqa: F401 (re-exported)
from saelab.errors import ConfigError
from saelab.sae.sparse import Selection, SparseActs, dense_preacts, selected_preacts, sparse_decode

SweepKind = Literal["count", "coefficient"]


class SAEConfig(StrictModel):
    """Settings shared by every architecture. Unknown keys are rejected, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    architecture: str = Field(description="Registered architecture name (see saelab.list_architectures()).")
    d_in: PositiveInt = Field(description="Width of the activations the SAE reads.")
    d_sae: PositiveInt = Field(description="Number of latents (dictionary size).")
    apply_b_dec_to_input: bool = Field(True, description="Subtract b_dec from x before encoding.")
    decoder_norm: Literal["unit", "penalty"] = Field(
        "unit",
        description="'unit': decoder rows held at unit norm (renormalised each step, parallel "
        "gradient removed); 'penalty': rows free, the sparsity penalty is weighted by their norms.",
    )
    seed: int = Field(0, description="Seed for weight initialisation.")
    site: str | None = Field(
        None,
        description="The named site this SAE reads and writes, for sources that yield several per batch "
        "(None: the batch's own activations).",
    )


@dataclass
class StepContext:
    """What the trainer tells an architecture at each step."""

    sparsity_scale: float = 1.0  # warm-up multiplier on the sparsity coefficient, in [0, 1]
    dead_mask: torch.Tensor | None = None  # [d_sae] bool, latents that have not fired for long
    step: int = 0  # optimizer steps taken so far
    total_steps: int = 1  # steps the run will take (for schedules owned by an architecture)
    batch: Any = None  # the source's Batch (token ids, targets, true features) for variants that need it
    target: torch.Tensor | None = None  # what the decoder must reproduce, scaled (an SAE's: x itself)

    def target_for(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction goal of a step whose input is `x` (x itself unless a target was given)."""
        return x if self.target is None else self.target


@dataclass
class TrainOutput:
    """One training forward pass: reconstruction, latents and every loss term by name.

    `feature_acts` is dense, or `SparseActs` when the step ran the sparse kernels; the trainer
    reads it only through `fired_counts` and `mean_l0`, so it never densifies a sparse step.
    """

    x_hat: torch.Tensor
    feature_acts: torch.Tensor | SparseActs
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return torch.stack(list(self.losses.values())).sum()

    def fired_counts(self) -> torch.Tensor:
        """[d_sae] number of batch rows on which each latent was non-zero."""
        if isinstance(self.feature_acts, SparseActs):
            return self.feature_acts.fired_counts()
        return (self.feature_acts.detach() != 0).sum(0)

    def mean_l0(self) -> float:
        return int(self.fired_counts().sum()) / self.feature_acts.shape[0]

    def dense_feature_acts(self) -> torch.Tensor:
        f = self.feature_acts
        return f.to_dense() if isinstance(f, SparseActs) else f


def encoder_matmul(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    bias: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - b_dec) @ W_enc + bias, computed as x @ W_enc + (bias - b_dec @ W_enc).

    Same value, but b_dec moves into a [d_sae] bias: when x needs no gradient (training data)
    the backward skips the full-size matmul that would only serve b_dec's gradient, and no
    extra pass over the [B, d_sae] pre-activations is made. `out` (2-D x, no autograd) receives
    the result.
    """
    shift = bias if b_dec is None else bias - b_dec @ W_enc
    if x.dim() == 2:
        return torch.addmm(shift, x, W_enc, out=out)
    return x @ W_enc + shift


# [B, d_sae] pre-activation buffers by (B, d_sae, dtype, device), shared by every SAE in the
# process: training steps run one at a time (see SAE.training_pre_acts).
_PRE_BUFFERS: dict[tuple, torch.Tensor] = {}


def mse_per_token(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the activation dimension, averaged over the batch."""
    return (x_hat - x).pow(2).sum(-1).mean()


class SAE(torch.nn.Module):
    """Base sparse autoencoder. Subclasses set `architecture`, `Config` and `activation`."""

    architecture: ClassVar[str] = ""
    Config: ClassVar[type[SAEConfig]] = SAEConfig
    # The config field that trades sparsity for fidelity (a sparsity coefficient, or k);
    # sweeps and frontier plots vary it without knowing the architecture.
    sweep_parameter: ClassVar[str | None] = None
    # How it varies: "count" (active latents per token, set relative to the true L0) or
    # "coefficient" (a sparsity penalty: fewer active latents as it grows). `sweep_setting` in
    # saelab.sae.registry turns a sweep multiplier into a value for either.
    sweep_kind: ClassVar[SweepKind | None] = None
    # True for baselines fitted in closed form (PCA, ICA, NMF, ...): `saelab.train` calls their
    # `fit(sample)` on the first batches instead of running the gradient loop.
    fitted: ClassVar[bool] = False
    # True when decode needs each row's token id (Tokenized): views for tools that decode without
    # ids (saelab.io.saebench) refuse such an SAE instead of decoding it wrongly.
    uses_tokens: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        # Kaiming-uniform decoder rows, rescaled to unit norm; encoder tied to decoder^T at init.
        w_dec = torch.empty(cfg.d_sae, cfg.d_in).uniform_(-1, 1, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_dec.t().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in))

    def extra_repr(self) -> str:
        knob = f", {self.sweep_parameter}={getattr(self.cfg, self.sweep_parameter)}" if self.sweep_parameter else ""
        return f"d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}{knob}"

    # ------------------------------------------------------------------ inference
    def encoder_bias(self) -> torch.Tensor:
        """The [d_sae] bias of the encoder whose pre-activations decide firing (Gated: the gate's)."""
        return self.b_enc

    @property
    def input_b_dec(self) -> torch.Tensor | None:
        """What the encoder subtracts from x: b_dec, or nothing (`apply_b_dec_to_input=False`)."""
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return encoder_matmul(x, self.W_enc, self.input_b_dec, self.encoder_bias())

    @torch.no_grad()
    def training_pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """`pre_acts(x)` without a graph, written into a [B, d_sae] buffer kept between steps.

        The caller must not keep the result past the step. A fresh tensor of that size every step
        comes from the OS page by page (large blocks are unmapped when freed), which cost 10-20%
        of the encoder matmul on CPU; the graph is attached later (`preacts_with_grad`). SAEs of
        one shape share the buffer (a sweep's members step one at a time).
        """
        key = (x.shape[0], self.cfg.d_sae, x.dtype, x.device)
        buf = _PRE_BUFFERS.get(key)
        if buf is None:
            buf = _PRE_BUFFERS[key] = x.new_empty(key[:2])
        return encoder_matmul(x, self.W_enc, self.input_b_dec, self.encoder_bias(), out=buf)

    def release_training_buffers(self) -> None:
        """Free the step buffers of this SAE's width (`training_pre_acts` makes them again)."""
        for key in [k for k in _PRE_BUFFERS if k[1] == self.cfg.d_sae]:
            del _PRE_BUFFERS[key]

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preacts_with_grad(self, pre: torch.Tensor, x: torch.Tensor, sel: Selection | None = None) -> torch.Tensor:
        """Attach the encoder's gradient to pre-activations computed without a graph.

        Training steps compute `pre` once under no_grad, choose their latents from it, and then
        ask for gradients only where they need them: at `sel` (sparse backward, see
        `saelab.sae.sparse`) or everywhere (`sel=None`, the dense backward).
        """
        if sel is None:
            return dense_preacts(pre, x, self.W_enc, self.encoder_bias(), self.input_b_dec)
        return selected_preacts(sel, pre, x, self.W_enc, self.encoder_bias(), self.input_b_dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.activation(self.pre_acts(x))

    def decode(self, f: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens` (the token id at each row) matter only to token-aware variants (Tokenized);
        every caller passes them when it has them, so no caller needs to know the architecture."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x), tokens)

    def decode_selected(self, sel: Selection, values: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`decode` of latents that are `values` at `sel` and zero elsewhere, without densifying."""
        return sparse_decode(sel, values, self.W_dec) + self.b_dec

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ConfigError(
                f"input has last dimension {x.shape[-1]} but this SAE has d_in={self.cfg.d_in}; "
                "pass activations from the hookpoint the SAE was trained on"
            )

    # ------------------------------------------------------------------ training
    def init_from_data(self, sample: Any) -> None:
        """Data-dependent initialisation (k-means candidates, per-token means, fitted baselines).

        The trainer calls it once before the first step (never on resume) with a `Batch` of the
        first batches, inputs already scaled and b_dec initialised. Default: nothing.
        """

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def sparsity_weights(self) -> torch.Tensor | float:
        """Per-latent weight on the sparsity penalty: decoder norms in 'penalty' mode, else 1."""
        return self.decoder_norms() if self.cfg.decoder_norm == "penalty" else 1.0

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        """The training forward: reconstruction plus every loss term, by name."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return TrainOutput(x_hat, f, {"mse": mse_per_token(x_hat, ctx.target_for(x))})

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """With unit-norm decoder rows, remove the gradient component parallel to each row."""
        if self.cfg.decoder_norm == "unit" and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            # (g . w/|w|) w/|w| = (g . w) w / |w|^2: no normalised copy of W_dec, one in-place update
            coef = torch.einsum("ij,ij->i", g, W) / torch.einsum("ij,ij->i", W, W).clamp_min(
                1e-24
            )  # row dots, no temporaries
            g.addcmul_(W, coef[:, None], value=-1)

    @torch.no_grad()
    def after_optimizer_step(self, out: TrainOutput) -> None:
        """Hold decoder rows at unit norm ('unit' mode); subclasses add their own updates."""
        if self.cfg.decoder_norm == "unit":
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------------ saving
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make the SAE take raw inputs when it was trained on `x * scale`.

        encode: (x*s - b_dec) W_enc = (x - b_dec/s)(s W_enc); decode: (f W_dec + b_dec)/s.
        Pre-activations (and hence thresholds and latents) are unchanged.
        """
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    def saved_architecture(self) -> str:
        """The architecture name written to disk (BatchTopK saves as JumpReLU)."""
        return self.architecture

    def saved_config_extras(self) -> dict[str, Any]:
        """Architecture-specific keys for the saved cfg.json (e.g. TopK's `k`)."""
        return {}

    @classmethod
    def config_from_saved(cls, saved_cfg: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """Config values this architecture reads back from a saved cfg.json (inverse of the above)."""
        return {}

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Tensors written to disk under SAELens names; override to transform at save time."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_saved_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `saved_state`."""
        self.load_state_dict(tensors)
