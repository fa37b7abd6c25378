"""circuit-tracer (0.5): per-layer transcoders (a "transcoder set") and cross-layer transcoders.

A folder holds `config.yaml` (`model_kind`: `transcoder_set` or `cross_layer_transcoder`,
`feature_input_hook` and `feature_output_hook`, TransformerLens hook names inside a block, so layer L
reads `blocks.L.<feature_input_hook>` and writes `blocks.L.<feature_output_hook>`) and the weights,
in the layout circuit-tracer's own `to_safetensors` (and its local cache) writes:

- **transcoder set**: `layer_L.safetensors` per layer (or the local paths listed under `transcoders`),
  each `W_enc [F, d]` (nn.Linear rows, the transpose of saelab's), `W_dec [F, d]`, `b_enc [F]`,
  `b_dec [d]`, optionally `activation_function.threshold [F]` and `W_skip [d, d]` (added as
  x @ W_skip^T, saelab's orientation). The encoder subtracts nothing: f = act(x W_enc^T + b_enc), with
  act = JumpReLU z * (z > threshold) when the file has thresholds, else ReLU. One layer becomes saelab's
  ReLU or JumpReLU (skip) transcoder with a zero input bias: give the path of its `layer_L.safetensors`
  (a folder of one layer needs no choice). A listed hub path `hf://org/repo/FILE` is read from FILE in
  the folder (a downloaded snapshot) and refused when it is not there: saelab never downloads.
- **cross-layer transcoder**: `W_enc_i.safetensors` (`W_enc_i [F, d]`, `b_enc_i`, `b_dec_i [d]`,
  optionally `threshold_i [F]`) and `W_dec_i.safetensors` (`W_dec_i [F, L - i, d]`: layer i's latents
  write layers i..L-1) for i = 0..L-1. It becomes saelab's `clt_jumprelu` with W_enc [L, d, F] the
  stacked transposes, the decoders as they are, flat biases (layer-major) and a zero input bias. A
  ReLU CLT (no thresholds) gets threshold 0, stored as the smallest positive float32 (saelab keeps
  log-thresholds), which differs from ReLU only for pre-activations below 1.2e-38. A folder without
  config.yaml takes circuit-tracer's defaults, `hook_resid_mid` -> `hook_mlp_out` (noted in provenance).
  A CLT config listing per-layer files (Gemma Scope 2's CLT layout) is refused by name.

Negative thresholds (which circuit-tracer's JumpReLU would let through) have no saelab form and are
refused. The writers produce these layouts from saelab's ReLU/JumpReLU transcoders (BatchTopK and
Matryoshka in their JumpReLU inference form; one `layer_L.safetensors` per call, L read from the site
`blocks.L.<hook>`) and `clt_jumprelu`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from saelab.errors import FileFormatError
from saelab.io.atomic import write_safetensors, write_text
from saelab.io.formats.base import (
    Format,
    build,
    check_shape,
    check_thresholds,
    read_safetensors,
    register_format,
    require_keys,
)
from saelab.sae.base import SAE

CONFIG = "config.yaml"
SET, CLT = "transcoder_set", "cross_layer_transcoder"
DEFAULT_HOOKS = ("hook_resid_mid", "hook_mlp_out")  # circuit-tracer's load_clt defaults
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors$")
_CLT_FILE = re.compile(r"W_enc_(\d+)\.safetensors$")


def _detect(folder: Path) -> bool:
    cfg = folder / CONFIG
    if cfg.is_file():
        try:
            return "model_kind" in cfg.read_text(errors="replace")
        except OSError:
            return False
    return (folder / "W_enc_0.safetensors").is_file() and (folder / "W_dec_0.safetensors").is_file()


def _config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FileFormatError(f"{path} cannot be read as YAML ({exc}); the file may be truncated") from None
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{path} must hold a YAML mapping with model_kind and the feature hooks")
    return cfg


def _hooks(cfg: dict[str, Any], folder: Path) -> tuple[str, str, bool]:
    """(input hook, output hook, defaulted) inside a block, as circuit-tracer names them."""
    if not cfg:
        return (*DEFAULT_HOOKS, True)
    hooks = []
    for key in ("feature_input_hook", "feature_output_hook"):
        value = cfg.get(key)
        if not isinstance(value, str) or not value.strip():
            raise FileFormatError(f"{folder / CONFIG}: '{key}' must name a hook inside a block (e.g. hook_mlp_out)")
        hooks.append(value)
    if hooks[0] == hooks[1]:
        raise FileFormatError(f"{folder / CONFIG}: feature_input_hook and feature_output_hook are both {hooks[0]!r}")
    return hooks[0], hooks[1], False


def _read(path: Path) -> SAE:
    folder = path.parent if path.is_file() else path
    cfg = _config(folder)
    kind = cfg.get("model_kind", CLT if (folder / "W_enc_0.safetensors").is_file() else None)
    if kind == SET:
        return _read_layer(path, folder, cfg)
    if kind == CLT:
        return _read_clt(folder, cfg)
    raise FileFormatError(f"{folder / CONFIG}: model_kind {kind!r} is not {SET!r} or {CLT!r}")


# ------------------------------------------------------------------------------------ transcoder set


def _layer_files(folder: Path, cfg: dict[str, Any]) -> dict[int, Path]:
    listed = cfg.get("transcoders")
    if listed is None:
        found = {int(m.group(1)): p for p in folder.iterdir() if (m := _LAYER_FILE.fullmatch(p.name))}
        if not found:
            raise FileFormatError(f"{folder} has a transcoder_set {CONFIG} but no layer_L.safetensors files")
        return found
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise FileFormatError(f"{folder / CONFIG}: 'transcoders' must be a list of file paths, one per layer")
    return {i: _local(folder, p) for i, p in enumerate(listed)}


def _local(folder: Path, listed: str) -> Path:
    """A listed layer file on disk: a local path as it is (relative to the folder), a hub path
    `hf://org/repo/FILE` as FILE inside this folder when a downloaded snapshot has it there."""
    if "://" not in listed:
        return folder / listed
    in_repo = listed.split("://", 1)[1].split("?", 1)[0].split("/", 2)
    local = folder / in_repo[2] if len(in_repo) == 3 else None
    if local is None or not local.is_file():
        raise FileFormatError(
            f"{folder / CONFIG} lists the hub file {listed}, which is not in {folder}; saelab never downloads: "
            "fetch the repository's files into this folder, or load the folder circuit-tracer's cache writes"
        )
    return local


def _read_layer(path: Path, folder: Path, cfg: dict[str, Any]) -> SAE:
    files = _layer_files(folder, cfg)
    if path.is_file():
        chosen = [i for i, p in files.items() if p.resolve() == path.resolve()]
        if not chosen:
            raise FileFormatError(f"{path} is not one of the layer files {folder / CONFIG} describes")
        layer = chosen[0]
    elif len(files) == 1:
        layer = next(iter(files))
    else:
        raise FileFormatError(
            f"{folder} holds circuit-tracer transcoders for layers {sorted(files)}; load one layer: give the "
            "path of its file (e.g. layer_0.safetensors)"
        )
    weights = files[layer]
    if weights.suffix == ".npz":
        raise FileFormatError(f"{weights} is a Gemma Scope params.npz; load its folder (format gemma_scope_1)")
    if not weights.is_file():
        raise FileFormatError(f"{weights} is missing; {folder / CONFIG} lists it for layer {layer}")
    t = read_safetensors(weights)
    if "w_enc" in t:
        raise FileFormatError(f"{weights} holds Gemma Scope 2 tensors; load its folder (format gemma_scope_2)")
    require_keys(t, ["W_enc", "W_dec", "b_enc", "b_dec"], weights, "circuit-tracer transcoder")
    if "log_thresholds" in t:
        raise FileFormatError(f"{weights}: 'log_thresholds' is not circuit-tracer's layout (it asserts it away)")
    if t["W_enc"].dim() != 2 or t["W_dec"].dim() != 2:
        raise FileFormatError(f"{weights}: 'W_enc' and 'W_dec' must be [latents, width] matrices")
    d_sae, d_in = t["W_enc"].shape
    d_out = t["W_dec"].shape[1]
    why = f"W_enc {(d_sae, d_in)} and W_dec's width {d_out}"
    check_shape(t["W_dec"], (d_sae, d_out), "W_dec", weights, why)
    check_shape(t["b_enc"], (d_sae,), "b_enc", weights, why)
    check_shape(t["b_dec"], (d_out,), "b_dec", weights, why)
    hook_in, hook_out, defaulted = _hooks(cfg, folder)
    site, write_site = f"blocks.{layer}.{hook_in}", f"blocks.{layer}.{hook_out}"
    skip = "W_skip" in t
    state = {
        "W_enc": t["W_enc"].t(),
        "b_enc": t["b_enc"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
        "b_in": torch.zeros(d_in),
    }
    if skip:
        check_shape(t["W_skip"], (d_out, d_in), "W_skip", weights, why)
        state["W_skip"] = t["W_skip"]
    jump = "activation_function.threshold" in t
    if jump:
        threshold = t["activation_function.threshold"].float()
        check_shape(threshold, (d_sae,), "activation_function.threshold", weights, why)
        check_thresholds(threshold, "activation_function.threshold", weights)
        state["threshold"] = threshold
    values = {
        "architecture": "jumprelu" if jump else "relu",
        "d_in": d_in,
        "d_out": d_out,
        "d_sae": d_sae,
        "site": site,
        "write_site": write_site,
        "skip": skip,
        "apply_b_dec_to_input": False,
    }
    provenance = _provenance(cfg, defaulted, t["W_enc"].dtype)
    provenance.update(kind="transcoder", layer=layer, hook_name=site, hook_name_out=write_site, weights=str(weights))
    return build(values, state, folder, provenance)


def _provenance(cfg: dict[str, Any], defaulted: bool, dtype: torch.dtype) -> dict[str, Any]:
    out: dict[str, Any] = {
        "source_format": "circuit_tracer",
        "hook_convention": "TransformerLens, blocks.L.<feature hook> (circuit-tracer)",
        "source_dtype": str(dtype).removeprefix("torch."),
    }
    for key in ("model_name", "scan"):
        if isinstance(cfg.get(key), str):
            out[key] = cfg[key]
    if defaulted:
        out["hooks_defaulted"] = f"no {CONFIG}: circuit-tracer's default hooks {DEFAULT_HOOKS[0]} -> {DEFAULT_HOOKS[1]}"
    return out


# ------------------------------------------------------------------------------------ cross-layer


def _read_clt(folder: Path, cfg: dict[str, Any]) -> SAE:
    if cfg.get("transcoders") is not None:
        raise FileFormatError(
            f"{folder / CONFIG} describes a CLT as listed per-layer files (Gemma Scope 2's CLT layout), which "
            "saelab does not read; circuit-tracer's own CLT layout (W_enc_i / W_dec_i.safetensors) it does"
        )
    layers = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CLT_FILE.fullmatch(p.name)))
    if not layers or layers != list(range(len(layers))):
        raise FileFormatError(
            f"{folder}: a circuit-tracer CLT needs W_enc_i.safetensors for i = 0..L-1 (found layers {layers})"
        )
    L = len(layers)
    enc, dec = [], []
    for i in layers:
        enc_path, dec_path = folder / f"W_enc_{i}.safetensors", folder / f"W_dec_{i}.safetensors"
        if not dec_path.is_file():
            raise FileFormatError(f"{dec_path} is missing; every CLT layer needs its decoder file")
        e, d = read_safetensors(enc_path), read_safetensors(dec_path)
        require_keys(e, [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"], enc_path, f"circuit-tracer CLT layer {i}")
        require_keys(d, [f"W_dec_{i}"], dec_path, f"circuit-tracer CLT layer {i}")
        enc.append((enc_path, e))
        dec.append((dec_path, d[f"W_dec_{i}"]))
    path0, e0 = enc[0]
    if e0["W_enc_0"].dim() != 2:
        raise FileFormatError(f"{path0}: 'W_enc_0' must be a [latents, width] matrix")
    F, d = e0["W_enc_0"].shape
    jump = "threshold_0" in e0
    d_out = dec[0][1].shape[-1] if dec[0][1].dim() == 3 else d
    why = f"W_enc_0 {(F, d)}, {L} layers and W_dec_0's width {d_out}"
    W_enc, b_enc, b_dec, thresholds, state = [], [], [], [], {}
    for i, ((enc_path, e), (dec_path, W_dec)) in enumerate(zip(enc, dec)):
        check_shape(e[f"W_enc_{i}"], (F, d), f"W_enc_{i}", enc_path, why)
        check_shape(e[f"b_enc_{i}"], (F,), f"b_enc_{i}", enc_path, why)
        check_shape(e[f"b_dec_{i}"], (d_out,), f"b_dec_{i}", enc_path, why)
        check_shape(W_dec, (F, L - i, d_out), f"W_dec_{i}", dec_path, why)
        if (f"threshold_{i}" in e) != jump:
            raise FileFormatError(f"{enc_path}: some layers have thresholds and others not ({path0.name} decides)")
        W_enc.append(e[f"W_enc_{i}"].t())
        b_enc.append(e[f"b_enc_{i}"])
        b_dec.append(e[f"b_dec_{i}"])
        if jump:
            check_shape(e[f"threshold_{i}"].reshape(-1), (F,), f"threshold_{i}", enc_path, why)
            check_thresholds(e[f"threshold_{i}"], f"threshold_{i}", enc_path)
            thresholds.append(e[f"threshold_{i}"].reshape(-1).float())
        state[f"W_dec_{i}"] = W_dec
    threshold = torch.cat(thresholds) if jump else torch.zeros(L * F)
    tiny = torch.finfo(torch.float32).tiny
    state.update(
        W_enc=torch.stack(W_enc),
        b_enc=torch.cat(b_enc),
        b_in=torch.zeros(L * d),
        b_dec=torch.cat(b_dec),
        log_threshold=threshold.float().clamp_min(tiny).log(),
        site_norm_scale=torch.ones(L),
    )
    hook_in, hook_out, defaulted = _hooks(cfg, folder)
    values = {
        "architecture": "clt_jumprelu",
        "d_in": L * d,
        "d_out": L * d_out,
        "d_sae": L * F,
        "site": [f"blocks.{i}.{hook_in}" for i in range(L)],
        "write_site": [f"blocks.{i}.{hook_out}" for i in range(L)],
    }
    provenance = _provenance(cfg, defaulted, e0["W_enc_0"].dtype)
    provenance.update(
        kind="cross_layer_transcoder",
        activation="jump_relu" if jump else "relu (threshold 0)",
        hook_name=values["site"][0],
        reads=values["site"],
        writes=values["write_site"],
    )
    return build(values, state, folder, provenance)


# ------------------------------------------------------------------------------------ writers


def _layer_hook(site: Any, what: str) -> tuple[int, str]:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", site) if isinstance(site, str) else None
    if not m:
        raise FileFormatError(
            f"circuit-tracer names hooks blocks.L.<hook> (TransformerLens); this dictionary's {what} is {site!r}"
        )
    return int(m.group(1)), m.group(2)


def _write_config(folder: Path, kind: str, hook_in: str, hook_out: str) -> None:
    path = folder / CONFIG
    cfg = {"model_kind": kind, "feature_input_hook": hook_in, "feature_output_hook": hook_out}
    if path.is_file():
        old = _config(folder)
        if {k: old.get(k) for k in cfg} != cfg:
            raise FileFormatError(
                f"{path} describes {old.get('model_kind')} {old.get('feature_input_hook')} -> "
                f"{old.get('feature_output_hook')}; write this {kind} ({hook_in} -> {hook_out}) to another folder"
            )
        return
    write_text(path, yaml.safe_dump(cfg, sort_keys=False))


def _write(sae: SAE, folder: Path) -> Path:
    """One saelab ReLU/JumpReLU (skip) transcoder as `layer_L.safetensors` in a circuit-tracer
    transcoder-set folder (circuit-tracer loads the set once layers 0..L-1 are all there), or a
    `clt_jumprelu` as a circuit-tracer CLT folder. Input biases are folded into the encoder biases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if sae.architecture == "clt_jumprelu":
        return _write_clt(sae, folder)
    cfg, saved = sae.cfg, sae.saved_architecture()  # BatchTopK and Matryoshka in their JumpReLU inference form
    if saved not in ("relu", "jumprelu") or not cfg.is_transcoder or len(cfg.read_sites) > 1:
        raise FileFormatError(
            f"circuit-tracer holds ReLU/JumpReLU transcoders and JumpReLU cross-layer transcoders (clt_jumprelu); "
            f"this is a '{sae.architecture}' {'transcoder' if cfg.is_transcoder else 'SAE or crosscoder'}"
        )
    if cfg.output_width != cfg.d_in:
        raise FileFormatError(
            f"circuit-tracer transcoders write the width they read; this one reads {cfg.d_in}, writes {cfg.output_width}"
        )
    layer, hook_in = _layer_hook(cfg.site, "site")
    layer_out, hook_out = _layer_hook(cfg.write_site, "write_site")
    if layer_out != layer:
        raise FileFormatError(f"a circuit-tracer transcoder reads and writes one block; {cfg.site} -> {cfg.write_site}")
    state = sae.saved_state()
    tensors = {
        "W_enc": state["W_enc"].t().contiguous(),
        "W_dec": state["W_dec"],
        "b_enc": state["b_enc"] - state["b_in"] @ state["W_enc"],
        "b_dec": state["b_dec"],
    }
    if saved == "jumprelu":
        tensors["activation_function.threshold"] = state["threshold"]
    if cfg.skip:
        tensors["W_skip"] = state["W_skip"]
    _write_config(folder, SET, hook_in, hook_out)
    write_safetensors(folder / f"layer_{layer}.safetensors", {k: v.float().contiguous() for k, v in tensors.items()})
    return folder


