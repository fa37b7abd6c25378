"""Gemma Scope 2 (Gemma 3 JumpReLU SAEs and transcoders): `config.json` + `params.safetensors`.

The tensors are lower-case `w_enc [d_in, F]`, `w_dec [F, d_out]`, `b_enc`, `b_dec [d_out]`,
`threshold [F]`; the encoder subtracts nothing, f = pre * (pre > threshold). `config.json` names
the hookpoints as Hugging Face module paths (`hf_hook_point_in`, e.g. `model.layers.12.output`), the
`width`, `l0` and `architecture` (`jump_relu`).

A transcoder (`type: transcoder`, or an `hf_hook_point_out` other than the input, typically
`model.layers.L.pre_feedforward_layernorm.output` -> `model.layers.L.post_feedforward_layernorm.output`)
becomes saelab's JumpReLU transcoder with those hooks as `site` and `write_site` and a zero input
bias. A skip transcoder (`affine_connection: true`) stores `affine_skip_connection [d_in, d_out]`
and adds `x @ affine_skip_connection`; saelab's `W_skip [d_out, d_in]` is its transpose (both
SAELens' and circuit-tracer's loaders transpose it the same way). Cross-layer transcoders (`type:
clt`, one file per layer with decoders into every layer) and crosscoders are refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.errors import FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors
from saelab.io.formats.base import (
    Format,
    build,
    check_shape,
    check_thresholds,
    read_safetensors,
    register_format,
    require_keys,
    transcoder_sites,
)
from saelab.sae.base import SAE

CONFIG, WEIGHTS = "config.json", "params.safetensors"


def _detect(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file()


def _config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        return {}
    cfg = read_json(path, "the file may be truncated")
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{path} must hold a JSON object")
    return cfg


def _read(folder: Path) -> SAE:
    cfg, path = _config(folder), folder / WEIGHTS
    arch = cfg.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise FileFormatError(f"{folder / CONFIG}: architecture {arch!r} is not Gemma Scope's jump_relu")
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    kind = str(cfg.get("type", "sae")).lower()
    if kind not in ("sae", "transcoder"):
        raise FileFormatError(
            f"{folder / CONFIG} describes a Gemma Scope 2 {kind!r}; saelab reads Gemma Scope 2 SAEs and "
            "(skip) transcoders only (a cross-layer transcoder or crosscoder has no reader)"
        )
    t = read_safetensors(path)
    skip = "affine_skip_connection" in t
    transcoder = kind == "transcoder" or bool(hook_out and hook_out != hook_in) or skip
    what = "Gemma Scope 2 " + ("skip transcoder" if skip else "transcoder" if transcoder else "SAE")
    require_keys(t, ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"], path, what)
    if cfg.get("affine_connection") and not skip:
        raise FileFormatError(f"{folder / CONFIG} says affine_connection but {path} has no 'affine_skip_connection'")
    if t["w_enc"].dim() != 2 or t["w_dec"].dim() != 2:
        raise FileFormatError(
            f"{path}: 'w_enc' and 'w_dec' must be matrices (got shapes {tuple(t['w_enc'].shape)}, "
            f"{tuple(t['w_dec'].shape)})"
        )
    d_in, d_sae = t["w_enc"].shape
    d_out = t["w_dec"].shape[1] if transcoder else d_in
    if isinstance(cfg.get("width"), int) and cfg["width"] != d_sae:
        raise FileFormatError(f"{folder / CONFIG} says width {cfg['width']} but w_enc has {d_sae} latents")
    why = f"w_enc {(d_in, d_sae)}" + (f" and w_dec's output width {d_out}" if transcoder else "")
    check_shape(t["w_dec"], (d_sae, d_out), "w_dec", path, why)
    for key in ("b_enc", "threshold"):
        check_shape(t[key], (d_sae,), key, path, why)
    check_shape(t["b_dec"], (d_out,), "b_dec", path, why)
    check_thresholds(t["threshold"], "threshold", path)
    state = {
        "W_enc": t["w_enc"],
        "W_dec": t["w_dec"],
        "b_enc": t["b_enc"],
        "b_dec": t["b_dec"],
        "threshold": t["threshold"],
    }
    values = {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False}
    provenance = {
        "source_format": "gemma_scope_2",
        "hook_name": hook_in,
        "hook_convention": "Hugging Face module path (its output)",
        "model_name": cfg.get("model_name"),
        "l0": cfg.get("l0"),
    }
    if transcoder:
        site, write_site, unnamed = transcoder_sites(hook_in, hook_out, folder / CONFIG)
        values.update(site=site, write_site=write_site, d_out=d_out, skip=skip)
        state["b_in"] = torch.zeros(d_in)
        if skip:
            check_shape(t["affine_skip_connection"], (d_in, d_out), "affine_skip_connection", path, why)
            state["W_skip"] = t["affine_skip_connection"].t()
        provenance.update(kind="transcoder", hook_name=site, hook_name_out=write_site, affine_connection=skip)
        if unnamed:
            provenance["unnamed_hooks"] = unnamed
    return build(values, state, folder, provenance)


def _write(sae: SAE, folder: Path) -> Path:
    """A saelab JumpReLU SAE (no b_dec subtracted) or JumpReLU (skip) transcoder (BatchTopK and
    Matryoshka ones in their JumpReLU inference form) as a Gemma Scope 2 folder; a transcoder's input
    bias is folded into b_enc (Gemma Scope has none)."""
    transcoder = sae.cfg.is_transcoder
    saved = sae.saved_architecture()  # BatchTopK and Matryoshka in their JumpReLU inference form
    if saved != "jumprelu" or (sae.cfg.apply_b_dec_to_input and not transcoder):
        raise FileFormatError(
            "Gemma Scope 2 stores JumpReLU SAEs that do not subtract b_dec, and JumpReLU transcoders; this "
            f"{'transcoder' if transcoder else 'SAE'} is '{sae.architecture}'"
        )
    if transcoder and len(sae.cfg.read_sites) > 1:
        raise FileFormatError("Gemma Scope 2 transcoders read one site; this dictionary reads several")
    folder = Path(folder)
    state = sae.saved_state()
    if transcoder:
        state["b_enc"] = state["b_enc"] - state.pop("b_in") @ state["W_enc"]
    tensors = {
        "w_enc": state["W_enc"],
        "w_dec": state["W_dec"],
        "b_enc": state["b_enc"],
        "b_dec": state["b_dec"],
        "threshold": state["threshold"],
    }
    if sae.cfg.skip:
        tensors["affine_skip_connection"] = state["W_skip"].t().contiguous()
    write_safetensors(folder / WEIGHTS, tensors)
    hook = (getattr(sae, "provenance", None) or {}).get("hook_name")
    cfg = {"architecture": "jump_relu", "type": "sae", "width": sae.cfg.d_sae, "hf_hook_point_in": hook}
    if transcoder:
        cfg.update(
            type="transcoder",
            hf_hook_point_in=sae.cfg.site,
            hf_hook_point_out=sae.cfg.write_site,
            affine_connection=sae.cfg.skip,
        )
    write_json(folder / CONFIG, cfg)
    return folder


FORMAT = register_format(
    Format(
        name="gemma_scope_2",
        reads="config.json + params.safetensors: Gemma Scope 2 (Gemma 3) JumpReLU SAEs, transcoders and "
        "skip transcoders",
        detect=_detect,
        read=_read,
        write=_write,
    )
)
