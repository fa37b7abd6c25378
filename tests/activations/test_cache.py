import json

import pytest
import torch

from saelab.activations.cache import CachedSource, read_manifest, write_cache
from saelab.activations.factory import build_source
from saelab.errors import ConfigError, FileFormatError
from saelab.models import Harvester
from tests.models import tiny


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return tiny.make_gpt2(), tiny.make_tokenizer(), tiny.make_texts(30)


def _harvester(parts, hookpoints=("transformer.h.0", "transformer.h.1")):
    model, tok, texts = parts
    return Harvester(model, tok, texts, list(hookpoints), context_size=16, model_batch_size=4, model_name="tiny-gpt2")


def _all(src):
    batches = list(src)
    return torch.cat([b.x for b in batches]), torch.cat([b.tokens for b in batches])


def test_round_trip_in_order_and_manifest(tmp_path, parts):
    manifest = write_cache(_harvester(parts), tmp_path / "c", shard_tokens=100)
    assert manifest["complete"] and len(manifest["shards"]) > 2
    on_disk = read_manifest(tmp_path / "c")
    assert on_disk["model"] == "tiny-gpt2" and on_disk["hookpoints"] == {"transformer.h.0": 64, "transformer.h.1": 64}
    assert on_disk["dtype"] == "float32" and on_disk["total_tokens"] == sum(s["tokens"] for s in on_disk["shards"])
    assert all(len(s["sha256"]) == 64 for s in on_disk["shards"])
    # the reference: the same harvest straight from the hooks, in order
    h = _harvester(parts)
    ref = []
    while (rows := h.rows.next_rows(4)) is not None:
        ref.append(h.harvest_rows(*rows))
    ref_x = torch.cat([r["transformer.h.1"] for r in ref])
    ref_t = torch.cat([r["tokens"] for r in ref])
    src = CachedSource(tmp_path / "c", "transformer.h.1", batch_size=1, shuffle=False)
    x, t = _all(src)
    assert torch.equal(x, ref_x) and torch.equal(t, ref_t)
    # shuffled reading gives the same rows in another order
    xs, ts = _all(CachedSource(tmp_path / "c", "transformer.h.1", batch_size=1, seed=3))
    assert not torch.equal(ts, ref_t) and torch.equal(ts.sort().values, ref_t.sort().values)


def test_interrupted_write_resumes_to_the_same_cache(tmp_path, parts):
    write_cache(_harvester(parts), tmp_path / "one", shard_tokens=100)
    partial = write_cache(_harvester(parts), tmp_path / "two", max_tokens=150, shard_tokens=100)
    assert not partial["complete"] and partial["total_tokens"] >= 150
    write_cache(_harvester(parts), tmp_path / "two", shard_tokens=100)
    a, b = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert a["total_tokens"] == b["total_tokens"]
    xa, ta = _all(CachedSource(tmp_path / "one", "transformer.h.0", batch_size=1, shuffle=False))
    xb, tb = _all(CachedSource(tmp_path / "two", "transformer.h.0", batch_size=1, shuffle=False))
    assert torch.equal(xa, xb) and torch.equal(ta, tb)


def test_reader_resumes_exactly(tmp_path, parts):
    write_cache(_harvester(parts), tmp_path / "c", shard_tokens=100)
    src = CachedSource(tmp_path / "c", "transformer.h.0", batch_size=16, repeat=True, seed=1)
    for _ in range(7):
        next(src)
    state = src.state_dict()
    ref = [next(src).x for _ in range(20)]
    other = CachedSource(tmp_path / "c", "transformer.h.0", batch_size=16, repeat=True, seed=1)
    other.load_state_dict(state)
    assert all(torch.equal(a, next(other).x) for a in ref)


def test_truncated_and_corrupt_shards_are_named(tmp_path, parts):
    write_cache(_harvester(parts), tmp_path / "c", shard_tokens=100)
    shard = tmp_path / "c" / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(FileFormatError, match=r"shard_00001\.safetensors is truncated"):
        list(CachedSource(tmp_path / "c", "transformer.h.0", batch_size=8, shuffle=False))
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match=r"shard_00001\.safetensors is corrupt"):
        list(CachedSource(tmp_path / "c", "transformer.h.0", batch_size=8, shuffle=False))


def test_cache_from_another_model_or_hookpoint(tmp_path, parts):
    write_cache(_harvester(parts, ["transformer.h.0"]), tmp_path / "c", max_tokens=50)
    with pytest.raises(ConfigError, match="harvested from model 'tiny-gpt2', not 'other'"):
        CachedSource(tmp_path / "c", "transformer.h.0", model="other")
    with pytest.raises(ConfigError, match=r"no hookpoint 'transformer\.h\.1'.*transformer\.h\.0"):
        CachedSource(tmp_path / "c", "transformer.h.1")
    with pytest.raises(ConfigError, match="different hookpoints"):
        write_cache(_harvester(parts, ["transformer.h.1"]), tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text("{")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        CachedSource(tmp_path / "c")


def test_model_source_with_cache_dir_harvests_once(tmp_path, parts):
    model, tok, texts = parts
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    spec = {
        "type": "model",
        "model": str(tmp_path / "m"),
        "hookpoint": "transformer.h.1",
        "data": {"texts": texts},
        "context_size": 16,
        "batch_size": 32,
        "cache_dir": str(tmp_path / "cache"),
        "repeat": True,
    }
    first = build_source(spec)
    stamp = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    second = build_source({**spec, "seed": 5})  # e.g. the held-out evaluation: reads, does not harvest
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == stamp
    assert first.d_in == second.d_in == 64 and next(first).x.shape == (32, 64)
    via_cache = build_source({"type": "cache", "path": str(tmp_path / "cache"), "batch_size": 8})
    assert via_cache.hookpoint == "transformer.h.1"
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"]
