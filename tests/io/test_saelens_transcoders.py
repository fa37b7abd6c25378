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

import saelab
from saelab.errors import ConfigError, FileFormatError
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


# ------------------------------------------------------------------------------ real saelab classes

SAELAB_KINDS = [  # (saelab architecture, extra config, the SAELens class it is written as, without skip)
    ("relu", {}, "transcoder"),
    ("jumprelu", {}, "jumprelu_transcoder"),
    ("batchtopk", {"k": 4}, "jumprelu_transcoder"),
    ("matryoshka", {"k": 4, "prefixes": [4, 9, 15]}, "jumprelu_transcoder"),
]


def saelab_transcoder(architecture: str, extra: dict, skip: bool, seed: int = 0):
    """A saelab transcoder d_in 5 -> d_out 7 with every parameter random (b_in and W_skip too)."""
    sae = saelab.create(
        {
            "architecture": architecture,
            "d_in": D_IN,
            "d_out": D_OUT,
            "d_sae": D_SAE,
            "site": HOOK_IN,
            "write_site": HOOK_OUT,
            "skip": skip,
            **extra,
        }
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
            if name == "log_threshold":
                p.copy_((0.2 + torch.rand(p.shape, generator=gen)).log())
        if architecture in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(1.5)
    return sae.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_saelab_loads_each_sae_lens_transcoder_with_its_hooks(kind, tmp_path):
    theirs = sae_lens_transcoder(kind)
    theirs.save_model(str(tmp_path))
    ours = saelab.load(tmp_path)
    architecture, skip = saelens_transcoders.FROM_SAELENS[kind]
    assert ours.architecture == architecture and ours.cfg.skip == skip and ours.cfg.is_transcoder
    assert (ours.cfg.d_in, ours.cfg.output_width, ours.cfg.d_sae) == (D_IN, D_OUT, D_SAE)
    assert (ours.cfg.site, ours.cfg.write_site) == (HOOK_IN, HOOK_OUT)
    assert ours.provenance["hook_name"] == HOOK_IN and ours.provenance["hook_name_out"] == HOOK_OUT
    x = inputs()
    with torch.no_grad():
        f_ref = theirs.encode(x)
        assert 0.05 < fired_fraction(f_ref) < 0.95
        assert_matches(ours.encode(x), f_ref, f"{kind} encode")
        assert_matches(ours(x), theirs(x), f"{kind} forward")


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("architecture,extra,written_as", SAELAB_KINDS)
def test_saelab_transcoders_load_in_sae_lens_with_the_same_outputs(architecture, extra, written_as, skip, tmp_path):
    sae_lens = reference_library("sae_lens")
    ours = saelab_transcoder(architecture, extra, skip)
    out = saelab.save(ours, tmp_path / "tc")
    cfg = json.loads((out / "cfg.json").read_text())
    expected = written_as.replace("transcoder", "skip_transcoder") if skip else written_as
    assert cfg["architecture"] == expected and cfg["d_out"] == D_OUT and cfg["apply_b_dec_to_input"] is False
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (HOOK_IN, HOOK_OUT)
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert type(theirs).__name__ == sae_lens.saes.sae.get_sae_class(expected)[0].__name__
    assert theirs.cfg.metadata.hook_name_out == HOOK_OUT
    x = inputs()
    with torch.no_grad():
        f = ours.encode(x)
        assert 0.05 < fired_fraction(f) < 0.95
        assert_matches(f, theirs.encode(x), f"saelab {architecture} transcoder encode in SAELens")
        assert_matches(ours(x), theirs(x), f"saelab {architecture} transcoder forward in SAELens")
        back = saelab.load(out)  # and back: the same outputs (b_in now folded into b_enc)
        assert (back.cfg.site, back.cfg.write_site, back.cfg.skip) == (HOOK_IN, HOOK_OUT, skip)
        assert_matches(back.encode(x), f, "reloaded encode")
        assert_matches(back(x), ours(x), "reloaded forward")


@pytest.mark.parametrize("kind", KINDS)
def test_sae_lens_round_trip_through_saelab_is_exact(kind, tmp_path):
    """SAELens file -> saelab -> SAELens file: the same tensors, the same class, the same hooks."""
    sae_lens = reference_library("sae_lens")
    theirs = sae_lens_transcoder(kind)
    theirs.save_model(str(tmp_path / "a"))
    saelab.save(saelab.load(tmp_path / "a"), tmp_path / "b")
    a, b = (load_file(str(tmp_path / p / "sae_weights.safetensors")) for p in ("a", "b"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a if k != "threshold")
    if "threshold" in a:  # saelab keeps log(threshold): exp(log(t)) is t to the last bit or two
        torch.testing.assert_close(b["threshold"], a["threshold"], rtol=1e-6, atol=0)
    again = sae_lens.SAE.load_from_disk(str(tmp_path / "b"), device="cpu")
    assert type(again) is type(theirs) and again.cfg.metadata.hook_name == HOOK_IN


@pytest.mark.parametrize("skip", [False, True])
def test_topk_transcoder_is_refused_by_the_saelens_writer_and_saved_in_saelab_layout(skip, tmp_path):
    from saelab.io import saelens

    ours = saelab_transcoder("topk", {"k": 3}, skip)
    with pytest.raises(ConfigError, match="SAELens 6.54 has no (skip )?transcoder class for a 'topk'"):
        saelens.save(ours, tmp_path / "refused")
    out = saelab.save(ours, tmp_path / "tc")
    assert (out / "dictionary.json").is_file() and not (out / "cfg.json").exists()
    back = saelab.load(out)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(back.encode(x), ours.encode(x)) and torch.equal(back(x), ours(x))
    assert (back.cfg.site, back.cfg.write_site, back.cfg.skip) == (HOOK_IN, HOOK_OUT, skip)


@pytest.mark.parametrize("kind", KINDS)
def test_convert_writes_each_transcoder_kind_for_sae_lens(kind, tmp_path, capsys):
    from saelab.cli import main

    sae_lens = reference_library("sae_lens")
    theirs = sae_lens_transcoder(kind)
    theirs.save_model(str(tmp_path / "src"))
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"saelens -> saelens: {saelens_transcoders.FROM_SAELENS[kind][0]} d_in=5 d_out=7 d_sae=15" in printed
    assert HOOK_IN in printed and HOOK_OUT in printed
    again = sae_lens.SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    assert type(again) is type(theirs)
    x = inputs()
    with torch.no_grad():
        assert_matches(again.encode(x), theirs.encode(x), f"{kind} converted, encode in SAELens")
        assert_matches(again(x), theirs(x), f"{kind} converted, forward in SAELens")


def test_negative_sae_lens_thresholds_load_as_relu_cuts(tmp_path):
    """SAELens keeps relu(z) where z > threshold: a threshold below zero cuts nothing the ReLU keeps."""
    theirs = sae_lens_transcoder("jumprelu_transcoder")
    with torch.no_grad():
        theirs.threshold[:5] = -0.5
        theirs.threshold[5:8] = 0.0
    theirs.save_model(str(tmp_path))
    ours = saelab.load(tmp_path)
    x = inputs()
    with torch.no_grad():
        assert_matches(ours.encode(x), theirs.encode(x), "negative thresholds, encode")
        assert_matches(ours(x), theirs(x), "negative thresholds, forward")


def test_convert_reads_and_writes_transcoders(tmp_path, capsys):
    from saelab.cli import main

    sae_lens = reference_library("sae_lens")
    theirs = sae_lens_transcoder("jumprelu_skip_transcoder")
    theirs.save_model(str(tmp_path / "src"))
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "dict"), "--to", "saelab-dictionary"]) == 0
    assert HOOK_OUT in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "dict"), "--out", str(tmp_path / "back")]) == 0
    again = sae_lens.SAE.load_from_disk(str(tmp_path / "back"), device="cpu")
    x = inputs()
    with torch.no_grad():
        assert_matches(again(x), theirs(x), "converted twice, forward in SAELens")
    saelab.save(saelab_transcoder("topk", {"k": 3}, True), tmp_path / "topk")
    assert main(["convert", str(tmp_path / "topk"), "--out", str(tmp_path / "no")]) == 2
    assert "no skip transcoder class for a 'topk'" in capsys.readouterr().err


