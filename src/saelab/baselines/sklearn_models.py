"""Classic decompositions behind the SAE interface: PCA, ICA, NMF, mini-batch dictionary learning.

scikit-learn does the fitting, once, on the first batches (`fit`, called by `saelab.train` with
inputs already scaled and b_dec at the geometric median, as the training loop would start); nothing
is trained by gradient, so these never enter the loop. The fitted weights are buffers, so
`saelab.save`/`load`, `fold_input_scale` and every metric work as for any SAE.

- `pca`, `ica`: linear encoders. They have at most d_in components; with d_sae > d_in the extra
  latents are zero (reported as dead), never silently dropped.
- `nmf`: NMF needs non-negative data, so x - b_dec is split into [relu(.), relu(-.)] (2 d_in
  columns) and each component's decoder row is its positive half minus its negative half.
  Encoding solves the non-negative least squares problem with the fitted components.
- `dictionary_learning`: scikit-learn's MiniBatchDictionaryLearning; codes by orthogonal matching
  pursuit with k non-zeros (so L0 <= k, and codes may be negative).
Non-linear encoders read x * input_scale, so folding the input scale keeps codes unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from saelab.activations.base import Batch
from saelab.sae.base import SAE, SAEConfig
from saelab.sae.registry import register


class FittedSAE(SAE):
    """Base for models fitted in closed form or by scikit-learn: weights are buffers, not parameters."""

    fitted = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            value = getattr(self, name).detach().clone()
            delattr(self, name)
            self.register_buffer(name, value)
        self.register_buffer("input_scale", torch.tensor(1.0))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre  # linear codes (PCA, ICA)

    @torch.no_grad()
    def fit(self, sample: Batch) -> None:
        """Fit on `sample` (scaled inputs; b_dec already set), scikit-learn style."""
        x = sample.x.double()
        self._fit_centred((x - self.b_dec.double()).cpu().numpy())

    def _fit_centred(self, centred: np.ndarray) -> None:
        raise NotImplementedError

    def _n_linear(self, n_samples: int) -> int:
        return min(self.cfg.d_sae, self.cfg.d_in, n_samples)

    @torch.no_grad()
    def _set_linear(self, enc: np.ndarray, dec: np.ndarray, offset: np.ndarray | None = None) -> None:
        """Write W_enc [d_in, n], W_dec [n, d_in]; latents beyond n are zeroed (dead)."""
        n = enc.shape[1]
        self.W_enc.zero_()
        self.W_dec.zero_()
        self.b_enc.zero_()
        self.W_enc[:, :n] = torch.as_tensor(enc, dtype=self.W_enc.dtype)
        self.W_dec[:n] = torch.as_tensor(dec, dtype=self.W_dec.dtype)
        if offset is not None:
            self.b_dec += torch.as_tensor(offset, dtype=self.b_dec.dtype)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.input_scale *= scale


class PCAConfig(SAEConfig):
    architecture: str = "pca"


@register
class PCABaseline(FittedSAE):
    """Principal components: the best linear d_sae-dimensional reconstruction, dense codes."""

    architecture = "pca"
    Config = PCAConfig

    def _fit_centred(self, centred: np.ndarray) -> None:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=self._n_linear(len(centred)), random_state=self.cfg.seed).fit(centred)
        comps = pca.components_  # orthonormal rows
        self._set_linear(comps.T, comps, offset=pca.mean_)


class ICAConfig(SAEConfig):
    architecture: str = "ica"
    max_iter: PositiveInt = Field(400, description="FastICA iterations.")


@register
class ICABaseline(FittedSAE):
    """FastICA: maximally non-Gaussian (hence often sparse) linear sources; signs set to positive skew."""

    architecture = "ica"
    Config = ICAConfig

    def _fit_centred(self, centred: np.ndarray) -> None:
        import warnings

        from sklearn.decomposition import FastICA

        ica = FastICA(
            n_components=self._n_linear(len(centred)),
            whiten="unit-variance",
            max_iter=self.cfg.max_iter,
            random_state=self.cfg.seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on tiny samples
            sources = ica.fit_transform(centred)
        sign = np.sign((sources**3).mean(0))
        sign[sign == 0] = 1
        unmix, mix = ica.components_.T * sign, ica.mixing_.T * sign[:, None]
        self._set_linear(unmix, mix, offset=ica.mean_)


class NMFConfig(SAEConfig):
    architecture: str = "nmf"
    alpha: NonNegativeFloat = Field(0.0, description="L1 penalty on the codes (scikit-learn alpha_W, l1_ratio=1).")
    max_iter: PositiveInt = Field(200, description="NMF iterations when fitting.")
    encode_iter: PositiveInt = Field(100, description="Multiplicative-update iterations when encoding new data.")
    fit_samples: PositiveInt = Field(4096, description="At most this many rows are used to fit.")


@register
class NMFBaseline(FittedSAE):
    architecture = "nmf"
    Config = NMFConfig

    def __init__(self, cfg: NMFConfig):
        super().__init__(cfg)
        self.register_buffer("components", torch.cat([torch.relu(self.W_dec), torch.relu(-self.W_dec)], 1))

    @property
    def l1_reg(self) -> float:
        """scikit-learn scales alpha_W by the number of (split) features."""
        return self.cfg.alpha * 2 * self.cfg.d_in

    @staticmethod
    def split(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], -1)

    def _fit_centred(self, centred: np.ndarray) -> None:
        import warnings

        from sklearn.decomposition import NMF

        fits_svd = self.cfg.d_sae <= min(len(centred), 2 * self.cfg.d_in)
        model = NMF(
            n_components=self.cfg.d_sae,
            init="nndsvda" if fits_svd else "random",
            solver="mu",
            alpha_W=self.cfg.alpha,
            l1_ratio=1.0,
            max_iter=self.cfg.max_iter,
            random_state=self.cfg.seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(self.split(torch.as_tensor(centred[: self.cfg.fit_samples])).numpy())
        with torch.no_grad():
            self.components.copy_(torch.as_tensor(model.components_, dtype=self.components.dtype))
            d = self.cfg.d_in
            self.W_dec.copy_(self.components[:, :d] - self.components[:, d:])
            self.W_enc.copy_(self.W_dec.t())  # reference directions only; encoding is NNLS
            self.b_enc.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes for fixed components: Lee-Seung multiplicative updates (scikit-learn's 'mu' rule,
        run in torch because coordinate descent on an overcomplete basis is far too slow per batch)."""
        self._check_input(x)
        with torch.no_grad():
            xs = self.split((x - self.b_dec) * self.input_scale)
            H = self.components
            w = torch.full(
                (x.shape[0], self.cfg.d_sae),
                float((xs.mean() / self.cfg.d_sae).clamp_min(1e-12).sqrt()),
                dtype=x.dtype,
                device=x.device,
            )
            numer = xs @ H.t()
            gram = H @ H.t()
            for _ in range(self.cfg.encode_iter):
                w = w * numer / (w @ gram + self.l1_reg + 1e-12)
        return w


