"""Gemma Scope 1 (Gemma 2 JumpReLU SAEs): `.../layer_L/width_W/average_l0_N/params.npz`.

`params.npz` holds `W_enc [d, F]`, `W_dec [F, d]`, `b_enc`, `b_dec` and per-latent `threshold`; the
encoder does not subtract b_dec, so it is saelab's JumpReLU as stored. There is no config: the layer,
width and average L0 come from the folder names, and the site from a `-res`, `-mlp` or `-att` in the
release folder name (`gemma-scope-2b-pt-res/...`), giving SAELens' TransformerLens hook name.
Embedding SAEs (`embedding` in the path) read inputs sqrt(d) times smaller than `hook_embed`, where
Gemma's embedding scale is applied: W_enc / sqrt(d) and W_dec * sqrt(d) are folded in (as SAELens
does for that hook) and recorded under `folded_scaling`.

Transcoders (a `-transcoders` release folder, `gemma-scope-2b-pt-transcoders/layer_L/...`) have the
same tensors with `W_dec [F, d_out]`; they read the MLP's normalised input and write its output,
`blocks.L.ln2.hook_normalized` -> `blocks.L.hook_mlp_out` (SAELens' names for them), and become
saelab's JumpReLU transcoder with a zero input bias.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from saelab.errors import FileFormatError
from saelab.io.formats.base import (
    Format,
    build,
    check_shape,
    check_thresholds,
    read_npz,
    register_format,
    require_keys,
)
from saelab.sae.base import SAE

WEIGHTS = "params.npz"


def _detect(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file()


def _width(text: str) -> int | None:
    m = re.search(r"width_(\d+)([km]?)(?:/|$)", text)
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2)]


def _hook(text: str, layer: int | None) -> str | None:
    if "embedding" in text:
        return "hook_embed"
    if layer is None:
        return None
    for tag, hook in (("-res", "hook_resid_post"), ("-mlp", "hook_mlp_out"), ("-att", "attn.hook_z")):
        if tag in text:
            return f"blocks.{layer}.{hook}"
    return None


def _read(folder: Path) -> SAE:
    path = folder / WEIGHTS
    t = read_npz(path)
    require_keys(t, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path, "Gemma Scope SAE")
    if t["W_enc"].dim() != 2:
        raise FileFormatError(f"{path}: 'W_enc' must be a [d_in, d_sae] matrix (got shape {tuple(t['W_enc'].shape)})")
    d_in, d_sae = t["W_enc"].shape
    text = folder.resolve().as_posix()
    transcoder = any(part.endswith("-transcoders") for part in folder.resolve().parts)
    d_out = t["W_dec"].shape[-1] if transcoder else d_in
    width = _width(text)
    if width is not None and width != d_sae:
        raise FileFormatError(f"{path}: the folder says width {width} but W_enc has {d_sae} latents")
    why = f"W_enc {(d_in, d_sae)}"
    check_shape(t["W_dec"], (d_sae, d_out), "W_dec", path, why)
    check_shape(t["b_enc"], (d_sae,), "b_enc", path, why)
    check_shape(t["threshold"], (d_sae,), "threshold", path, why)
    check_shape(t["b_dec"], (d_out,), "b_dec", path, why)
    check_thresholds(t["threshold"], "threshold", path)
    if "scaling_factor" in t and not bool((t["scaling_factor"] == 1).all()):
        raise FileFormatError(f"{path}: a fine-tuning scaling_factor other than 1 has no saelab counterpart")
    layer_m = re.search(r"layer_(\d+)", text)
    layer = int(layer_m.group(1)) if layer_m else None
    l0_m = re.search(r"average_l0_(\d+)", text)
    state = {k: t[k].float() for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    provenance = {
        "source_format": "gemma_scope_1",
        "hook_name": _hook(text, layer),
        "hook_convention": "TransformerLens (as SAELens names Gemma Scope)",
        "layer": layer,
        "average_l0": int(l0_m.group(1)) if l0_m else None,
    }
    if "embedding" in text:
        s = math.sqrt(d_in)
        state["W_enc"], state["W_dec"] = state["W_enc"] / s, state["W_dec"] * s
        provenance["folded_scaling"] = {"W_enc": f"/ sqrt(d_in) = {s:.6g}", "W_dec": f"* sqrt(d_in) = {s:.6g}"}
    values = {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False}
    if transcoder:
        if layer is None:
            raise FileFormatError(f"{path}: a Gemma Scope transcoder's folder must name its layer (layer_L)")
        site, write_site = f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
        values.update(site=site, write_site=write_site, d_out=d_out)
        state["b_in"] = torch.zeros(d_in)
        provenance.update(kind="transcoder", hook_name=site, hook_name_out=write_site)
    return build(values, state, folder, provenance)


FORMAT = register_format(
    Format(
        name="gemma_scope_1",
        reads="layer_L/width_W/average_l0_N/params.npz: Gemma Scope (Gemma 2) JumpReLU SAEs and transcoders, config "
        "from the path",
        detect=_detect,
        read=_read,
    )
)
