"""dictionary_learning (Marks, Karvonen, Mueller): `ae.pt` + `config.json`.

`ae.pt` is a torch state dict; it is read with torch's restricted loader (`weights_only=True`), which
refuses anything but tensors. `config.json['trainer']['dict_class']` names the class; without a config
the class is recognised from the tensor names, except TopK and BatchTopK, whose names are the same.

| dict_class | tensors | saelab |
|---|---|---|
| AutoEncoder | `encoder.weight [F,d]`, `encoder.bias`, `decoder.weight [d,F]`, `bias` (subtracted first) | relu |
| AutoEncoderNew | as above, `decoder.bias` instead of `bias`, nothing subtracted | relu |
| GatedAutoEncoder | `encoder.weight`, `gate_bias`, `mag_bias`, `r_mag`, `decoder.weight`, `decoder_bias` | gated |
| JumpReluAutoEncoder | `W_enc [d,F]`, `b_enc`, `W_dec [F,d]`, `b_dec` (not subtracted), `threshold [F]` | jumprelu |
| AutoEncoderTopK | `encoder.*`, `decoder.weight`, `b_dec`, `k` | topk |
| BatchTopKSAE | as TopK plus the inference `threshold` it encodes with | batchtopk |
| MatryoshkaBatchTopKSAE | `W_enc`, `b_enc`, `W_dec`, `b_dec`, `k`, `threshold`, `group_sizes` | matryoshka |
| CrossCoder | `encoder.weight [L,d,F]`, `encoder.bias [F]`, `decoder.weight [L,F,d]`, `decoder.bias [L,d]` | relu crosscoder |
| BatchTopKCrossCoder | as CrossCoder plus `k` and the inference `threshold` | batchtopk crosscoder |

A crosscoder (in the library's newer source; the pip release 0.1.0 has none) reads L layers: its encoder
sums `x_l @ W_l` over layers, so saelab's crosscoder over the concatenation (sites `layer_0` ...,
placeholders: the file names no per-layer hooks) has the same weights reshaped. BatchTopK keeps a
latent when `f * c > threshold`, c its code normalisation; CROSSCODER's c (the sum of per-layer
decoder row norms) is saelab's crosscoder selection score, the others have no counterpart and are
refused by name. Its optional activation normaliser ((x - mean) * scale per layer, undone on the
output) is a fixed affine map, folded into the weights, with `site_norm_scale` keeping the decoder
norms the threshold was learnt on.

Weights are taken as stored: `AutoEncoder.from_pretrained` rescales the decoder to unit norm by
default (which rescales the latents), the state dict itself does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError, FileFormatError
from saelab.io.atomic import read_json
from saelab.io.formats.base import Format, build, check_shape, read_torch_state, register_format, require_keys
from saelab.sae.base import SAE
from saelab.sae.registry import get_class, make_config

WEIGHTS, CONFIG = "ae.pt", "config.json"

_KEYS = {
    "AutoEncoder": {"encoder.weight", "encoder.bias", "decoder.weight", "bias"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "GatedAutoEncoder": {"encoder.weight", "gate_bias", "mag_bias", "r_mag", "decoder.weight", "decoder_bias"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "BatchTopKSAE": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
}


_CROSSCODERS = {
    "CrossCoder": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "BatchTopKCrossCoder": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias", "k", "threshold"},
}
# dictionary_learning's CodeNormalization enum values, as saved in `code_normalization_id`.
_CODE_NORMS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}


def _detect(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file()


def _trainer_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        return {}
    cfg = read_json(path, "the file may be truncated")
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    if not isinstance(trainer, dict):
        raise FileFormatError(f"{path} must hold a 'trainer' object (dictionary_learning's training config)")
    return trainer


def _dict_class(trainer: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> str:
    name = trainer.get("dict_class")
    if name is not None:
        name = str(name).rsplit(".", 1)[-1].strip("'<>")  # tolerate "<class '...BatchTopKSAE'>"
        if name not in _KEYS and name not in _CROSSCODERS:
            known = ", ".join([*_KEYS, *_CROSSCODERS])
            raise FileFormatError(f"{path}: dict_class {name!r} has no saelab reader; known: {known}")
        return name
    keys = set(tensors)
    if tensors.get("encoder.weight") is not None and tensors["encoder.weight"].dim() == 3:
        return "BatchTopKCrossCoder" if "k" in keys else "CrossCoder"
    found = [n for n, k in _KEYS.items() if k == keys]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise FileFormatError(
            f"{path} could be {' or '.join(found)} (same tensors); put its config.json beside it to say which"
        )
    raise FileFormatError(f"{path} holds tensors {sorted(keys)}, which match no dictionary_learning class")


def _read(folder: Path) -> SAE:
    path = folder / WEIGHTS
    tensors = read_torch_state(path)
    # a state dict saved from a torch.compile'd module prefixes every name; the library strips it
    tensors = {k.removeprefix("_orig_mod."): v for k, v in tensors.items()}
    trainer = _trainer_config(folder)
    name = _dict_class(trainer, tensors, path)
    if name in _CROSSCODERS:
        return _read_crosscoder(folder, path, tensors, trainer, name)
    require_keys(tensors, sorted(_KEYS[name] - {"threshold"} if name == "AutoEncoderTopK" else _KEYS[name]), path, name)
    t = {k: v.float() for k, v in tensors.items()}
    if "W_enc" in t:
        d_in, d_sae = t["W_enc"].shape
        W_enc, W_dec = t["W_enc"], t["W_dec"]
        check_shape(W_dec, (d_sae, d_in), "W_dec", path, f"W_enc {tuple(W_enc.shape)}")
    else:
        d_sae, d_in = t["encoder.weight"].shape
        W_enc, W_dec = t["encoder.weight"].t(), t["decoder.weight"].t()
        check_shape(t["decoder.weight"], (d_in, d_sae), "decoder.weight", path, f"encoder.weight {(d_sae, d_in)}")
    why = f"the weights (d_in={d_in}, d_sae={d_sae})"
    values: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae}
    state: dict[str, torch.Tensor] = {"W_enc": W_enc, "W_dec": W_dec}
    if name == "AutoEncoder":
        values.update(architecture="relu", apply_b_dec_to_input=True)
        state.update(b_enc=t["encoder.bias"], b_dec=t["bias"])
    elif name == "AutoEncoderNew":
        values.update(architecture="relu", apply_b_dec_to_input=False)
        state.update(b_enc=t["encoder.bias"], b_dec=t["decoder.bias"])
    elif name == "GatedAutoEncoder":
        values.update(architecture="gated", apply_b_dec_to_input=True)
        state.update(b_gate=t["gate_bias"], b_mag=t["mag_bias"], r_mag=t["r_mag"], b_dec=t["decoder_bias"])
    elif name == "JumpReluAutoEncoder":
        values.update(architecture="jumprelu", apply_b_dec_to_input=False)
        state.update(b_enc=t["b_enc"], b_dec=t["b_dec"], threshold=t["threshold"])
    else:
        k = int(tensors["k"].reshape(()).item())
        values.update(k=k, apply_b_dec_to_input=True)
        state.update(b_enc=t.get("b_enc", t.get("encoder.bias")), b_dec=t["b_dec"])
        if name == "AutoEncoderTopK":
            values["architecture"] = "topk"  # its default encode is per-token TopK, not the threshold
        else:
            check_shape(t["threshold"].reshape(-1), (1,), "threshold", path, "a shared BatchTopK threshold")
            state["threshold"] = t["threshold"].reshape(()).expand(d_sae).clone()
            values["architecture"] = "batchtopk" if name == "BatchTopKSAE" else "matryoshka"
        if name == "MatryoshkaBatchTopKSAE":
            sizes = [int(s) for s in tensors["group_sizes"].tolist()]
            if sum(sizes) != d_sae or min(sizes) <= 0:
                raise FileFormatError(f"{path}: group_sizes {sizes} must be positive and sum to d_sae={d_sae}")
            values["prefixes"] = torch.tensor(sizes).cumsum(0).tolist()
    for key, v in state.items():
        if key in ("b_enc", "b_gate", "b_mag", "r_mag", "threshold"):
            check_shape(v, (d_sae,), key, path, why)
        elif key == "b_dec":
            check_shape(v, (d_in,), key, path, why)
    hook = trainer.get("submodule_name") or (f"layer {trainer['layer']}" if "layer" in trainer else None)
    provenance = {
        "source_format": "dictionary_learning",
        "dict_class": name,
        "hook_name": hook,
        "layer": trainer.get("layer"),
        "model_name": trainer.get("lm_name"),
    }
    return build(values, state, folder, provenance)


def _code_normalization(tensors: dict[str, torch.Tensor], trainer: dict[str, Any], path: Path) -> str:
    """The saved enum value, else the config's name, else CROSSCODER (what the library assumes for
    files saved before it stored one)."""
    if "code_normalization_id" in tensors:
        value = int(tensors["code_normalization_id"].reshape(-1)[0].item())
        if value not in _CODE_NORMS:
            raise FileFormatError(f"{path}: code_normalization_id {value} is none of {_CODE_NORMS}")
        return _CODE_NORMS[value]
    name = str(trainer.get("code_normalization", "CROSSCODER")).rsplit(".", 1)[-1].upper()
    if name not in _CODE_NORMS.values():
        raise FileFormatError(f"{path}: config code_normalization {name!r} is none of {list(_CODE_NORMS.values())}")
    return name


def _read_crosscoder(folder: Path, path: Path, tensors: dict[str, torch.Tensor], trainer: dict, name: str) -> SAE:
    """A saelab crosscoder over the layers' concatenation (see the module docstring); the normaliser
    is folded in float64 so the float32 result matches the library's two-step computation."""
    require_keys(tensors, sorted(_CROSSCODERS[name]), path, name)
    t = {k: v.double() for k, v in tensors.items() if v.is_floating_point()}
    W = t["encoder.weight"]
    if W.dim() != 3:
        raise FileFormatError(f"{path}: 'encoder.weight' has shape {tuple(W.shape)}; a {name} stores [layers, d, F]")
    n_layers, d, d_sae = W.shape
    if n_layers < 2:
        raise FileFormatError(f"{path}: a {name} of {n_layers} layer; saelab crosscoders read at least two sites")
    why = f"encoder.weight {(n_layers, d, d_sae)} (layers, d, F)"
    check_shape(t["decoder.weight"], (n_layers, d_sae, d), "decoder.weight", path, why)
    check_shape(t["encoder.bias"], (d_sae,), "encoder.bias", path, why)
    check_shape(t["decoder.bias"], (n_layers, d), "decoder.bias", path, why)
    for key in _CROSSCODERS[name] & set(t):
        if not torch.isfinite(t[key]).all():
            raise FileFormatError(f"{path}: '{key}' contains NaN or Inf; the crosscoder is broken")
    code_norm = _code_normalization(tensors, trainer, path)
    if name == "BatchTopKCrossCoder" and code_norm != "CROSSCODER":
        raise FileFormatError(
            f"{path}: a BatchTopKCrossCoder with code_normalization {code_norm}; saelab's BatchTopK crosscoder "
            "selects on f * (sum of per-layer decoder norms), which is CROSSCODER only"
        )
    W_dec, b_enc, b_dec = t["decoder.weight"], t["encoder.bias"], t["decoder.bias"]
    scale = torch.ones(n_layers, dtype=torch.float64)
    mean, std = t.get("activation_mean"), t.get("activation_std")
    normalised = mean is not None and std is not None and not (mean.isnan().any() or std.isnan().any())
    if normalised:  # (x - mean) * g per layer in, / (g + 1e-8) + mean out, as the library computes it
        check_shape(mean, (n_layers, d), "activation_mean", path, why)
        g = t.get("activation_global_scale")
        if g is None:
            raise FileFormatError(f"{path} has activation_mean and activation_std but no activation_global_scale")
        check_shape(g, (n_layers,), "activation_global_scale", path, why)
        b_enc = b_enc - torch.einsum("ld,l,ldf->f", mean, g, W)
        W = W * g[:, None, None]
        scale = g + 1e-8
        W_dec = W_dec / scale[:, None, None]
        b_dec = b_dec / scale[:, None] + mean
    sites = [f"layer_{i}" for i in range(n_layers)]
    values: dict[str, Any] = {
        "architecture": "relu" if name == "CrossCoder" else "batchtopk",
        "d_in": n_layers * d,
        "d_sae": d_sae,
        "site": sites,
        "apply_b_dec_to_input": False,
        "decoder_norm": "penalty",
    }
    if name == "BatchTopKCrossCoder":
        values["k"] = int(tensors["k"].reshape(-1)[0].item())
    try:
        cfg = make_config(values)
    except ConfigError as exc:
        raise FileFormatError(f"{path}: the file's settings are not a valid saelab crosscoder ({exc})") from None
    sae = get_class(cfg.architecture)(cfg)
    state = {
        "W_enc": W.reshape(n_layers * d, d_sae),
        "b_enc": b_enc,
        "W_dec": W_dec.permute(1, 0, 2).reshape(d_sae, n_layers * d),
        "b_dec": b_dec.reshape(-1),
        "site_norm_scale": scale,  # decoder norms in the normalised space the threshold was learnt in
    }
    if name == "BatchTopKCrossCoder":
        threshold = t["threshold"].reshape(-1)
        check_shape(threshold, (1,), "threshold", path, "one shared BatchTopK threshold")
        state["threshold"] = threshold.reshape(())  # negative: never estimated (the library then keeps every f > 0)
    sae.load_state_dict({k: v.float().contiguous() for k, v in state.items()})
    sae.provenance = {
        "source_format": "dictionary_learning",
        "source_path": str(folder),
        "dict_class": name,
        "layers": n_layers,
        "code_normalization": code_norm,
        "hook_name": trainer.get("submodule_name"),
        "layer": trainer.get("layer"),
        "model_name": trainer.get("lm_name"),
        "activation_normalizer_folded": bool(normalised),
        "note": f"{path.name} names no per-layer hooks; the sites {sites} are placeholders",
    }
    return sae.eval()


FORMAT = register_format(
    Format(
        name="dictionary_learning",
        reads="ae.pt (+ config.json): AutoEncoder, AutoEncoderNew, Gated, JumpReLU, TopK, BatchTopK (its "
        "threshold), Matryoshka BatchTopK; CrossCoder, BatchTopKCrossCoder",
        detect=_detect,
        read=_read,
    )
)
