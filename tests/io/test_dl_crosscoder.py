"""dictionary_learning crosscoders (`CrossCoder`, `BatchTopKCrossCoder`; the pip release 0.1.0 has
none, so the reference is a NumPy forward of the library's code written here). Tiny random files
(2 layers, d 5, 15 latents: any transposition fails on shape or value) saved as the library saves
them, loaded, compared, round-tripped through saelab's dictionary layout; bad files fail by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import saelab
from saelab.errors import FileFormatError
from tests.io.test_formats import assert_matches, fired_fraction

L, D, F = 2, 5, 15
CLASSES = {"CrossCoder": "relu", "BatchTopKCrossCoder": "batchtopk"}


def _state(dict_class: str, gen: torch.Generator, normaliser: bool) -> dict[str, torch.Tensor]:
    """The tensors a `CrossCoder.state_dict()` holds (buffers included) for these shapes."""
    s = {
        "target_rms": torch.tensor(1.0),
        "activation_mean": torch.full((L, D), float("nan")),
        "activation_std": torch.full((L, D), float("nan")),
        "activation_global_scale": torch.ones(L),
        "encoder.weight": torch.randn(L, D, F, generator=gen),
        "encoder.bias": torch.randn(F, generator=gen),
        "decoder.weight": torch.randn(L, F, D, generator=gen) * torch.rand(1, F, 1, generator=gen) * 2,
        "decoder.bias": torch.randn(L, D, generator=gen),
        "code_normalization_id": torch.tensor(1),  # CROSSCODER
    }
    if normaliser:
        s["activation_mean"] = torch.randn(L, D, generator=gen)
        s["activation_std"] = torch.rand(L, D, generator=gen) + 0.5
        s["activation_global_scale"] = 1.0 / (s["activation_std"] ** 2).sum(-1).sqrt()
    if dict_class == "BatchTopKCrossCoder":
        s["k"] = torch.tensor(4, dtype=torch.int)
        s["threshold"] = torch.tensor(-1.0)  # set from the inputs by the caller
    return s


def _numpy_forward(s: dict[str, torch.Tensor], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The library's encode (normalise, sum of per-layer encoders, ReLU, threshold on f * code norm)
    and decode (per-layer decoder, bias, denormalise), x [B, L, D], in float64."""
    n = {k: v.double().numpy() for k, v in s.items()}
    normalised = not (np.isnan(n["activation_mean"]).any() or np.isnan(n["activation_std"]).any())
    if normalised:
        x = (x - n["activation_mean"]) * n["activation_global_scale"][None, :, None]
    f = np.maximum(np.einsum("bld,ldf->bf", x, n["encoder.weight"]) + n["encoder.bias"], 0)
    if "threshold" in n:
        code_norm = np.linalg.norm(n["decoder.weight"], axis=2).sum(0)[None]
        f = f * (f * code_norm > n["threshold"])
    x_hat = np.einsum("bf,lfd->bld", f, n["decoder.weight"]) + n["decoder.bias"]
    if normalised:
        x_hat = x_hat / (n["activation_global_scale"][None, :, None] + 1e-8) + n["activation_mean"]
    return f, x_hat


def _write(folder: Path, s: dict[str, torch.Tensor], dict_class: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(s, folder / "ae.pt")
    if dict_class:
        trainer = {"dict_class": dict_class, "activation_dim": D, "dict_size": F, "layer": 3, "lm_name": "tiny"}
        trainer.update(submodule_name="model.layers.3", code_normalization="CROSSCODER")
        (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))


def _case(folder: Path, dict_class: str, seed: int, normaliser: bool):
    gen = torch.Generator().manual_seed(seed)
    s = _state(dict_class, gen, normaliser)
    x = torch.randn(256, L, D, generator=gen) * 2 + torch.randn(1, L, D, generator=gen)
    if dict_class == "BatchTopKCrossCoder":
        # a threshold that bites: in the widest gap between the middle half of the positive scores,
        # so float32 against float64 cannot flip a latent that sits on it
        f, _ = _numpy_forward(s, x.double().numpy())
        scores = np.sort((f * np.linalg.norm(s["decoder.weight"].double().numpy(), axis=2).sum(0))[f > 0])
        lo, hi = len(scores) // 4, 3 * len(scores) // 4
        i = lo + int(np.argmax(np.diff(scores[lo:hi])))
        s["threshold"] = torch.tensor(float(scores[i] + scores[i + 1]) / 2)
    _write(folder, s, dict_class)
    return s, x


