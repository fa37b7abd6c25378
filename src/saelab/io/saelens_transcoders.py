"""SAELens v6 transcoder files <-> saelab transcoders.

A SAELens transcoder is an SAE folder (`cfg.json` + `sae_weights.safetensors`) whose cfg.json adds
`d_out` and whose `metadata` names the hook read (`hook_name`) and the hook written
(`hook_name_out`). SAELens 6.54 has four transcoder classes:

| SAELens `architecture`     | saelab                 | tensors                                              |
|----------------------------|------------------------|------------------------------------------------------|
| `transcoder`               | `relu`, skip off       | W_enc [d_in, F], b_enc [F], W_dec [F, d_out], b_dec [d_out] |
| `skip_transcoder`          | `relu`, skip on        | + W_skip [d_out, d_in]                               |
| `jumprelu_transcoder`      | `jumprelu`, skip off   | + threshold [F]                                      |
| `jumprelu_skip_transcoder` | `jumprelu`, skip on    | + threshold [F], W_skip [d_out, d_in]                |

SAELens' forward: f = act(x @ W_enc + b_enc) (no bias is subtracted from x, `apply_b_dec_to_input`
must be false), y = f @ W_dec + b_dec (+ x @ W_skip.T). JumpReLU keeps relu(z) where z > threshold,
which is saelab's z * (z > threshold) for the non-negative thresholds saelab stores.

saelab's transcoders also have an input bias `b_in [d_in]` subtracted before the encoder. SAELens
has none, so writing folds it into the encoder bias, b_enc - b_in @ W_enc (same pre-activations),
and reading sets it to zero. BatchTopK and Matryoshka transcoders are written in their inference
form, a JumpReLU transcoder (with free decoder rows, the per-latent threshold theta / |d_i| that
their selection on f_i |d_i| > theta amounts to). SAELens has no TopK transcoder: the SAELens
writer refuses one by name, and `saelab.save` writes it in saelab's dictionary layout instead
(saelab.io.dictionary). A file that names no hooks gets the placeholder sites 'input' -> 'output',
noted in `sae.provenance['unnamed_hooks']` and not written back as hook names.
"""

from __future__ import annotations

from typing import Any

import torch

from saelab.errors import ConfigError, FileFormatError

# SAELens architecture -> (saelab architecture, skip connection)
FROM_SAELENS: dict[str, tuple[str, bool]] = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
# (saelab saved architecture, skip) -> SAELens architecture
TO_SAELENS: dict[tuple[str, bool], str] = {v: k for k, v in FROM_SAELENS.items()}


def is_transcoder_file(cfg: dict[str, Any]) -> bool:
    return cfg.get("architecture") in FROM_SAELENS


def hookpoints(cfg: dict[str, Any]) -> tuple[str | None, str | None]:
    """(hook read, hook written) of a SAELens transcoder cfg.json: metadata first, then top level."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_in = metadata.get("hook_name") or cfg.get("hook_name")
    hook_out = metadata.get("hook_name_out") or cfg.get("hook_name_out")
    for key, value in (("hook_name", hook_in), ("hook_name_out", hook_out)):
        if value is not None and not isinstance(value, str):
            raise FileFormatError(f"cfg.json: '{key}' must be a string (got {value!r:.60})")
    return hook_in, hook_out


def config_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """The saelab config values that a SAELens transcoder cfg.json fixes."""
    architecture, skip = FROM_SAELENS[cfg["architecture"]]
    d_out = cfg.get("d_out")
    if d_out is None:
        raise FileFormatError(
            f"cfg.json describes a SAELens '{cfg['architecture']}' but has no 'd_out' (the width of the "
            "written hook); add it"
        )
    if not isinstance(d_out, int) or isinstance(d_out, bool) or d_out <= 0:
        raise FileFormatError(f"cfg.json: 'd_out' must be a positive integer (got {d_out!r:.60})")
    if cfg.get("apply_b_dec_to_input"):
        raise FileFormatError(
            f"cfg.json describes a SAELens '{cfg['architecture']}' with apply_b_dec_to_input=true; a "
            "transcoder's b_dec lives in the output space and cannot be subtracted from its input "
            "(SAELens refuses such a file too)"
        )
    hook_in, hook_out = hookpoints(cfg)
    if hook_in and hook_in == hook_out:
        raise FileFormatError(
            f"cfg.json: hook_name and hook_name_out are both {hook_in!r}; a transcoder writes another hook "
            "than it reads (fix hook_name_out)"
        )
    return {
        "architecture": architecture,
        "d_out": d_out,
        "skip": skip,
        "apply_b_dec_to_input": False,
        "site": hook_in or PLACEHOLDER_IN,
        "write_site": hook_out or PLACEHOLDER_OUT,
    }


# Sites of a file that names no hooks (saelab's transcoders need both); provenance says so.
PLACEHOLDER_IN, PLACEHOLDER_OUT = "input", "output"


def unnamed_hooks(cfg: dict[str, Any]) -> list[str]:
    hook_in, hook_out = hookpoints(cfg)
    return [k for k, v in (("hook_name", hook_in), ("hook_name_out", hook_out)) if not v]


def state_from_file(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """SAELens transcoder tensors -> saelab's saved state: a zero input bias where saelab has one."""
    tensors = dict(tensors)
    if "b_in" in expected and "b_in" not in tensors:
        tensors["b_in"] = torch.zeros(expected["b_in"])
    return tensors


def saelens_architecture(saved_architecture: str, skip: bool, trained_as: str) -> str:
    """The SAELens transcoder class for a saelab transcoder, or a ConfigError that says why none fits."""
    name = TO_SAELENS.get((saved_architecture, skip))
    if name is None:
        kinds = ", ".join(sorted({a for a, _ in TO_SAELENS} | {"batchtopk", "matryoshka"}))
        raise ConfigError(
            f"SAELens 6.54 has no {'skip ' if skip else ''}transcoder class for a '{trained_as}' "
            f"transcoder (it has {', '.join(sorted(FROM_SAELENS))}), so it cannot be written in the SAELens "
            f"layout; transcoders of {kinds} can. saelab.save writes it in saelab's dictionary layout "
            "instead (saelab convert: --to saelab-dictionary), which saelab.load reads back"
        )
    return name


def state_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """saelab's saved state -> SAELens transcoder tensors: b_in folded into b_enc."""
    state = dict(state)
    b_in = state.pop("b_in", None)
    if b_in is not None:
        state["b_enc"] = state["b_enc"] - b_in @ state["W_enc"]
    return state