def _write_clt(sae: SAE, folder: Path) -> Path:
    c = sae.cfg
    hooks_in = [_layer_hook(s, "site") for s in c.site]
    hooks_out = [_layer_hook(s, "write_site") for s in c.write_site]
    for name, hooks in (("site", hooks_in), ("write_site", hooks_out)):
        if [h[0] for h in hooks] != list(range(c.n_layers)) or len({h[1] for h in hooks}) != 1:
            raise FileFormatError(
                f"circuit-tracer CLTs cover blocks 0..L-1 with one hook each; this CLT's {name} is {getattr(c, name)}"
            )
    L, d, F = c.n_layers, c.layer_d_in, c.layer_d_sae
    W_enc, b_in = sae.W_enc.detach().float(), sae.b_in.detach().float().reshape(L, d)
    b_enc = sae.b_enc.detach().float().reshape(L, F) - torch.einsum("ld,ldf->lf", b_in, W_enc)
    b_dec = sae.b_dec.detach().float().reshape(L, c.layer_d_out)
    threshold = sae.threshold.detach().float().reshape(L, F)
    _write_config(folder, CLT, hooks_in[0][1], hooks_out[0][1])
    for i in range(L):
        enc = {
            f"W_enc_{i}": W_enc[i].t().contiguous(),
            f"b_enc_{i}": b_enc[i].contiguous(),
            f"b_dec_{i}": b_dec[i].contiguous(),
            f"threshold_{i}": threshold[i].contiguous(),
        }
        write_safetensors(folder / f"W_enc_{i}.safetensors", enc)
        write_safetensors(folder / f"W_dec_{i}.safetensors", {f"W_dec_{i}": sae.decoders[i].detach().float()})
    return folder


FORMAT = register_format(
    Format(
        name="circuit_tracer",
        reads="config.yaml + layer_L.safetensors (one layer's ReLU/JumpReLU (skip) transcoder: give its file) or "
        "W_enc_i/W_dec_i.safetensors (a cross-layer transcoder): circuit-tracer's layouts",
        detect=_detect,
        read=_read,
        write=_write,
        reads_file=True,
    )
)