@pytest.mark.parametrize("normaliser", [False, True], ids=["raw", "normaliser"])
@pytest.mark.parametrize("dict_class", list(CLASSES))
def test_crosscoder_matches_numpy_and_round_trips(dict_class, normaliser, tmp_path):
    for seed in range(3):
        folder = tmp_path / f"{seed}"
        s, x = _case(folder / "ae", dict_class, seed, normaliser)
        sae = saelab.load(folder / "ae")
        assert sae.architecture == CLASSES[dict_class] and sae.cfg.site == ["layer_0", "layer_1"]
        f_ref, x_hat_ref = _numpy_forward(s, x.double().numpy())
        if dict_class == "BatchTopKCrossCoder":
            assert 0.1 < fired_fraction(torch.from_numpy(f_ref)) < 0.9
        flat = x.reshape(len(x), L * D)  # saelab reads the layers' concatenation
        assert_matches(sae.encode(flat), f_ref, f"{dict_class} encode")
        assert_matches(sae(flat), x_hat_ref.reshape(len(x), L * D), f"{dict_class} forward")
        prov = sae.provenance
        assert prov["dict_class"] == dict_class and prov["layers"] == L and prov["hook_name"] == "model.layers.3"
        assert prov["code_normalization"] == "CROSSCODER" and prov["activation_normalizer_folded"] == normaliser

        out = saelab.save(sae, folder / "converted")
        assert (out / "dictionary.json").is_file()  # a crosscoder goes to saelab's dictionary layout
        back = saelab.load(out)
        assert torch.equal(back.encode(flat), sae.encode(flat)) and torch.equal(back(flat), sae(flat))
        assert back.provenance["converted_from"]["format"] == "dictionary_learning"
        assert back.provenance["dict_class"] == dict_class


def test_an_unestimated_threshold_keeps_every_positive_code(tmp_path):
    gen = torch.Generator().manual_seed(0)
    s = _state("BatchTopKCrossCoder", gen, normaliser=False)
    _write(tmp_path / "ae", s, "BatchTopKCrossCoder")
    x = torch.randn(64, L, D, generator=gen)
    f_ref, _ = _numpy_forward(s, x.double().numpy())
    assert_matches(saelab.load(tmp_path / "ae").encode(x.reshape(64, -1)), f_ref, "BatchTopKCrossCoder threshold -1")


def test_class_from_tensor_names_and_a_compiled_state_dict(tmp_path):
    for dict_class in CLASSES:
        s = _state(dict_class, torch.Generator().manual_seed(1), normaliser=False)
        _write(tmp_path / dict_class, {f"_orig_mod.{k}": v for k, v in s.items()}, None)
        sae = saelab.load(tmp_path / dict_class)
        assert sae.architecture == CLASSES[dict_class] and sae.provenance["dict_class"] == dict_class


def test_bad_files_fail_naming_the_file(tmp_path):
    gen = torch.Generator().manual_seed(2)
    s = _state("CrossCoder", gen, normaliser=False)
    _write(tmp_path / "ok", s, "CrossCoder")
    data = (tmp_path / "ok" / "ae.pt").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=r"cut/ae\.pt.*truncated"):
        saelab.load(tmp_path / "cut", format="dictionary_learning")

    wrong = dict(s, **{"decoder.weight": s["decoder.weight"].transpose(1, 2).contiguous()})
    _write(tmp_path / "wrong", wrong, "CrossCoder")
    with pytest.raises(FileFormatError, match=r"wrong/ae\.pt.*'decoder\.weight' has shape \(2, 5, 15\)"):
        saelab.load(tmp_path / "wrong")

    b = _state("BatchTopKCrossCoder", gen, normaliser=False)
    for value, norm in ((2, "SAE"), (3, "MIXED"), (5, "DECOUPLED")):
        _write(tmp_path / norm, dict(b, code_normalization_id=torch.tensor(value)), "BatchTopKCrossCoder")
        with pytest.raises(FileFormatError, match=rf"{norm}/ae\.pt.*code_normalization {norm}"):
            saelab.load(tmp_path / norm)
    # a ReLU CrossCoder's code normalisation only weighs its training penalty: it loads
    _write(tmp_path / "sae_norm", dict(s, code_normalization_id=torch.tensor(2)), None)
    assert saelab.load(tmp_path / "sae_norm").provenance["code_normalization"] == "SAE"
