import json

import pytest

from saelab.errors import ConfigError
from saelab.models.text import TokenRows, load_texts, pydoc_texts


def test_local_files_and_lists(tmp_path, texts):
    (tmp_path / "a.txt").write_text("\n\n".join(texts[:5]))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:4]))
    import datasets

    datasets.Dataset.from_dict({"text": texts[:3]}).to_parquet(str(tmp_path / "a.parquet"))
    assert load_texts(str(tmp_path / "a.txt"))["text"] == texts[:5]
    assert load_texts({"path": str(tmp_path / "a.jsonl"), "column": "body"})["text"] == texts[:4]
    assert load_texts(str(tmp_path / "a.parquet"))["text"] == texts[:3]
    assert load_texts(texts, max_docs=2)["text"] == texts[:2]
    assert len(pydoc_texts()) > 50


def test_bad_data_is_named(tmp_path, texts):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"no column 'text'.*\['body'\]"):
        load_texts(str(tmp_path / "a.jsonl"))
    with pytest.raises(ConfigError, match="empty"):
        load_texts([])
    with pytest.raises(ConfigError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))


def test_packed_rows_concatenate_documents(tokenizer, texts):
    rows = TokenRows(load_texts(texts), tokenizer, context_size=16)
    got = []
    while (batch := rows.next_rows(5)) is not None:
        ids, mask = batch
        assert (ids[:, 0] == tokenizer.bos_token_id).all()
        for r, m in zip(ids, mask):
            got.extend(r[m.bool()][1:].tolist())
    expected = sum((tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts), [])
    assert got == expected


def test_padded_rows_and_exact_position(tokenizer, texts):
    rows = TokenRows(load_texts(texts), tokenizer, context_size=12, packing=False)
    ids, mask = rows.next_rows(4)
    assert ids.shape == (4, 12)
    n0 = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    assert mask[0].sum() == min(n0 + 1, 12) and (ids[0][~mask[0].bool()] == tokenizer.pad_token_id).all()
    packed = TokenRows(load_texts(texts), tokenizer, context_size=12)
    packed.next_rows(3)
    state = packed.state_dict()
    ref = packed.next_rows(3)
    other = TokenRows(load_texts(texts), tokenizer, context_size=12)
    other.load_state_dict(state)
    again = other.next_rows(3)
    assert all((a == b).all() for a, b in zip(ref, again))


def test_span_mask_marks_trigger_through_reply():
    import torch

    from saelab.models.text import span_mask

    eos = 2
    # row 0: 5 6 (trigger) ... 8 9 (reply) then more text and a second span cut by EOS; row 1: no trigger;
    # row 2: a trigger whose span runs to the row's end
    ids = torch.tensor(
        [
            [1, 5, 6, 3, 4, 8, 9, 3, 5, 6, 4, eos, 3, 3],
            [1, 3, 5, 3, 6, 8, 9, 3, 4, 3, eos, 0, 0, 0],
            [1, 3, 3, 5, 6, 3, 8, 3, 4, 3, 4, 3, 4, 3],
        ]
    )
    got = span_mask(ids, [5, 6], [8, 9], stop=eos)
    want = torch.zeros_like(got)
    want[0, 1:7] = True  # trigger .. reply, reply included
    want[0, 8:11] = True  # a second trigger: up to the EOS, excluded
    want[2, 3:] = True  # no reply, no EOS: to the end
    assert torch.equal(got, want)
    # without an end sequence: trigger to EOS (the tiny pair's planted positions)
    assert span_mask(ids[:1], [5, 6], stop=eos)[0].nonzero().flatten().tolist() == list(range(1, 11))
    with pytest.raises(ConfigError):
        span_mask(ids, [])
