"""SAELens 6.54's four transcoder classes, both directions, against sae-lens' own loader and forward.

Shapes are asymmetric (d_in 5, d_out 7, d_sae 15) so any transposition or swapped width fails. The
first tests check the tensor mapping alone (saelab.io.saelens_transcoders) against a forward of
saelab's transcoder written here; the rest go through saelab.load / saelab.save with real saelab
transcoders.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import ConfigError
from saelab.io import saelens_transcoders
from tests.io.test_formats import assert_matches, fired_fraction, reference_library

D_IN, D_OUT, D_SAE = 5, 7, 15
HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
KINDS = list(saelens_transcoders.FROM_SAELENS)  # the four SAELens transcoder architectures


def inputs(n: int = 256) -> torch.Tensor:
    return torch.randn(n, D_IN) * 2.0


def sae_lens_transcoder(kind: str, hooks: bool = True):
    """A random SAELens transcoder of `kind` built by sae-lens itself."""
    sae_lens = reference_library("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    cls, cfg_cls = sae_lens.saes.sae.get_sae_class(kind)
    metadata = SAEMetadata(hook_name=HOOK_IN, hook_name_out=HOOK_OUT) if hooks else SAEMetadata()
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=metadata))
    gen = torch.Generator().manual_seed(hash(kind) % 1000)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
            if name == "threshold":
                p.copy_(0.2 + torch.rand(p.shape, generator=gen))
    return theirs.eval()


def saelab_forward(state: dict, architecture: str, skip: bool, x: torch.Tensor):
    """saelab's transcoder: f = act((x - b_in) @ W_enc + b_enc), y = f @ W_dec + b_dec (+ x @ W_skip.T)."""
    pre = (x - state["b_in"]) @ state["W_enc"] + state["b_enc"]
    f = torch.relu(pre) if architecture == "relu" else pre * (pre > state["threshold"])
    y = f @ state["W_dec"] + state["b_dec"]
    return f, (y + x @ state["W_skip"].T if skip else y)


@pytest.mark.parametrize("kind", KINDS)
def test_mapping_reads_each_sae_lens_transcoder(kind, tmp_path):
    theirs = sae_lens_transcoder(kind)
    theirs.save_model(str(tmp_path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    values = saelens_transcoders.config_values(cfg)
    architecture, skip = saelens_transcoders.FROM_SAELENS[kind]
    assert values == {
        "architecture": architecture,
        "d_out": D_OUT,
        "skip": skip,
        "apply_b_dec_to_input": False,
        "site": HOOK_IN,
        "write_site": HOOK_OUT,
    }
    state = saelens_transcoders.state_from_file(load_file(str(tmp_path / "sae_weights.safetensors")), {"b_in": (D_IN,)})
    x = inputs()
    f, y = saelab_forward(state, architecture, skip, x)
    with torch.no_grad():
        f_ref = theirs.encode(x)
        assert 0.05 < fired_fraction(f_ref) < 0.95
        assert_matches(f, f_ref, f"{kind} encode")
        assert_matches(y, theirs(x), f"{kind} forward")


@pytest.mark.parametrize("kind", KINDS)
def test_mapping_writes_files_sae_lens_loads(kind, tmp_path):
    sae_lens = reference_library("sae_lens")
    architecture, skip = saelens_transcoders.FROM_SAELENS[kind]
    gen = torch.Generator().manual_seed(3)
    state = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen),
        "b_in": torch.randn(D_IN, generator=gen),  # SAELens has no input bias: it must be folded
        "W_dec": torch.randn(D_SAE, D_OUT, generator=gen),
        "b_dec": torch.randn(D_OUT, generator=gen),
    }
    if architecture == "jumprelu":
        state["threshold"] = 0.2 + torch.rand(D_SAE, generator=gen)
    if skip:
        state["W_skip"] = torch.randn(D_OUT, D_IN, generator=gen)
    name = saelens_transcoders.saelens_architecture(architecture, skip, architecture)
    assert name == kind
    save_file(saelens_transcoders.state_for_file(state), str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": name, "d_in": D_IN, "d_sae": D_SAE, "d_out": D_OUT, "dtype": "float32"}
    (tmp_path / "cfg.json").write_text(
        json.dumps({**cfg, "apply_b_dec_to_input": False, "metadata": {"sae_lens_version": "6.0.0"}})
    )
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(theirs).__name__ == sae_lens.saes.sae.get_sae_class(kind)[0].__name__
    x = inputs()
    f, y = saelab_forward(state, architecture, skip, x)
    with torch.no_grad():
        assert_matches(f, theirs.encode(x), f"{kind} encode in SAELens")
        assert_matches(y, theirs(x), f"{kind} forward in SAELens")


def test_no_sae_lens_class_is_refused_by_name():
    with pytest.raises(ConfigError, match="SAELens 6.54 has no skip transcoder class for a 'topk'"):
        saelens_transcoders.saelens_architecture("topk", True, "topk")