def _sae_lens_file(tmp_path, kind="skip_transcoder"):
    sae_lens_transcoder(kind).save_model(str(tmp_path))
    return json.loads((tmp_path / "cfg.json").read_text())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda cfg: cfg.pop("d_out"), "has no 'd_out'"),
        (lambda cfg: cfg.update(d_out="7"), "'d_out' must be a positive integer"),
        (lambda cfg: cfg.update(apply_b_dec_to_input=True), "cannot be subtracted from its input"),
        (lambda cfg: cfg.update(d_out=5), r"'W_dec' has shape \(15, 7\) but cfg.json \(d_in=5, d_sae=15, d_out=5\)"),
        (lambda cfg: cfg["metadata"].update(hook_name_out=HOOK_IN), "both"),
    ],
)
def test_bad_sae_lens_transcoder_files_fail_by_name(edit, message, tmp_path):
    cfg = _sae_lens_file(tmp_path)
    edit(cfg)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match=message):
        saelab.load(tmp_path)


def test_transposed_skip_matrix_fails_by_name(tmp_path):
    _sae_lens_file(tmp_path)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(FileFormatError, match=r"sae_weights.safetensors: 'W_skip' has shape \(5, 7\).*\(7, 5\)"):
        saelab.load(tmp_path)


def test_transcoder_without_hook_names_loads_with_placeholder_sites(tmp_path):
    sae_lens_transcoder("transcoder", hooks=False).save_model(str(tmp_path))
    ours = saelab.load(tmp_path)
    assert (ours.cfg.site, ours.cfg.write_site) == ("input", "output")
    assert "unnamed_hooks" in ours.provenance
