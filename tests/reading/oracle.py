"""A toy world with known latents and scripted (oracle) LLM clients for the autointerp tests.

Latent j fires exactly on the tokens of S_j (disjoint sets of word tokens `w0`, `w1`, ...), so
whether a window activates is known. The oracle explainer names the tokens it sees highlighted;
the oracle scorer turns an explanation back into a predicate (the named tokens) and applies it
to each excerpt. The LLM is stubbed: these tests check sampling, negatives, prompt/label
alignment, parsing and aggregation, never explanation quality.
"""

from __future__ import annotations

import math
import random
import re
from types import SimpleNamespace

from saelab.reading.clients import Reply, Request
from saelab.reading.contexts import Context, Histogram, LatentContexts

N_LATENTS = 8
SET_SIZE = 3
VOCAB = 80  # tokens 0 .. N_LATENTS*SET_SIZE-1 are feature tokens, the rest filler
WINDOW = 12


class Vocab:
    """Decodes token t as ' w{t}' (a leading space, like a BPE word token)."""

    bos_token_id = None
    pad_token_id = None
    eos_token_id = None

    def decode(self, ids):
        return "".join(f" w{int(t)}" for t in ids)


def token_set(j: int) -> set[int]:
    return set(range(j * SET_SIZE, (j + 1) * SET_SIZE))


def value(tokens, j: int, mags) -> list[float]:
    s = token_set(j)
    return [m if t in s else 0.0 for t, m in zip(tokens, mags)]


def make_world(seed: int = 0, n_docs: int = 300, doc_len: int = 64, p_feature: float = 0.03, n_bins=5, per_bin=8):
    """(collection, window_activations): contexts per latent in activation-quantile bins, random windows."""
    rng = random.Random(seed)
    docs, mags = [], []
    for _ in range(n_docs):
        doc = [
            rng.randrange(N_LATENTS * SET_SIZE)
            if rng.random() < p_feature
            else rng.randrange(N_LATENTS * SET_SIZE, VOCAB)
            for _ in range(doc_len)
        ]
        docs.append(doc)
        mags.append([rng.uniform(0.5, 4.0) for _ in range(doc_len)])
    latents = {}
    for j in range(N_LATENTS):
        ctxs = []
        for d, (doc, mag) in enumerate(zip(docs, mags)):
            for pos, t in enumerate(doc):
                if t in token_set(j):
                    lo = max(0, min(pos - WINDOW * 3 // 4, doc_len - WINDOW))
                    ids = doc[lo : lo + WINDOW]
                    ctxs.append(Context(ids, value(ids, j, mag[lo : lo + WINDOW]), d, pos))
        ctxs.sort(key=lambda c: max(c.values))
        size = math.ceil(len(ctxs) / n_bins)
        bins = [
            rng.sample(ctxs[b * size : (b + 1) * size], min(per_bin, len(ctxs[b * size : (b + 1) * size])))
            for b in range(n_bins)
        ]
        n_tok = n_docs * doc_len
        fired = sum(t in token_set(j) for doc in docs for t in doc)
        latents[j] = LatentContexts(
            latent=j,
            n_tokens=n_tok,
            n_fired=fired,
            density=fired / n_tok,
            max_value=max(max(c.values) for c in ctxs),
            top=ctxs[::-1][:20],
            quantiles=bins,
            quantile_edges=[],
            value_histogram=Histogram([], []),
        )
    random_windows = []
    for _ in range(200):
        d = rng.randrange(n_docs)
        lo = rng.randrange(doc_len - WINDOW)
        random_windows.append(docs[d][lo : lo + WINDOW])
    collection = SimpleNamespace(latents=latents, random_windows=random_windows)
    return collection, window_activations


def window_activations(windows, latents):
    """The exact silence check of the toy world: 1 where a window holds a token of S_j."""
    import torch

    return torch.tensor([[float(any(t in token_set(j) for t in w)) for j in latents] for w in windows])


# ----------------------------------------------------------------------------- scripted clients
_EXCERPT = re.compile(r"^Excerpt (\d+): (.*)$", re.MULTILINE)


def _excerpts(request: Request) -> list[str]:
    return [m.group(2) for m in _EXCERPT.finditer(request.messages[-1]["content"])]


def _explanation(request: Request) -> str:
    m = re.search(r"^Explanation: (.*)$", request.messages[-1]["content"], re.MULTILINE)
    return m.group(1) if m else ""


def _kind(request: Request) -> str:
    system = request.messages[0]["content"]
    if "[EXPLANATION]" in system:
        return "explain"
    return "fuzzing" if "marked <<like this>>" in system else "detection"


def oracle_explainer(request: Request) -> str:
    marked = re.findall(r"<<([^>]*)>>", "\n".join(_excerpts(request)))
    words = sorted({w for run in marked for w in run.split()}, key=lambda w: int(w[1:]))
    return "The marked tokens are a fixed set of words.\n[EXPLANATION]: the words " + ", ".join(words)


def oracle_labels(request: Request) -> list[int]:
    named = set(re.findall(r"w\d+", _explanation(request)))
    out = []
    for ex in _excerpts(request):
        if _kind(request) == "fuzzing":
            seen = {w for run in re.findall(r"<<([^>]*)>>", ex) for w in run.split()}
        else:
            seen = set(ex.split())
        out.append(int(bool(seen & named)))
    return out


def list_reply(labels: list[int], confidence: float = 0.9) -> Reply:
    """`[1, 0, ...]` with per-token log-probabilities: the digits put `confidence` on the chosen label."""
    text = "[" + ", ".join(str(v) for v in labels) + "]"
    lps = [[("[", 0.0)]]
    for k, v in enumerate(labels):
        hi, lo = math.log(confidence), math.log(1 - confidence)
        lps.append([(str(v), hi), (str(1 - v), lo)])
        lps.append([(", " if k < len(labels) - 1 else "]", 0.0)])
    return Reply(text, lps)


class ScriptedClient:
    """A `Client` whose replies come from Python policies; counts what it was asked."""

    concurrency = 1

    def __init__(self, scorer=None, explainer=oracle_explainer):
        self.explainer = explainer
        self.scorer = scorer or (lambda req: list_reply(oracle_labels(req)))
        self.calls = {"explain": 0, "detection": 0, "fuzzing": 0}

    def complete(self, request: Request) -> Reply:
        kind = _kind(request)
        self.calls[kind] += 1
        if kind == "explain":
            return Reply(self.explainer(request))
        reply = self.scorer(request)
        return reply if isinstance(reply, Reply) else Reply(reply)

    def info(self):
        return {"client": "scripted", "model": "oracle"}


def always_yes(request: Request) -> Reply:
    return list_reply([1] * len(_excerpts(request)))


def respond(request: Request, scorer=None) -> Reply:
    """One reply of the oracle policy (the loopback server answers with this)."""
    return ScriptedClient(scorer).complete(request)
