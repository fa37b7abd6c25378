"""Gemma Scope 2 (Gemma 3 JumpReLU SAEs): `config.json` + `params.safetensors`.

The tensors are lower-case `w_enc [d, F]`, `w_dec [F, d]`, `b_enc`, `b_dec`, `threshold`; the encoder
does not subtract b_dec. `config.json` names the hookpoint as a Hugging Face module path
(`hf_hook_point_in`, e.g. `model.layers.12.output`), the `width`, `l0` and `architecture`
(`jump_relu`). Transcoders (`type` transcoder/clt, an `hf_hook_point_out` that differs from the input,
or an `affine_skip_connection`) have no saelab class yet and are refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelab.errors import FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors
from saelab.io.formats.base import (
    Format,
    build,
    check_shape,
    read_safetensors,
    register_format,
    require_keys,
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
    t = read_safetensors(path)
    if kind != "sae" or (hook_out and hook_out != hook_in) or "affine_skip_connection" in t:
        raise FileFormatError(
            f"{folder} holds a Gemma Scope 2 {kind if kind != 'sae' else 'transcoder'} "
            f"({hook_in} -> {hook_out}); saelab reads Gemma Scope 2 SAEs only"
        )
    require_keys(t, ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"], path, "Gemma Scope 2 SAE")
    if t["w_enc"].dim() != 2:
        raise FileFormatError(f"{path}: 'w_enc' must be a [d_in, d_sae] matrix (got shape {tuple(t['w_enc'].shape)})")
    d_in, d_sae = t["w_enc"].shape
    if isinstance(cfg.get("width"), int) and cfg["width"] != d_sae:
        raise FileFormatError(f"{folder / CONFIG} says width {cfg['width']} but w_enc has {d_sae} latents")
    why = f"w_enc {(d_in, d_sae)}"
    check_shape(t["w_dec"], (d_sae, d_in), "w_dec", path, why)
    for key in ("b_enc", "threshold"):
        check_shape(t[key], (d_sae,), key, path, why)
    check_shape(t["b_dec"], (d_in,), "b_dec", path, why)
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
    return build(values, state, folder, provenance)


def _write(sae: SAE, folder: Path) -> Path:
    """A saelab JumpReLU SAE (no b_dec subtracted) as a Gemma Scope 2 folder."""
    if sae.architecture != "jumprelu" or sae.cfg.apply_b_dec_to_input:
        raise FileFormatError(
            f"Gemma Scope 2 stores JumpReLU SAEs that do not subtract b_dec; this SAE is '{sae.architecture}'"
        )
    folder = Path(folder)
    state = sae.saved_state()
    write_safetensors(
        folder / WEIGHTS,
        {
            "w_enc": state["W_enc"],
            "w_dec": state["W_dec"],
            "b_enc": state["b_enc"],
            "b_dec": state["b_dec"],
            "threshold": state["threshold"],
        },
    )
    hook = (getattr(sae, "provenance", None) or {}).get("hook_name")
    write_json(
        folder / CONFIG,
        {"architecture": "jump_relu", "type": "sae", "width": sae.cfg.d_sae, "hf_hook_point_in": hook},
    )
    return folder


FORMAT = register_format(
    Format(
        name="gemma_scope_2",
        reads="config.json + params.safetensors: Gemma Scope 2 (Gemma 3) JumpReLU SAEs",
        detect=_detect,
        read=_read,
        write=_write,
    )
)
