"""Caches of several sites: several hookpoints, and the same tokens through two models (`alias/hookpoint`)."""

import pytest
import torch

from saelab.activations.cache import CachedSource, read_manifest, write_cache
from saelab.activations.factory import build_source, held_out
from saelab.errors import ConfigError
from saelab.models import Harvester, ModelSource
from tests.models import tiny

HPS = ["transformer.h.0", "transformer.h.1"]
SITES = ["base/transformer.h.0", "base/transformer.h.1", "ft/transformer.h.0", "ft/transformer.h.1"]


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return {"base": tiny.make_gpt2(), "ft": tiny.make_gpt2(seed=5)}, tiny.make_tokenizer(), tiny.make_texts(30)


def _harvester(parts, hookpoints=HPS):
    models, tok, texts = parts
    names = {"base": "tiny-a", "ft": "tiny-b"}
    return Harvester(models, tok, texts, list(hookpoints), context_size=16, model_batch_size=4, model_name=names)


def _in_order(harvester):
    parts = []
    while (rows := harvester.rows.next_rows(4)) is not None:
        parts.append(harvester.harvest_rows(*rows))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_two_model_cache_round_trip_equals_the_live_harvest(tmp_path, parts):
    manifest = write_cache(_harvester(parts), tmp_path / "c", shard_tokens=100)
    on_disk = read_manifest(tmp_path / "c")
    assert list(on_disk["hookpoints"]) == SITES and on_disk["models"] == {"base": "tiny-a", "ft": "tiny-b"}
    assert manifest["complete"] and on_disk["model"] == "base=tiny-a, ft=tiny-b"
    ref = _in_order(_harvester(parts))
    src = CachedSource(tmp_path / "c", hookpoints=["transformer.h.1"], batch_size=1, shuffle=False)
    assert src.site_names == ["base/transformer.h.1", "ft/transformer.h.1"] and src.d_in == 64
    batches = list(src)
    for site in src.site_names:
        assert torch.equal(torch.cat([b.sites[site] for b in batches]), ref[site])
    assert torch.equal(torch.cat([b.tokens for b in batches]), ref["tokens"])
    # shuffled: one permutation for every site, so a row's sites still come from one token
    shuffled = next(iter(CachedSource(tmp_path / "c", hookpoints=["*/transformer.h.*"], batch_size=64, seed=3)))
    assert list(shuffled.sites) == SITES and shuffled.x is shuffled.sites[SITES[0]]
    k = torch.cdist(shuffled.x, ref[SITES[0]]).argmin(dim=1)
    assert not torch.equal(k, torch.arange(64))
    assert all(torch.equal(shuffled.sites[s], ref[s][k]) for s in SITES)
    one = CachedSource(tmp_path / "c", "ft/transformer.h.0", batch_size=8, models={"base": "tiny-a", "ft": "tiny-b"})
    assert one.site_names == ["ft/transformer.h.0"]
    with pytest.raises(ConfigError, match=r"'base/\*\*' matches 2 sites .*read several with `hookpoints`"):
        CachedSource(tmp_path / "c", "base/**")


def test_multi_site_cache_equals_the_live_source_and_resumes_exactly(tmp_path, parts):
    models, tok, texts = parts
    harvester = Harvester(models["base"], tok, texts, HPS, context_size=16, model_batch_size=4, model_name="tiny-a")
    write_cache(harvester, tmp_path / "c", shard_tokens=100)
    live = ModelSource(models["base"], tok, texts, hookpoints=["transformer.h.*"], context_size=16,
                       batch_size=1, buffer_tokens=10_000, model_batch_size=4)  # fmt: skip
    cached = CachedSource(tmp_path / "c", hookpoints=["transformer.h.*"], batch_size=1, seed=4)
    assert live.site_names == cached.site_names == HPS and live.site_widths == cached.site_widths

    def table(source):  # one row per token: its id, then every site; sorted, as each source shuffles its own way
        rows = torch.cat([torch.cat([x.tokens[:, None].float(), *x.sites.values()], 1) for x in source])
        return rows[rows[:, 1].argsort()]

    live_rows, cached_rows = table(live), table(cached)
    assert live_rows.shape == cached_rows.shape == (read_manifest(tmp_path / "c")["total_tokens"], 1 + 2 * 64)
    assert torch.allclose(live_rows, cached_rows, atol=1e-6)

    src = CachedSource(tmp_path / "c", hookpoints=HPS, batch_size=16, repeat=True, seed=1)
    for _ in range(7):
        next(src)
    state = src.state_dict()
    ref = [next(src) for _ in range(20)]
    other = CachedSource(tmp_path / "c", hookpoints=HPS, batch_size=16, repeat=True, seed=1)
    other.load_state_dict(state)
    for x, y in zip(ref, (next(other) for _ in ref)):
        assert torch.equal(x.tokens, y.tokens) and all(torch.equal(x.sites[s], y.sites[s]) for s in HPS)


