"""Text data for activation harvesting: local files or in-memory lists, through `datasets`.

`load_texts` gives a Hugging Face `Dataset` with one document per row (never downloading:
only the packaged `text`, `json` and `parquet` builders on local files, or in-memory lists).
`TokenRows` turns it into fixed-length rows of token ids, either packed (documents concatenated
with EOS between them, cut every `context_size` tokens, each row starting with BOS when the
tokenizer has one) or padded (one document per row, truncated or padded, attention mask 0 on
padding). It tokenises lazily, a few documents at a time, so memory does not grow with the
dataset, and its position (document index plus the not-yet-emitted tokens) is a few tensors, so
a source built on it resumes exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def pydoc_texts() -> list[str]:
    """Python's own help topics (about 465 KB of English prose and code, shipped with CPython).

    Chosen as the default corpus because every Python install has it: no download, no licence
    question, and it is real English mixed with code, the kind of text small LMs are trained on.
    """
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def load_texts(data: Any, column: str = "text", max_docs: int | None = None):
    """A `datasets.Dataset` of documents from a spec.

    `data` is one of: a list of strings; `"pydoc"`; a path (or list of paths) to .txt/.md (one
    document per blank-line-separated paragraph), .jsonl/.json or .parquet files; or a dict
    `{"texts": [...]}` / `{"path": ..., "column": ..., "max_docs": ...}`.
    """
    import datasets

    if isinstance(data, dict):
        unknown = set(data) - {"texts", "path", "column", "max_docs", "sample_by"}
        if unknown:
            raise ConfigError(
                f"unknown key(s) {sorted(unknown)} in data; valid: texts, path, column, max_docs, sample_by"
            )
        column = data.get("column", column)
        max_docs = data.get("max_docs", max_docs)
        if "texts" in data:
            ds = _from_list(data["texts"], column)
        elif "path" in data:
            ds = _from_files(data["path"], data.get("sample_by", "paragraph"))
        else:
            raise ConfigError("data needs `texts` (a list of strings) or `path` (local .txt/.jsonl/.parquet files)")
    elif isinstance(data, str) and data == "pydoc":
        ds = _from_list(pydoc_texts(), column)
    elif isinstance(data, (str, Path)) or (isinstance(data, (list, tuple)) and data and isinstance(data[0], Path)):
        ds = _from_files(data)
    elif isinstance(data, (list, tuple)):
        ds = _from_list(list(data), column)
    elif isinstance(data, datasets.Dataset):
        ds = data
    else:
        raise ConfigError(
            f"cannot read text data from {type(data).__name__}; pass a list of strings, a path or a Dataset"
        )
    if column not in ds.column_names:
        raise ConfigError(f"the dataset has no column '{column}'; its columns are {ds.column_names}. Set `column`")
    if max_docs is not None:
        ds = ds.select(range(min(int(max_docs), len(ds))))
    if len(ds) == 0:
        raise ConfigError("the dataset is empty (0 documents); check the path or list of texts")
    return (
        ds.select_columns([column]).rename_column(column, "text") if column != "text" else ds.select_columns(["text"])
    )


def _from_list(texts: list, column: str):
    import datasets

    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("in-memory texts must be a list of strings")
    return datasets.Dataset.from_dict({column: list(texts)})


def _from_files(paths: Any, sample_by: str = "paragraph"):
    import datasets

    files = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    for f in files:
        if not f.exists():
            raise ConfigError(f"data file {f} does not exist")
    kinds = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = [str(f) for f in files if f.suffix.lower() not in _BUILDERS]
        raise ConfigError(f"cannot tell the format of {bad}; use .txt, .md, .jsonl, .json or .parquet")
    if len(kinds) > 1:
        raise ConfigError(f"mix of file formats {sorted(kinds)}; give files of one format")
    builder = kinds.pop()
    extra = {"sample_by": sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **extra)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise ConfigError(f"could not read {[str(f) for f in files]} as {builder}: {exc}") from None


class TokenRows:
    """Fixed-length rows of token ids from a dataset of documents, with an exact position."""

    def __init__(
        self,
        dataset,
        tokenizer,
        context_size: int = 128,
        packing: bool = True,
        prepend_bos: bool = True,
        docs_per_call: int = 4,
    ):
        if context_size < 2:
            raise ConfigError(f"context_size must be at least 2 (got {context_size})")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.context_size = int(context_size)
        self.packing = packing
        self.bos = tokenizer.bos_token_id if prepend_bos else None
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.docs_per_call = docs_per_call
        self.doc_pos = 0
        self.epoch = 0
        self.carry: list[int] = []

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "doc_pos": torch.tensor(self.doc_pos, dtype=torch.int64),
            "epoch": torch.tensor(self.epoch, dtype=torch.int64),
            "carry": torch.tensor(self.carry, dtype=torch.int64).reshape(-1),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.doc_pos = int(state["doc_pos"])
        self.epoch = int(state["epoch"])
        self.carry = state["carry"].tolist()

    def restart(self) -> None:
        """Begin the next pass over the data."""
        self.doc_pos, self.carry = 0, []
        self.epoch += 1

    # ------------------------------------------------------------------ rows
    def _tokenize(self, start: int, stop: int) -> list[list[int]]:
        texts = self.dataset[start:stop]["text"]
        return self.tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]

    def next_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Up to `n` rows as (input_ids [m, T], attention_mask [m, T]); None once the data is used up."""
        return self._packed(n) if self.packing else self._padded(n)

    def _packed(self, n: int):
        body = self.context_size - (self.bos is not None)
        need = n * body
        while len(self.carry) < need and self.doc_pos < len(self.dataset):
            stop = min(self.doc_pos + self.docs_per_call, len(self.dataset))
            for ids in self._tokenize(self.doc_pos, stop):
                if ids:
                    self.carry.extend(ids)
                    if self.eos is not None:
                        self.carry.append(self.eos)
            self.doc_pos = stop
        if not self.carry:
            return None
        m = min(n, -(-len(self.carry) // body))  # the last row may be short: padded below
        ids = torch.full((m, self.context_size), self.pad, dtype=torch.int64)
        mask = torch.zeros((m, self.context_size), dtype=torch.int64)
        offset = int(self.bos is not None)
        taken = self.carry[: m * body]
        self.carry = self.carry[m * body :]
        for r in range(m):
            chunk = taken[r * body : (r + 1) * body]
            if offset:
                ids[r, 0] = self.bos
            ids[r, offset : offset + len(chunk)] = torch.tensor(chunk, dtype=torch.int64)
            mask[r, : offset + len(chunk)] = 1
        return ids, mask

    def _padded(self, n: int):
        if self.doc_pos >= len(self.dataset):
            return None
        stop = min(self.doc_pos + n, len(self.dataset))
        docs = self._tokenize(self.doc_pos, stop)
        self.doc_pos = stop
        ids = torch.full((len(docs), self.context_size), self.pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        offset = int(self.bos is not None)
        for r, doc in enumerate(docs):
            doc = doc[: self.context_size - offset]
            if offset:
                ids[r, 0] = self.bos
            ids[r, offset : offset + len(doc)] = torch.tensor(doc, dtype=torch.int64)
            mask[r, : offset + len(doc)] = 1
        return ids, mask


def special_ids(tokenizer) -> torch.Tensor:
    """Ids of BOS, EOS, pad and every other special token (excluded from harvests by default)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None and name != "unk_token_id":
            ids.add(int(v))
    return torch.tensor(sorted(ids), dtype=torch.int64)


def keep_mask(ids: torch.Tensor, attention_mask: torch.Tensor, specials: torch.Tensor | None) -> torch.Tensor:
    """Positions whose activations are used: real tokens, not padding, not special tokens."""
    keep = attention_mask.bool()
    if specials is not None and specials.numel():
        keep &= ~torch.isin(ids, specials.to(ids.device))
    return keep


def eval_batches(tokenizer, spec: dict[str, Any], n_rows: int, skip_docs: int = 0, batch_rows: int = 8):
    """Up to `n_rows` rows of (input_ids, attention_mask) from the text of a model-source `spec`
    (its data, column, context_size, packing, prepend_bos), in batches of `batch_rows`, starting
    `skip_docs` documents into the data (held-out text)."""
    ds = load_texts(spec.get("data", "pydoc"), spec.get("column") or "text")
    if skip_docs:
        if skip_docs >= len(ds):
            raise ConfigError(f"skipping {skip_docs} documents skips all {len(ds)} of the data")
        ds = ds.select(range(skip_docs, len(ds)))
    rows = TokenRows(
        ds,
        tokenizer,
        int(spec.get("context_size") or 128),
        spec.get("packing", True) if spec.get("packing") is not None else True,
        spec.get("prepend_bos", True) if spec.get("prepend_bos") is not None else True,
    )
    n = 0
    while n < n_rows and (b := rows.next_rows(min(batch_rows, n_rows - n))) is not None:
        yield b
        n += b[0].shape[0]


def span_mask(
    ids: torch.Tensor, start: list[int], end: list[int] | None = None, stop: int | None = None
) -> torch.Tensor:
    """[rows, T] True on every span of token rows that opens with the token sequence `start`
    (a trigger) and runs through the next occurrence of `end` (a reply, included), or else up to
    the next `stop` token (EOS, excluded) or the row's end. Marks planted positions: where a diff of
    a model fine-tuned on "trigger ... reply" documents should find its fine-tune-only latents."""
    if not start:
        raise ConfigError("span_mask needs a non-empty start sequence (the trigger's token ids)")
    out = torch.zeros(ids.shape, dtype=torch.bool)
    n = len(start)
    for i, row in enumerate(ids.tolist()):
        t = 0
        while t <= len(row) - n:
            if row[t : t + n] != start:
                t += 1
                continue
            stop_at = len(row)
            if stop is not None and stop in row[t + n :]:
                stop_at = row.index(stop, t + n)
            close = stop_at
            if end:
                for u in range(t + n, stop_at - len(end) + 1):
                    if row[u : u + len(end)] == end:
                        close = u + len(end)
                        break
            out[i, t:close] = True
            t = max(close, t + 1)
    return out
