"""Dissecting a one-layer U-AND model: is the circuit dense, binary, sign-structured?

Each function returns plain numbers (dicts of floats) so reports and tests read them directly.
With inputs in superposition, the weight of feature i on neuron n is the effective weight
(W E)_{ni}, the weight the neuron puts on that feature's direction.
"""

from __future__ import annotations

import math

import torch

from saelab.errors import ConfigError
from saelab.uand.data import UANDTask
from saelab.uand.model import UANDModel

CLASS_NAMES = ("A", "B1", "B2", "C")  # sign patterns (+,+), (+,-), (-,+), (-,-) of (W_ni, W_nj)

# Coefficient of variation of |w| for reference distributions: 0 means exactly binary.
REFERENCE_CV = {
    "binary": 0.0,
    "uniform": 1 / math.sqrt(3),
    "gaussian": math.sqrt(math.pi / 2 - 1),
}


def _one_layer(model: UANDModel) -> None:
    if model.config.d2 is not None:
        raise ConfigError("this analysis reads W and R of a one-layer model; the model has d2 set")


def feature_weights(model: UANDModel, task: UANDTask) -> torch.Tensor:
    """[d, m]: weight of each input feature on each neuron (through the embedding if any)."""
    W = model.W.detach()
    return W @ task.embed if task.embed is not None else W


def _pair_sample(task: UANDTask, max_pairs: int, seed: int) -> torch.Tensor:
    if task.n_pairs <= max_pairs:
        return torch.arange(task.n_pairs)
    return torch.randperm(task.n_pairs, generator=torch.Generator().manual_seed(seed))[:max_pairs]


@torch.no_grad()
def circuit_density(
    model: UANDModel, task: UANDTask, inputs: torch.Tensor, threshold: float = 0.1, max_pairs: int = 4096, seed: int = 0
) -> dict:
    """How many neurons matter for each pair.

    The importance of neuron n for pair p is |R_pn| * rms(h_n), the size of its contribution to
    that output. `fraction` is the share of neurons within `threshold` of the pair's largest;
    `participation` is (sum imp)^2 / (d sum imp^2), threshold-free: 1 when all neurons
    contribute equally, about p^2 for the Hänni construction (only shared neurons count).
    """
    _one_layer(model)
    rms = model.hidden(inputs).square().mean(0).sqrt()  # [d]
    pairs = _pair_sample(task, max_pairs, seed)
    imp = model.R.detach()[pairs].abs() * rms  # [p, d]
    top = imp.max(dim=1, keepdim=True).values.clamp(min=1e-12)
    fraction = (imp >= threshold * top).float().mean(1)
    participation = imp.sum(1).square() / (imp.shape[1] * imp.square().sum(1)).clamp(min=1e-12)
    return {
        "fraction": float(fraction.mean()),
        "participation": float(participation.mean()),
        "threshold": threshold,
        "dead_neurons": float((rms == 0).float().mean()),
    }


def weight_binarity(W: torch.Tensor) -> dict:
    """Is |W| concentrated at one value u, and how skewed are the signs?

    `cv` is std/mean of |W| over all entries (0 for exactly binary, 0.58 uniform, 0.76
    Gaussian); `cv_per_neuron` allows each neuron its own u. `near_u` is the share of entries
    within 25% of their neuron's median |W|.
    """
    a = W.detach().abs()
    med = a.median(dim=1, keepdim=True).values.clamp(min=1e-12)
    per_neuron = a.std(dim=1) / a.mean(dim=1).clamp(min=1e-12)
    return {
        "cv": float(a.std() / a.mean().clamp(min=1e-12)),
        "cv_per_neuron": float(per_neuron.median()),
        "near_u": float(((a - med).abs() <= 0.25 * med).float().mean()),
        "frac_positive": float((W > 0).float().mean()),
        "reference_cv": REFERENCE_CV,
    }


@torch.no_grad()
def readout_sign_agreement(model: UANDModel, task: UANDTask, max_pairs: int = 4096, seed: int = 0) -> dict:
    """Does R_(ij),n follow sign(W_ni) sign(W_nj)? Pearson correlation and sign agreement."""
    _one_layer(model)
    pairs = _pair_sample(task, max_pairs, seed)
    sign = torch.sign(feature_weights(model, task))
    i, j = task.pairs
    pattern = (sign[:, i[pairs]] * sign[:, j[pairs]]).T.flatten()  # [p * d]
    R = model.R.detach()[pairs].flatten()
    Rc, Pc = R - R.mean(), pattern - pattern.mean()
    corr = float((Rc * Pc).sum() / (Rc.norm() * Pc.norm()).clamp(min=1e-12))
    agree = float((torch.sign(R) == pattern).float().mean())
    return {"correlation": corr, "sign_agreement": agree}


@torch.no_grad()
def neuron_class_table(model: UANDModel, task: UANDTask, n_pairs: int = 64, n_samples: int = 64, seed: int = 0) -> dict:
    """Mean activation of each neuron class A/B1/B2/C for each cell of its pair.

    For each sampled pair (i, j) and cell v, draw background inputs from the task, set
    (x_i, x_j) = v, and average each neuron's activation; neurons are grouped by the signs of
    their two weights. Rows are classes, columns the cells 00, 01, 10, 11.
    """
    _one_layer(model)
    gen = torch.Generator().manual_seed(seed)
    pairs = _pair_sample(task, n_pairs, seed)
    i, j = task.pairs[0][pairs], task.pairs[1][pairs]
    k = len(pairs)
    x = task.sample_x(k * n_samples, gen).reshape(k, n_samples, task.m)
    rows = torch.arange(k)[:, None]
    table = torch.zeros(4, 4)
    Wf = feature_weights(model, task)
    cls = (2 * (Wf[:, i] < 0) + (Wf[:, j] < 0)).T  # [k, d]: 0=A (+,+), 1=B1 (+,-), 2=B2 (-,+), 3=C (-,-)
    onehot = torch.nn.functional.one_hot(cls, 4).float()  # [k, d, 4]
    counts = onehot.sum(1)  # [k, 4]
    for v in range(4):
        xv = x.clone()
        xv[rows, :, i[:, None]] = float(v >> 1)
        xv[rows, :, j[:, None]] = float(v & 1)
        h = model.hidden(task.encode(xv.reshape(-1, task.m), gen)).reshape(k, n_samples, -1).mean(1)  # [k, d]
        per_class = torch.einsum("kd,kdc->kc", h, onehot) / counts.clamp(min=1)
        weight = (counts > 0).float()
        table[:, v] = (per_class * weight).sum(0) / weight.sum(0).clamp(min=1)
    fractions = (counts / counts.sum(1, keepdim=True)).mean(0)
    return {
        "classes": list(CLASS_NAMES),
        "cells": ["00", "01", "10", "11"],
        "mean_activation": table.tolist(),
        "class_fraction": fractions.tolist(),
    }


def analyse(model: UANDModel, task: UANDTask, inputs: torch.Tensor, seed: int = 0) -> dict:
    """Everything above in one dict (the `anatomy` experiment's core)."""
    return {
        "density": circuit_density(model, task, inputs, seed=seed),
        "binarity": weight_binarity(feature_weights(model, task)),
        "readout_sign": readout_sign_agreement(model, task, seed=seed),
        "class_table": neuron_class_table(model, task, seed=seed),
    }