def test_two_model_config_harvests_once_then_streams_both(tmp_path, parts):
    models, tok, texts = parts
    folders = {}
    for alias, m in models.items():
        m.save_pretrained(tmp_path / alias)
        tok.save_pretrained(tmp_path / alias)
        folders[alias] = str(tmp_path / alias)
    spec = {
        "type": "model",
        "models": folders,
        "hookpoints": HPS,
        "data": {"texts": texts},
        "context_size": 16,
        "batch_size": 32,
        "cache_dir": str(tmp_path / "cache"),
        "repeat": True,
    }
    first = build_source(spec)
    stamp = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    assert first.site_names == SITES and read_manifest(tmp_path / "cache")["models"] == folders
    second = held_out(spec).build()  # reads the cache, does not harvest
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == stamp
    assert second.site_names == SITES and second.seed == 7919
    x, y = next(first), next(second)
    assert list(x.sites) == list(y.sites) == SITES and not torch.equal(x.tokens, y.tokens)
    via_cache = build_source({"type": "cache", "path": str(tmp_path / "cache"), "hookpoints": ["ft/**"]})
    assert via_cache.site_names == ["ft/transformer.h.0", "ft/transformer.h.1"]
    with pytest.raises(ConfigError, match=r"harvested from models .*'ft'.* not \{'base': 'x'\}"):
        build_source({"type": "cache", "path": str(tmp_path / "cache"), "hookpoint": "base/transformer.h.0",
                      "models": {"base": "x"}})  # fmt: skip


def test_cache_lacking_a_site_names_it_and_lists_what_it_holds(tmp_path, parts):
    write_cache(_harvester(parts, ["transformer.h.0"]), tmp_path / "c", max_tokens=50)
    with pytest.raises(
        ConfigError,
        match=r"no hookpoint 'ft/transformer\.h\.1' .*it holds \['base/transformer\.h\.0', 'ft/transformer\.h\.0'\]",
    ):
        CachedSource(tmp_path / "c", hookpoints=["base/transformer.h.0", "ft/transformer.h.1"])
    with pytest.raises(ConfigError, match=r"no hookpoint 'transformer\.h\.0:input'"):
        CachedSource(tmp_path / "c", hookpoints=["transformer.h.0:input"])
    with pytest.raises(ConfigError, match="hookpoints is empty"):
        CachedSource(tmp_path / "c", hookpoints=[])
    with pytest.raises(ConfigError, match="not both"):
        CachedSource(tmp_path / "c", "base/transformer.h.0", hookpoints=["ft/transformer.h.0"])
    both = CachedSource(tmp_path / "c", "transformer.h.0")  # one hookpoint, in every model
    assert both.site_names == ["base/transformer.h.0", "ft/transformer.h.0"]
    with pytest.raises(ConfigError, match=r"source \(cache\): 'hookpoints': .*the list is empty"):
        build_source({"type": "cache", "path": str(tmp_path / "c"), "hookpoints": []})
    with pytest.raises(ConfigError, match="different hookpoints"):  # continuing it with other sites is refused
        write_cache(_harvester(parts), tmp_path / "c")


def test_saelab_harvest_with_two_models(tmp_path, parts, capsys):
    from saelab.cli import main

    models, tok, texts = parts
    for alias, m in models.items():
        m.save_pretrained(tmp_path / alias)
        tok.save_pretrained(tmp_path / alias)
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
    args = ["harvest", "--hookpoint", "transformer.h.1", "--data", str(tmp_path / "corpus.txt"), "--context-size", "16"]
    assert main([*args, "--models", str(tmp_path / "base"), str(tmp_path / "ft"), "--out", str(tmp_path / "c")]) == 0
    manifest = read_manifest(tmp_path / "c")
    assert list(manifest["hookpoints"]) == ["base/transformer.h.1", "ft/transformer.h.1"]
    assert manifest["models"] == {"base": str(tmp_path / "base"), "ft": str(tmp_path / "ft")}
    b = next(CachedSource(tmp_path / "c", "transformer.h.1", batch_size=8))
    assert list(b.sites) == ["base/transformer.h.1", "ft/transformer.h.1"]
    pairs = [f"x={tmp_path / 'base'}", f"x={tmp_path / 'ft'}"]
    assert main([*args, "--models", *pairs, "--out", str(tmp_path / "d")]) == 2
    assert "models: duplicate alias 'x'" in capsys.readouterr().err
