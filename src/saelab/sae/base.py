"""The SAE base class: orientation, encode/decode/forward, named loss terms and trainer hooks.

Orientation follows SAELens so files interoperate: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`,
`b_enc [d_sae]`, `b_dec [d_out]` (d_out = d_in for an SAE). An architecture subclasses `SAE`,
declares its `Config`, and overrides `activation` (pre-activations to latents) and `loss_terms`.
The trainer only calls the hooks defined here and never branches on the architecture's name.

One class is every kind of dictionary, told apart by the sites its config reads and writes:
- an **SAE** reads one site and reproduces it (`site`, or the batch's own activations);
- a **transcoder** reads `site` and writes another, `write_site` (an MLP's input and output). Its
  input bias `b_in [d_in]` is its own (b_dec lives in the output space), and with `skip` a linear
  `W_skip [d_out, d_in]`, zero at init, adds `x @ W_skip.T` to the output;
- a **crosscoder** reads and writes several sites (`site: [a, b, ...]`, equal widths): it sees
  their concatenation, so one latent vector comes from the sum of per-site encoders, and its
  decoder norm is the sum of per-site row norms (the sparsity weight of Lindsey et al.).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch
from pydantic import ConfigDict, Field, PositiveInt, model_validator

from saelab.config import StrictModel, describe_validation_error  # noqa: F401 (re-exported)
from saelab.errors import ConfigError
from saelab.sae.sparse import Selection, SparseActs, dense_preacts, selected_preacts, sparse_decode

SweepKind = Literal["count", "coefficient"]


class SAEConfig(StrictModel):
    """Settings shared by every architecture. Unknown keys are rejected, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    architecture: str = Field(description="Registered architecture name (see saelab.list_architectures()).")
    d_in: PositiveInt = Field(description="Width of what the dictionary reads (all its read sites together).")
    d_sae: PositiveInt = Field(description="Number of latents (dictionary size).")
    d_out: PositiveInt | None = Field(
        None, description="Width of what it writes, all write sites together (None: d_in; transcoders only)."
    )
    apply_b_dec_to_input: bool = Field(True, description="Subtract b_dec from x before encoding.")
    decoder_norm: Literal["unit", "penalty"] = Field(
        "unit",
        description="'unit': decoder rows held at unit norm (renormalised each step, parallel "
        "gradient removed); 'penalty': rows free, the sparsity penalty is weighted by their norms.",
    )
    seed: int = Field(0, description="Seed for weight initialisation.")
    site: str | list[str] | None = Field(
        None,
        description="The named site the dictionary reads (and writes, unless write_site says otherwise), "
        "for sources that yield several per batch; a list of sites is a crosscoder, which reads and writes "
        "their concatenation (None: the batch's own activations).",
    )
    write_site: str | None = Field(
        None, description="The site a transcoder writes (e.g. an MLP's output when `site` is its input)."
    )
    skip: bool = Field(False, description="Add a linear skip connection W_skip from input to output (transcoders).")

    @model_validator(mode="before")
    @classmethod
    def _free_decoder_across_sites(cls, values: Any) -> Any:
        """Transcoders and crosscoders leave decoder rows free unless told otherwise: a crosscoder's
        penalty weighs each site's row norm, and a transcoder's rows map into another space."""
        if isinstance(values, dict) and "decoder_norm" not in values:
            allowed = get_args(cls.model_fields["decoder_norm"].annotation)
            across = values.get("write_site") is not None or isinstance(values.get("site"), list)
            if across and "penalty" in allowed:
                values = {**values, "decoder_norm": "penalty"}
        return values

    @model_validator(mode="after")
    def _check_sites(self):
        sites = self.site if isinstance(self.site, list) else None
        if sites is not None:
            if len(sites) < 2:
                raise ValueError(
                    f"site lists {sites}: a crosscoder reads at least two sites; for one site write site: "
                    f"{sites[0] if sites else 'NAME'!r} (an SAE)"
                )
            if len(set(sites)) != len(sites):
                raise ValueError(f"site lists a site twice ({sites}); name each site once")
            if self.d_in % len(sites):
                raise ValueError(
                    f"d_in={self.d_in} is not divisible by the {len(sites)} sites; a crosscoder's sites have equal "
                    "widths and d_in is their sum"
                )
            if self.write_site is not None:
                raise ValueError("a crosscoder writes the sites it reads; drop write_site")
        if self.write_site is not None:
            if self.site is None:
                raise ValueError(f"write_site={self.write_site!r} needs `site`, the site the transcoder reads")
            if self.write_site == self.site:
                raise ValueError(
                    f"site and write_site are both {self.site!r}: a dictionary that writes what it reads is an "
                    "SAE; drop write_site"
                )
        elif self.d_out is not None and self.d_out != self.d_in:
            raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in} but no write_site names the output")
        if self.skip and self.write_site is None:
            raise ValueError("skip (a linear input-to-output map) needs a transcoder: set write_site")
        return self

    @property
    def read_sites(self) -> list[str] | None:
        """The sites read, in the order they are concatenated (None: the batch's own activations)."""
        return None if self.site is None else (list(self.site) if isinstance(self.site, list) else [self.site])

    @property
    def write_sites(self) -> list[str] | None:
        return [self.write_site] if self.write_site is not None else self.read_sites

    @property
    def output_width(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def is_transcoder(self) -> bool:
        return self.write_site is not None

    @property
    def n_sites(self) -> int:
        """How many sites the decoder writes (per-site decoder norms split its rows that many ways)."""
        return len(self.write_sites or [None])


@dataclass
class StepContext:
    """What the trainer tells an architecture at each step."""

    sparsity_scale: float = 1.0  # warm-up multiplier on the sparsity coefficient, in [0, 1]
    dead_mask: torch.Tensor | None = None  # [d_sae] bool, latents that have not fired for long
    step: int = 0  # optimizer steps taken so far
    total_steps: int = 1  # steps the run will take (for schedules owned by an architecture)
    batch: Any = None  # the source's Batch (token ids, targets, true features) for variants that need it
    target: torch.Tensor | None = None  # what the decoder must reproduce, scaled (an SAE's: x itself)
    input_factor: float | torch.Tensor = 1.0  # what the trainer multiplied the raw input by (x = raw * this)

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
    # Whether the architecture can read one site and write another (a transcoder), or read and
    # write several (a crosscoder); the others are refused at construction with the capable list.
    # Declared by each class itself, never inherited: a subclass that changes the step opts in.
    transcodes: ClassVar[bool] = False
    crosscodes: ClassVar[bool] = False
    # True when the architecture only exists over named sites of several layers (a cross-layer
    # transcoder): it cannot train on one activation stream, so plans that train every architecture
    # on a toy world (demo, toy bench) take `list_architectures(one_stream=True)`.
    needs_sites: ClassVar[bool] = False
    # Whether the trainer revives this architecture's dead latents by `resample` (the threshold
    # families: ReLU, Gated, JumpReLU). The TopK family revives through AuxK in its loss instead.
    resamples_dead: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self._check_capable(cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        d_out = cfg.output_width
        # Kaiming-uniform decoder rows, rescaled to unit norm; encoder tied to decoder^T at init
        # when it reads the space it writes, else drawn the same way in its own space.
        w_dec = torch.empty(cfg.d_sae, d_out).uniform_(-1, 1, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        if cfg.is_transcoder:
            w_enc = torch.empty(cfg.d_in, cfg.d_sae).uniform_(-1, 1, generator=gen)
            w_enc = w_enc / w_enc.norm(dim=0, keepdim=True)
        else:
            w_enc = w_dec.t().clone(memory_format=torch.contiguous_format)  # own memory even when d_sae is 1
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_enc)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out))
        if cfg.is_transcoder:
            self.b_in = torch.nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.skip:
            self.W_skip = torch.nn.Parameter(torch.zeros(d_out, cfg.d_in))
        if cfg.n_sites > 1:
            # What each site's activations were multiplied by in training (1 until `fold_scales`):
            # per-site decoder norms are reported in that space, where every site has mean norm
            # sqrt(d), so a site's raw scale neither biases relative norms nor changes selection.
            self.register_buffer("site_norm_scale", torch.ones(cfg.n_sites))

    @classmethod
    def can(cls, kind: str) -> bool:
        """Whether this class itself declares it can be a `transcoder` or a `crosscoder`."""
        return bool(vars(cls).get({"transcoder": "transcodes", "crosscoder": "crosscodes"}[kind], False))

    @classmethod
    def _check_capable(cls, cfg: SAEConfig) -> None:
        from saelab.sae.registry import capable_architectures

        for kind, able in (
            ("transcoder", cfg.is_transcoder and not cls.transcodes),
            ("crosscoder", isinstance(cfg.site, list) and not cls.crosscodes),
        ):
            if able:
                raise ConfigError(
                    f"architecture '{cls.architecture}' cannot be a {kind}; architectures that can: "
                    f"{', '.join(capable_architectures(kind))}"
                )

    def extra_repr(self) -> str:
        knob = f", {self.sweep_parameter}={getattr(self.cfg, self.sweep_parameter)}" if self.sweep_parameter else ""
        out = f", d_out={self.cfg.output_width}" if self.cfg.is_transcoder else ""
        return f"d_in={self.cfg.d_in}{out}, d_sae={self.cfg.d_sae}{knob}"

    # ------------------------------------------------------------------ inference
    def encoder_bias(self) -> torch.Tensor:
        """The [d_sae] bias of the encoder whose pre-activations decide firing (Gated: the gate's)."""
        return self.b_enc

    @property
    def input_b_dec(self) -> torch.Tensor | None:
        """What the encoder subtracts from x: a transcoder's own input bias `b_in`; else b_dec, or
        nothing (`apply_b_dec_to_input=False`)."""
        if self.cfg.is_transcoder:
            return self.b_in
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
        out = self.decode(self.encode(x), tokens)
        return out if not self.cfg.skip else out + self.skip_out(x)

    def skip_out(self, x: torch.Tensor) -> torch.Tensor:
        """A skip transcoder's linear part, x @ W_skip.T (its FVU alone is reported beside the rest)."""
        return x @ self.W_skip.t()

    def train_forward(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        """What the trainer calls: `loss_terms`, with a skip connection's output taken off the target
        (so every architecture's reconstruction losses train W_skip too) and put back on `x_hat`."""
        if not self.cfg.skip:
            return self.loss_terms(x, ctx)
        skip = self.skip_out(x)
        ctx.target = ctx.target_for(x) - skip
        out = self.loss_terms(x, ctx)
        out.x_hat = out.x_hat + skip
        return out

    def decode_selected(self, sel: Selection, values: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`decode` of latents that are `values` at `sel` and zero elsewhere, without densifying."""
        return sparse_decode(sel, values, self.W_dec) + self.b_dec

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            where = f" (sites {self.cfg.read_sites}, concatenated)" if isinstance(self.cfg.site, list) else ""
            raise ConfigError(
                f"input has last dimension {x.shape[-1]} but this SAE has d_in={self.cfg.d_in}{where}; "
                "pass activations from the hookpoint the SAE was trained on"
            )

    # ------------------------------------------------------------------ training
    def init_from_data(self, sample: Any) -> None:
        """Data-dependent initialisation (k-means candidates, per-token means, fitted baselines).

        The trainer calls it once before the first step (never on resume) with a `Batch` of the
        first batches, inputs already scaled and b_dec initialised. Default: nothing.
        """

    def decoder_norms(self) -> torch.Tensor:
        """[d_sae] norm of each decoder row; with several write sites, the sum of per-site norms."""
        n = self.cfg.n_sites
        if n == 1:
            return self.W_dec.norm(dim=1)
        return self.site_decoder_norms().sum(1)

    def site_decoder_norms(self) -> torch.Tensor:
        """[d_sae, n_sites] norm of each latent's decoder row within each write site, in the
        space it was trained in (each site at mean norm sqrt(d); see `site_norm_scale`)."""
        raw = self.W_dec.reshape(self.cfg.d_sae, self.cfg.n_sites, -1).norm(dim=-1)
        return raw * self.site_norm_scale

    def sparsity_weights(self) -> torch.Tensor | float:
        """Per-latent weight on the sparsity penalty: decoder norms in 'penalty' mode, else 1."""
        return self.decoder_norms() if self.cfg.decoder_norm == "penalty" else 1.0

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        """The training forward: reconstruction plus every loss term, by name."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return TrainOutput(x_hat, f, {"mse": mse_per_token(x_hat, ctx.target_for(x))})

    @property
    def revives_by_resampling(self) -> bool:
        """`resamples_dead` as the class itself declares it (never inherited: a subclass that ties or
        constrains weights, like a tied-encoder ReLU, would be broken by a resample)."""
        return bool(vars(type(self)).get("resamples_dead", False))

    def training_metrics(self) -> dict[str, float]:
        """Scalars the architecture adds to each metrics record (e.g. an adapted coefficient)."""
        return {}

    def latent_parameters(self) -> list[tuple[torch.nn.Parameter, int]]:
        """(parameter, axis) for every parameter with one slice per latent: what a revived latent
        owns (the trainer resets its Adam moments there)."""
        out = [(self.W_enc, 1), (self.W_dec, 0)]
        bias = self.encoder_bias()
        return out + ([(bias, 0)] if isinstance(bias, torch.nn.Parameter) else [])

    # Encoder norm of a resampled latent, relative to the mean alive latent's (Bricken et al. 2023).
    RESAMPLE_ENCODER_SCALE: ClassVar[float] = 0.2
    # The direction of a resampled latent's encoder column: the drawn row's input (Bricken et al.
    # 2023), or its residual, i.e. the new decoder row (W_enc = W_dec^T, as Gao et al. initialise),
    # for architectures whose `after_resample` sets the pre-activation on the row to clear a
    # selection cut: a residual is mostly the features the live latents missed, so such a latent
    # fires on every row carrying them, where one along the whole input fires only near its row.
    RESAMPLE_ENCODER_FROM: ClassVar[Literal["input", "residual"]] = "input"
    # Where `after_resample` scales a latent to clear a cut (the TopK family's selection, JumpReLU's
    # threshold): its pre-activation on its own row, relative to that cut. Drawn rows are the worst
    # reconstructed, where the missing feature is large; at 2 the latent fires wherever the feature
    # is over half that size (on a toy world, 80-90% of the rows carrying it after a revival, and
    # 1-6% of the others), where 1.5 reached 55-80% and 3 fired on 4-14% of the others.
    RESAMPLE_MARGIN: ClassVar[float] = 2.0

    @torch.no_grad()
    def resample(self, latents: torch.Tensor, x: torch.Tensor, target: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Re-initialise `latents` (indices) towards badly reconstructed rows (Bricken et al. 2023).

        Rows of the batch are drawn with probability proportional to their squared loss squared;
        each latent's decoder row becomes its row's residual `target - x_hat` (the output space,
        so a transcoder's d_out is respected), at unit norm (or the mean alive row norm with free
        rows), and its encoder column the row's encoder input `x - input_b_dec` (the input space;
        or the residual's direction, see `RESAMPLE_ENCODER_FROM`, where the residual lives in the
        input space and points within about 73 degrees of the input), at `RESAMPLE_ENCODER_SCALE`
        times the mean alive encoder norm, with a zero bias, so it starts small and must earn its
        place. `after_resample` sets what else a latent owns. Uses torch's global RNG (seeded and
        checkpointed by the trainer).
        """
        n = latents.numel()
        resid = target - x_hat
        weight = resid.pow(2).sum(-1).pow(2).double()
        if not torch.isfinite(weight).all() or float(weight.sum()) <= 0:
            weight = torch.ones_like(weight)
        rows = torch.multinomial(weight.cpu(), n, replacement=n > weight.numel()).to(x.device)
        alive = torch.ones(self.cfg.d_sae, dtype=torch.bool, device=x.device)
        alive[latents] = False
        r = resid[rows]
        r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u = x[rows] - (self.input_b_dec if self.input_b_dec is not None else 0)
        u_norm = u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction = u / u_norm
        if self.RESAMPLE_ENCODER_FROM == "residual" and r.shape == u.shape:
            cos = (r * direction).sum(1, keepdim=True)
            direction = torch.where(cos > 0.3, r, direction)
        if self.cfg.decoder_norm != "unit" and alive.any():
            r = r * self.W_dec[alive].norm(dim=1).mean()
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else self.W_enc.new_tensor(1.0)
        scale = self.RESAMPLE_ENCODER_SCALE * enc_norm
        self.W_dec[latents] = r.to(self.W_dec.dtype)
        self.W_enc[:, latents] = (direction * scale).t().to(self.W_enc.dtype)
        self.encoder_bias()[latents] = 0.0
        preact_on_row = scale * (direction * u).sum(1)
        self.after_resample(latents, preact_on_row.to(self.W_enc.dtype), x[rows])

    def after_resample(self, latents: torch.Tensor, preact_on_row: torch.Tensor, rows: torch.Tensor) -> None:
        """Set a resampled latent's own parameters (thresholds, gates); `preact_on_row` is its new
        pre-activation on the row it was drawn towards, `rows` those rows (encoder inputs, as the
        batch gave them). Default: nothing."""

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
    def fold_scales(self, input_scale: float | torch.Tensor, target_scale: float | torch.Tensor) -> None:
        """Make the dictionary take raw activations when it was trained on `x * input_scale` to
        reproduce `target * target_scale` (each a number, or a vector with one entry per column,
        for per-site scales). One equal number for both is `fold_input_scale`.

        encode: (x s - b) W_enc = (x - b/s)(diag(s) W_enc); decode: y = (f W_dec + b_dec + x s W_skip^T)/t.
        Pre-activations (and hence thresholds and latents) are unchanged.
        """
        same = not isinstance(input_scale, torch.Tensor) and not isinstance(target_scale, torch.Tensor)
        if same and input_scale == target_scale and not self.cfg.is_transcoder:
            self.fold_input_scale(float(input_scale))
            return
        s = torch.as_tensor(input_scale, dtype=self.W_enc.dtype, device=self.W_enc.device)
        t = torch.as_tensor(target_scale, dtype=self.W_dec.dtype, device=self.W_dec.device)
        self.W_enc.mul_(s.reshape(-1, 1) if s.dim() else s)
        if self.cfg.is_transcoder:
            self.b_in.div_(s)
        self.W_dec.div_(t)
        self.b_dec.div_(t)  # for an SAE or crosscoder b_dec is also the input bias, and s = t there
        if self.cfg.n_sites > 1:
            self.site_norm_scale.mul_(t.expand(self.cfg.output_width).reshape(self.cfg.n_sites, -1)[:, 0])
        if self.cfg.skip:
            self.W_skip.mul_(s).div_(t.reshape(-1, 1) if t.dim() else t)

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
