"""saelab's dictionary layout (crosscoders, TopK transcoders): exact save/load, and bad files that
fail naming the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelab
from saelab.errors import FileFormatError
from saelab.io import dictionary, formats

SITES = ["model.layers.1", "model.layers.2", "other:model.layers.1"]
WIDTH, D_SAE = 4, 15  # three sites of width 4: W_enc [12, 15], W_dec [15, 12]
CROSSCODERS = [
    ("relu", {}),
    ("jumprelu", {}),
    ("topk", {"k": 3}),
    ("batchtopk", {"k": 3}),
    ("matryoshka", {"k": 3, "prefixes": [5, 15]}),
]


def randomise(sae, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
            if name == "log_threshold":
                p.copy_((0.2 + torch.rand(p.shape, generator=gen)).log())
        if "threshold" in dict(sae.named_buffers()):  # BatchTopK's inference threshold
            sae.threshold.fill_(1.0)
    return sae.eval()


def crosscoder(architecture="batchtopk", extra=None):
    cfg = {"architecture": architecture, "d_in": WIDTH * len(SITES), "d_sae": D_SAE, "site": SITES}
    return randomise(saelab.create({**cfg, **(extra if extra is not None else {"k": 3})}))


def x(n: int = 128) -> torch.Tensor:
    return torch.randn(n, WIDTH * len(SITES)) * 2.0


@pytest.mark.parametrize("architecture,extra", CROSSCODERS)
def test_crosscoder_round_trip_is_exact(architecture, extra, tmp_path):
    ours = crosscoder(architecture, extra)
    per_site = torch.tensor([0.5, 2.0, 3.0]).repeat_interleave(WIDTH)  # trained on scaled sites, folded
    ours.fold_scales(per_site, per_site)
    out = saelab.save(ours, tmp_path / "cc")  # saelab.save picks this layout: SAELens has no crosscoder
    cfg = json.loads((out / dictionary.CONFIG_FILE).read_text())
    assert cfg["kind"] == "crosscoder" and cfg["architecture"] == architecture
    assert cfg["reads"] == cfg["writes"] == [{"site": s, "width": WIDTH} for s in SITES]
    assert cfg["tensors"]["W_enc"] == [WIDTH * len(SITES), D_SAE]
    back = saelab.load(out)
    assert back.architecture == architecture and back.cfg == ours.cfg
    inp = x()
    with torch.no_grad():
        f = ours.encode(inp)
        assert 0.02 < float((f != 0).float().mean()) < 0.98
        assert torch.equal(back.encode(inp), f) and torch.equal(back(inp), ours(inp))
        assert torch.equal(back.site_decoder_norms(), ours.site_decoder_norms())  # training-space norms kept
    assert back.provenance["reads"] == SITES and back.provenance["source_format"] == "saelab-dictionary"


def test_any_dictionary_can_use_the_layout(tmp_path):
    for i, sae in enumerate(
        [
            randomise(saelab.create({"architecture": "gated", "d_in": 5, "d_sae": D_SAE})),
            randomise(
                saelab.create(
                    {
                        "architecture": "topk",
                        "d_in": 5,
                        "d_out": 7,
                        "d_sae": D_SAE,
                        "k": 2,
                        "site": "a",
                        "write_site": "b",
                    }
                )
            ),
        ]
    ):
        out = dictionary.save(sae, tmp_path / str(i))
        back = saelab.load(out)
        inp = torch.randn(32, 5)
        with torch.no_grad():
            assert torch.equal(back(inp), sae(inp))
    kinds = [json.loads((tmp_path / str(i) / dictionary.CONFIG_FILE).read_text())["kind"] for i in range(2)]
    assert kinds == ["sae", "transcoder"]


def test_saelens_writer_refuses_a_crosscoder_by_name(tmp_path):
    from saelab.errors import ConfigError
    from saelab.io import saelens

    with pytest.raises(ConfigError, match="several sites.*saelab's dictionary layout"):
        saelens.save(crosscoder(), tmp_path)


def test_convert_moves_a_crosscoder_between_folders(tmp_path, capsys):
    from saelab.cli import main

    ours = crosscoder()
    saelab.save(ours, tmp_path / "a")
    assert main(["convert", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--to", "saelab-dictionary"]) == 0
    back = saelab.load(tmp_path / "b")
    with torch.no_grad():
        inp = x()
        assert torch.equal(back(inp), ours(inp))
    assert back.provenance["reads"] == SITES
    assert main(["convert", str(tmp_path / "a"), "--out", str(tmp_path / "c")]) == 2  # --to saelens
    assert "several sites" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ bad files


@pytest.fixture
def saved(tmp_path):
    return saelab.save(crosscoder(), tmp_path / "cc")


def _edit(folder, change):
    path = folder / dictionary.CONFIG_FILE
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c["reads"][1].pop("site"), r"reads\[1\] has no 'site'"),
        (lambda c: c["reads"][1].update(site=None), r"reads\[1\] has site null"),
        (lambda c: c["reads"][2].update(site=" model.layers.3"), r"reads\[2\]: 'site' must be a module path"),
        (lambda c: c["writes"][2].update(site=SITES[0]), r"writes\[2\]: site 'model.layers.1' is listed twice"),
        (lambda c: c["reads"][0].update(width=0), r"reads\[0\] \(model.layers.1\): 'width' must be a positive"),
        (lambda c: c.update(reads=[]), "'reads' must be a non-empty list"),
        (lambda c: [e.update(width=5) for e in c["reads"]], "config.d_in is 12 but the widths in 'reads' add up to 15"),
        (lambda c: c["writes"].pop(), "cross-layer transcoder"),
        (lambda c: c["reads"].pop(), "cross-layer transcoder"),
        (
            lambda c: [e.update(site="model.layers.9") for e in (c["reads"][0], c["writes"][0])],
            "config.site is .* but 'reads' says",
        ),
        (lambda c: c.update(architecture="nonesuch"), "unknown architecture 'nonesuch'"),
        (lambda c: c.update(architecture="topk"), "they must agree"),
        (lambda c: c.update(format_version=2), "format_version 2 is not one this saelab reads"),
        (lambda c: c.update(format="saelens"), "'format' must be 'saelab-dictionary'"),
        (lambda c: c.update(d_sae=16), "'d_sae' is 16 but config.d_sae is 15"),
        (lambda c: c["config"].update(k=0), "'config' is not a valid saelab config"),
    ],
)
def test_bad_config_fails_naming_file_and_problem(saved, change, message):
    _edit(saved, change)
    with pytest.raises(FileFormatError, match=message) as err:
        saelab.load(saved)
    assert str(saved / dictionary.CONFIG_FILE) in str(err.value)


def test_truncated_files_fail_by_name(saved):
    weights = saved / dictionary.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=f"{weights}.*truncated"):
        saelab.load(saved)
    config = saved / dictionary.CONFIG_FILE
    config.write_text(config.read_text()[:40])
    with pytest.raises(FileFormatError, match=str(config)):
        saelab.load(saved)


def test_missing_weights_fail_by_name(saved):
    (saved / dictionary.WEIGHTS_FILE).unlink()
    with pytest.raises(FileFormatError, match="dictionary.safetensors is missing"):
        saelab.load(saved)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.update(W_dec=t["W_dec"].T.contiguous()), r"'W_dec' has shape \(12, 15\) .* implies \(15, 12\)"),
        (lambda t: t.pop("b_enc"), r"missing \['b_enc'\]"),
        (lambda t: t.update(extra=torch.zeros(3)), r"unexpected \['extra'\]"),
        (lambda t: t["W_enc"].__setitem__((0, 0), float("nan")), "'W_enc' contains NaN"),
    ],
)
def test_bad_tensors_fail_naming_file_and_problem(saved, change, message):
    weights = saved / dictionary.WEIGHTS_FILE
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    with pytest.raises(FileFormatError, match=message) as err:
        saelab.load(saved)
    assert str(weights) in str(err.value)


def test_sparsity_and_metadata_are_kept_beside_the_weights(tmp_path):
    from saelab.io.saelens import load_sparsity

    freq = torch.rand(D_SAE) * 0.5
    out = saelab.save(crosscoder(), tmp_path / "cc", sparsity=freq, metadata={"saelab_source": {"type": "toy"}})
    torch.testing.assert_close(load_sparsity(out), freq, rtol=1e-5, atol=1e-9)
    assert json.loads((out / dictionary.CONFIG_FILE).read_text())["metadata"] == {"saelab_source": {"type": "toy"}}
    assert formats.read_metadata(out) == {"saelab_source": {"type": "toy"}}  # what `saelab eval` reads
    saelab.save(crosscoder(), out)  # saved again without: the stale frequencies go
    assert load_sparsity(out) is None


def test_saving_over_a_folder_in_the_other_layout_leaves_one_format(tmp_path):
    saelab.save(crosscoder(), tmp_path / "d")
    sae = saelab.create({"architecture": "relu", "d_in": 5, "d_sae": D_SAE})
    saelab.save(sae, tmp_path / "d")
    assert formats.detect(tmp_path / "d").name == "saelens" and saelab.load(tmp_path / "d").cfg.d_in == 5
    saelab.save(crosscoder(), tmp_path / "d")
    assert formats.detect(tmp_path / "d").name == "saelab-dictionary"