class DictionaryLearningConfig(SAEConfig):
    architecture: str = "dictionary_learning"
    k: PositiveInt = Field(8, description="Non-zero codes per token (orthogonal matching pursuit).")
    alpha: NonNegativeFloat = Field(1.0, description="L1 penalty used while learning the dictionary.")
    epochs: PositiveInt = Field(3, description="Passes over the fitting sample.")
    fit_samples: PositiveInt = Field(4096, description="At most this many rows are used to fit.")

    @model_validator(mode="after")
    def _k_fits(self):
        if self.k > min(self.d_in, self.d_sae):
            raise ValueError(f"k={self.k} exceeds min(d_in, d_sae)={min(self.d_in, self.d_sae)}; OMP needs k <= both")
        return self


@register
class DictionaryLearningBaseline(FittedSAE):
    """scikit-learn's online dictionary learning (Mairal et al. 2009) with OMP codes."""

    architecture = "dictionary_learning"
    Config = DictionaryLearningConfig
    sweep_parameter = "k"
    sweep_kind = "count"

    def __init__(self, cfg: DictionaryLearningConfig):
        super().__init__(cfg)
        self.register_buffer("components", self.W_dec.detach().clone())

    def _fit_centred(self, centred: np.ndarray) -> None:
        import warnings

        from sklearn.decomposition import MiniBatchDictionaryLearning

        model = MiniBatchDictionaryLearning(
            n_components=self.cfg.d_sae,
            alpha=self.cfg.alpha,
            batch_size=256,
            max_iter=self.cfg.epochs,
            fit_algorithm="cd",
            random_state=self.cfg.seed,
        )  # cd: several times faster than lars here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-minibatch lasso convergence warnings
            model.fit(centred[: self.cfg.fit_samples])
        with torch.no_grad():
            self.components.copy_(torch.as_tensor(model.components_, dtype=self.components.dtype))
            self.W_dec.copy_(self.components)
            self.W_enc.copy_(self.components.t())
            self.b_enc.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        from sklearn.decomposition import sparse_encode

        self._check_input(x)
        xs = (x.detach() * self.input_scale - self.b_dec * self.input_scale).double().cpu().numpy()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OMP stops early on linearly dependent atoms; fine
            codes = sparse_encode(
                xs, self.components.double().cpu().numpy(), algorithm="omp", n_nonzero_coefs=self.cfg.k
            )
        return torch.as_tensor(codes, dtype=x.dtype, device=x.device)
