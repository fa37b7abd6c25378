"""Llama Scope (OpenMOSS lm-saes): `hyperparams.json` + `checkpoints/final.safetensors`.

The weights are nn.Linear layout (`encoder.weight [F, d]`, `encoder.bias`, `decoder.weight [d, F]`,
`decoder.bias`), usually bf16. With `norm_activation: dataset-wise` the SAE ran on inputs scaled to a
mean norm of sqrt(d): x_n = x * s_in, s_in = sqrt(d_model) / dataset_average_activation_norm.in, and
its reconstruction is in the output's normalised units, divided by s_out (same formula with `.out`).
The scalar `jump_relu_threshold` of the released files is in units s_in times smaller than those
pre-activations, so the effective threshold is jump_relu_threshold * s_in (the rule the Llama Scope
authors use in SAELens' loader). Folding everything into saelab's JumpReLU for raw x:

    W_enc = s_in * encoder.weight^T     b_enc = encoder.bias        threshold = jump_relu_threshold * s_in
    W_dec = decoder.weight^T / s_out    b_dec = decoder.bias / s_out

`act_fn: topk` files become saelab TopK with `top_k`.

A transcoder (`hook_point_in` != `hook_point_out`, e.g. `blocks.L.ln2.hook_normalized` ->
`blocks.L.hook_mlp_out`) is folded by the same rules with its own two norms: its encoder and
threshold take s_in (from `.in`, the input's norm) and its decoder and decoder bias 1/s_out (from
`.out`, the output's norm), so it reads raw MLP inputs and writes raw MLP outputs; it becomes saelab's
transcoder (`site` hook_point_in, `write_site` hook_point_out, a zero input bias).
`apply_decoder_bias_to_pre_encoder` has no meaning for a transcoder (its decoder bias is in the
output space) and is refused there. Every factor is recorded in `provenance.folded_scaling`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from saelab.errors import FileFormatError
from saelab.io.atomic import read_json
from saelab.io.formats.base import (
    Format,
    build,
    check_shape,
    read_safetensors,
    register_format,
    require_keys,
    transcoder_sites,
)
from saelab.sae.base import SAE

CONFIG = "hyperparams.json"
WEIGHT_FILES = ("checkpoints/final.safetensors", "final.safetensors")


def _detect(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def _scales(hp: dict[str, Any], d_in: int, cfg_path: Path) -> tuple[float, float]:
    mode = hp.get("norm_activation", "dataset-wise")
    if mode in ("inference", "none", None):
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise FileFormatError(f"{cfg_path}: norm_activation {mode!r} cannot be folded into weights (only dataset-wise)")
    norms = hp.get("dataset_average_activation_norm")
    if not isinstance(norms, dict) or not all(
        isinstance(norms.get(k), (int, float)) and norms[k] > 0 for k in ("in", "out")
    ):
        raise FileFormatError(
            f"{cfg_path}: dataset-wise normalisation needs positive dataset_average_activation_norm.in and .out"
        )
    return math.sqrt(d_in) / norms["in"], math.sqrt(d_in) / norms["out"]


def _read(folder: Path) -> SAE:
    cfg_path = folder / CONFIG
    hp = read_json(cfg_path, "the file may be truncated")
    if not isinstance(hp, dict) or not isinstance(hp.get("d_model"), int) or not isinstance(hp.get("d_sae"), int):
        raise FileFormatError(f"{cfg_path} must be a JSON object with integer 'd_model' and 'd_sae'")
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    transcoder = hook_out != hook_in
    weights_path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights_path is None:
        raise FileFormatError(f"{folder} has {CONFIG} but no weights ({' or '.join(WEIGHT_FILES)})")
    t = read_safetensors(weights_path)
    use_bias = hp.get("use_decoder_bias", True)
    require_keys(
        t,
        ["encoder.weight", "encoder.bias", "decoder.weight"] + (["decoder.bias"] if use_bias else []),
        weights_path,
        "Llama Scope SAE",
    )
    d_in, d_sae = hp["d_model"], hp["d_sae"]
    why = f"{CONFIG} (d_model={d_in}, d_sae={d_sae})"
    check_shape(t["encoder.weight"], (d_sae, d_in), "encoder.weight", weights_path, why)
    check_shape(t["encoder.bias"], (d_sae,), "encoder.bias", weights_path, why)
    check_shape(t["decoder.weight"], (d_in, d_sae), "decoder.weight", weights_path, why)
    W_E, b_E, W_D = (t[k].float() for k in ("encoder.weight", "encoder.bias", "decoder.weight"))
    b_D = t["decoder.bias"].float() if use_bias else torch.zeros(d_in)
    check_shape(b_D, (d_in,), "decoder.bias", weights_path, why)
    if hp.get("sparsity_include_decoder_norm"):
        norms = W_D.norm(dim=0)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise FileFormatError(
                f"{cfg_path}: sparsity_include_decoder_norm with decoder columns of norm "
                f"{norms.min():.4g}..{norms.max():.4g}; saelab reads only unit-norm decoders for this setting"
            )
    s_in, s_out = _scales(hp, d_in, cfg_path)
    subtract = bool(hp.get("apply_decoder_bias_to_pre_encoder", False))
    if subtract and transcoder:
        raise FileFormatError(
            f"{cfg_path}: apply_decoder_bias_to_pre_encoder on a transcoder ({hook_in} -> {hook_out}) would "
            "subtract an output-space bias from the input; saelab refuses it"
        )
    if subtract and not math.isclose(s_in, s_out, rel_tol=1e-6):
        raise FileFormatError(
            f"{cfg_path}: apply_decoder_bias_to_pre_encoder with different input and output norms has no saelab form"
        )
    state = {"W_enc": W_E.t() * s_in, "b_enc": b_E, "W_dec": W_D.t() / s_out, "b_dec": b_D / s_out}
    act = str(hp.get("act_fn", "jumprelu")).lower()
    values: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": subtract}
    folded: dict[str, Any] = {"input_scale": s_in, "output_scale": 1 / s_out}
    if act == "jumprelu":
        theta = hp.get("jump_relu_threshold")
        if not isinstance(theta, (int, float)):
            raise FileFormatError(f"{cfg_path}: act_fn jumprelu needs a numeric jump_relu_threshold")
        values["architecture"] = "jumprelu"
        state["threshold"] = torch.full((d_sae,), float(theta) * s_in)
        folded["threshold_scale"] = s_in
    elif act == "topk":
        values.update(architecture="topk", k=int(hp.get("top_k", 50)))
    else:
        raise FileFormatError(f"{cfg_path}: act_fn {act!r} has no saelab reader (jumprelu or topk)")
    folded["dataset_average_activation_norm"] = hp.get("dataset_average_activation_norm")
    provenance = {
        "source_format": "llama_scope",
        "hook_name": hook_in,
        "hook_convention": "TransformerLens",
        "source_dtype": str(t["encoder.weight"].dtype).removeprefix("torch."),
        "folded_scaling": folded,
    }
    if transcoder:
        site, write_site, unnamed = transcoder_sites(hook_in, hook_out, cfg_path)
        values.update(site=site, write_site=write_site, d_out=d_in)
        state["b_in"] = torch.zeros(d_in)
        provenance.update(kind="transcoder", hook_name=site, hook_name_out=write_site)
        if unnamed:
            provenance["unnamed_hooks"] = unnamed
    return build(values, state, folder, provenance)


FORMAT = register_format(
    Format(
        name="llama_scope",
        reads="hyperparams.json + checkpoints/final.safetensors: Llama Scope JumpReLU/TopK SAEs and transcoders, "
        "dataset norms folded",
        detect=_detect,
        read=_read,
    )
)
