"""Hand-built U-AND circuits, returned as ordinary `UANDModel`s so they share every metric.

- Hänni et al. (arXiv 2408.05451) sparse construction: W in {0,1} with P(1) = p, bias -1, so a
  neuron fires only when >= 2 of its inputs are on; pair (i, j) is read off as the average of
  the neurons wired to both. Error grows with s*p (other active inputs on shared neurons); p^2 d
  must be large enough that every pair has shared neurons.
- Dense binary construction (the circuit the trained model is claimed to find): W = +-u with
  P(+) = skew, one shared bias, and the sign-product read-off R_(ij),n = alpha * sign(W_ni)
  sign(W_nj) + offset: classes A and C count +1, B1 and B2 count -1, and only the ReLU kink leaves
  an x_i x_j term. Optionally the read-off is instead fitted by least squares (readout.py).

Inputs in superposition (task.embed = E) are handled by reading x back linearly first:
W_eff = W E^T, since E^T E ~ I for near-orthogonal columns.
"""

from __future__ import annotations

import torch

from saelab.errors import ConfigError
from saelab.uand.data import UANDTask
from saelab.uand.metrics import Metrics, evaluate
from saelab.uand.model import ModelConfig, UANDModel, random_weights
from saelab.uand.readout import fit_readout

ALL_FROZEN = ("W", "b", "R", "c")


def frozen_model(task: UANDTask, W: torch.Tensor, b: torch.Tensor, R: torch.Tensor, c: torch.Tensor) -> UANDModel:
    if task.embed is not None:
        W = W @ task.embed.T
    model = UANDModel(task.n_in, task.n_pairs, ModelConfig(d=W.shape[0], frozen=ALL_FROZEN))
    with torch.no_grad():
        model.W.copy_(W)
        model.b.copy_(b)
        model.R.copy_(R)
        model.c.copy_(c)
    return model


def _check(d: int, name: str, value: float) -> None:
    if d < 1:
        raise ConfigError(f"d={d}: a construction needs at least 1 neuron")
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name}={value}: must lie in (0, 1]")


def hanni_construction(task: UANDTask, d: int, p: float, seed: int = 0) -> UANDModel:
    """Sparse 0/1 wiring with bias -1 and the averaging read-off over shared neurons."""
    _check(d, "p", p)
    gen = torch.Generator().manual_seed(seed)
    W = (torch.rand(d, task.m, generator=gen) < p).float()
    i, j = task.pairs
    shared = W[:, i] * W[:, j]  # [d, P]: neuron n is wired to both inputs of the pair
    R = (shared / shared.sum(0).clamp(min=1.0)).T  # pairs with no shared neuron read 0
    return frozen_model(task, W, torch.full((d,), -1.0), R, torch.zeros(task.n_pairs))


def sign_product_readout(W: torch.Tensor, task: UANDTask) -> torch.Tensor:
    """R [P, d] with R_(ij),n = sign(W_ni) sign(W_nj): +1 for classes A and C, -1 for B1 and B2."""
    sign = torch.sign(W).T.contiguous()  # [m, d]
    i, j = task.pairs
    R = torch.empty(task.n_pairs, W.shape[0])
    for start in range(0, task.n_pairs, 65536):  # chunks: no [d, P] temporaries at m = 1000
        sl = slice(start, start + 65536)
        torch.mul(sign[i[sl]], sign[j[sl]], out=R[sl])
    return R


@torch.no_grad()
def calibrate(model: UANDModel, task: UANDTask, x: torch.Tensor, inputs: torch.Tensor) -> tuple[float, float]:
    """Rescale the read-out to alpha*y + beta minimising the balanced (per-class) squared error.

    Two global numbers for all pairs, so it fixes the scale of a hand-built read-off without
    fitting anything pair-specific.
    """
    sums = torch.zeros(2, 5, dtype=torch.float64)  # per class: n, sum z, sum z^2, sum z*y, sum y
    chunk = max(1, 2_000_000 // task.n_pairs)
    for start in range(0, len(x), chunk):
        z = model(inputs[start : start + chunk]).double().flatten()
        y = task.targets(x[start : start + chunk]).double().flatten()
        cls = (y > 0.5).long()
        for k in (0, 1):
            sel = cls == k
            zk, yk = z[sel], y[sel]
            sums[k] += torch.stack([sel.sum().double(), zk.sum(), zk.square().sum(), (zk * yk).sum(), yk.sum()])
    w = torch.where(sums[:, 0] > 0, 0.5 / sums[:, 0].clamp(min=1), torch.zeros(2, dtype=torch.float64))
    n, sz, szz, szy, sy = (w[:, None] * sums).sum(0)
    normal = torch.tensor([[szz, sz], [sz, n]], dtype=torch.float64)
    alpha, beta = torch.linalg.lstsq(normal, torch.tensor([szy, sy], dtype=torch.float64)[:, None]).solution.flatten()
    model.R.mul_(float(alpha))
    model.c.mul_(float(alpha)).add_(float(beta))
    return float(alpha), float(beta)


def dense_binary_construction(
    task: UANDTask,
    d: int,
    bias: float,
    skew: float = 0.5,
    u: float = 1.0,
    readout: str = "sign",
    seed: int = 0,
    calib: tuple[torch.Tensor, torch.Tensor] | None = None,
    n_fit: int = 50_000,
    weighting: str = "cells",
) -> UANDModel:
    """Random +-u weights with P(+) = skew and one shared bias; read-off by sign product or least squares.

    `calib` = (x, inputs) is the sample the sign-product read-off is scaled on (two numbers for
    all pairs); the least-squares read-off draws `n_fit` fresh samples instead and uses
    `weighting` (see readout.solve_readout).
    """
    _check(d, "skew", max(skew, 1e-12))
    gen = torch.Generator().manual_seed(seed)
    W = random_weights((d, task.m), "skewed_binary", gen, scale=u, skew=skew)
    b = torch.full((d,), float(bias))
    if readout == "sign":
        model = frozen_model(task, W, b, sign_product_readout(W, task), torch.zeros(task.n_pairs))
        if calib is None:
            calib = task.sample(2000, torch.Generator().manual_seed(seed + 1))
        calibrate(model, task, *calib)
        return model
    if readout == "lstsq":
        model = frozen_model(task, W, b, torch.zeros(task.n_pairs, d), torch.zeros(task.n_pairs))
        R, c = fit_readout(model.hidden, task, n_fit, seed=seed + 1, weighting=weighting)
        with torch.no_grad():
            model.R.copy_(R)
            model.c.copy_(c)
        return model
    raise ConfigError(f"readout={readout!r}: choose 'sign' or 'lstsq'")


def tune(
    build, grid, task: UANDTask, val: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, UANDModel, Metrics, list[dict]]:
    """Best grid value by balanced MSE on a validation sample: constructions get a fair, tuned shot."""
    rows = []
    best = None
    for value in grid:
        model = build(value)
        metrics = evaluate(model, task, *val)
        rows.append({"value": float(value), "balanced_mse": metrics.balanced_mse})
        if best is None or metrics.balanced_mse < best[2].balanced_mse:
            best = (float(value), model, metrics)
    return best[0], best[1], best[2], rows
