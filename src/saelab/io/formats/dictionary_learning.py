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

Weights are taken as stored: `AutoEncoder.from_pretrained` rescales the decoder to unit norm by
default (which rescales the latents), the state dict itself does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.errors import FileFormatError
from saelab.io.atomic import read_json
from saelab.io.formats.base import Format, build, check_shape, read_torch_state, register_format, require_keys
from saelab.sae.base import SAE

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
        if name not in _KEYS:
            raise FileFormatError(f"{path}: dict_class {name!r} has no saelab reader; known: {', '.join(_KEYS)}")
        return name
    keys = set(tensors)
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
    trainer = _trainer_config(folder)
    name = _dict_class(trainer, tensors, path)
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


FORMAT = register_format(
    Format(
        name="dictionary_learning",
        reads="ae.pt (+ config.json): AutoEncoder, AutoEncoderNew, Gated, JumpReLU, TopK, BatchTopK (its "
        "threshold), Matryoshka BatchTopK",
        detect=_detect,
        read=_read,
    )
)
