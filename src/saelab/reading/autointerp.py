"""Autointerp: an LLM explains each latent from its contexts, then the explanation is scored.

The recipe follows Paulo et al. (arXiv 2410.13928, EleutherAI's delphi):

- **Explain.** Activating contexts are sampled across the latent's activation quantiles (not
  only the top ones, which overstate how specific a latent is). Tokens above
  `highlight_threshold` x the context's maximum are wrapped in `<<...>>`; the reply is read
  from its `[EXPLANATION]:` line.
- **Score by detection.** Held-out activating contexts (a disjoint sample of the same
  quantiles) are mixed with non-activating ones; the scorer sees `per_prompt` plain excerpts and
  answers with a list such as `[1, 0, 0, 1, 0]`: does the explanation say the latent fires here?
- **Score by fuzzing.** The same activating contexts with their true tokens highlighted, against
  non-activating ones with as many tokens highlighted at random: are the marked tokens what
  the explanation describes?
- **Non-activating contexts** are random windows of the text and hard negatives: top contexts of
  the latents nearest by decoder cosine. A candidate counts only if the latent is *silent* on
  it, checked exactly by running the model and SAE on the window as the scorer sees it.

Metrics per latent and scorer: balanced accuracy over parsed replies, a strict balanced
accuracy that counts every unparseable reply as wrong, the failure rate, and AUROC from
P("1") / (P("0") + P("1")) at each list element when the client returns log-probabilities.
A baseline scores each latent with another latent's explanation (a derangement) on the same
examples, so a score can be read against what an unrelated explanation gets.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.reading.clients import Client, Reply, Request, complete_all, probability_of_one

SCORERS = ("detection", "fuzzing")


@dataclass
class AutointerpConfig:
    """Everything that shapes a score besides the client; stored with the results."""

    n_explain: int = 20
    """Activating contexts shown to the explainer, sampled evenly across activation quantiles."""
    n_test: int = 20
    """Held-out activating contexts per scorer (disjoint from the explainer's)."""
    n_random: int = 10
    """Random non-activating windows per latent."""
    n_hard: int = 10
    """Hard negatives per latent: top contexts of the decoder-nearest latents where this one is silent."""
    n_neighbours: int = 10
    """Nearest latents by decoder cosine whose contexts are hard-negative candidates."""
    per_prompt: int = 5
    """Excerpts per scoring prompt."""
    highlight_threshold: float = 0.3
    """A token is highlighted when its activation exceeds this fraction of the context's maximum."""
    explain_temperature: float = 0.0
    score_temperature: float = 0.0
    explain_max_tokens: int = 80
    score_max_tokens: int = 40
    prefill: bool = False
    """Begin replies for the model ('[EXPLANATION]:' and '['), where the client can (the local one)."""
    scorers: tuple[str, ...] = SCORERS
    baseline: bool = True
    """Also score every latent with another latent's explanation (a seeded derangement)."""
    seed: int = 0

    def __post_init__(self):
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise ConfigError(f"unknown scorer(s) {bad}; choose from {list(SCORERS)}")
        for name in ("n_explain", "n_test", "per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.n_random < 0 or self.n_hard < 0 or self.n_random + self.n_hard < 1:
            raise ConfigError("n_random + n_hard must be at least 1 (scoring needs non-activating contexts)")
        if not 0.0 <= self.highlight_threshold < 1.0:
            raise ConfigError(f"highlight_threshold must be in [0, 1) (got {self.highlight_threshold})")


# ----------------------------------------------------------------------------- prompts
EXPLAIN_SYSTEM = (
    "You are a careful interpretability researcher studying one feature of a language model. "
    "You are shown text excerpts in which the feature is active; the tokens where it is most active "
    "are marked <<like this>>. Work out what the marked tokens have in common (a word or its "
    "spelling, a kind of word, a topic, a piece of syntax or code) and describe it in a short "
    "phrase. End your reply with one line of the form\n[EXPLANATION]: <short phrase>"
)
DETECTION_SYSTEM = (
    "You are given an explanation of a feature of a language model and {n} numbered text excerpts. "
    "For each excerpt decide whether the feature is active on some token of it, going by the "
    "explanation: 1 if it is, 0 if it is not. Reply with a list of exactly {n} numbers and nothing "
    "else, for example [1, 0, 0, 1, 0]."
)
FUZZING_SYSTEM = (
    "You are given an explanation of a feature of a language model and {n} numbered text excerpts "
    "with some tokens marked <<like this>>. For each excerpt decide whether the marked tokens are "
    "ones the explanation describes (the feature is active on them): 1 if they are, 0 if they are "
    "not. Reply with a list of exactly {n} numbers and nothing else, for example [1, 0, 0, 1, 0]."
)


def prompts_used() -> dict[str, str]:
    return {"explain_system": EXPLAIN_SYSTEM, "detection_system": DETECTION_SYSTEM, "fuzzing_system": FUZZING_SYSTEM}


def highlight(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """Join token strings, wrapping each run of marked tokens in one `<<...>>` (leading spaces kept outside)."""
    out, i = [], 0
    while i < len(tokens):
        if not marked[i]:
            out.append(tokens[i])
            i += 1
            continue
        j = i
        while j < len(tokens) and marked[j]:
            j += 1
        run = "".join(tokens[i:j])
        stripped = run.lstrip()
        out.append(run[: len(run) - len(stripped)] + "<<" + stripped + ">>" if stripped else run)
        i = j
    return "".join(out).replace("\n", "\\n")


def marks_from_values(values: Sequence[float], threshold: float) -> list[bool]:
    peak = max(values, default=0.0)
    if peak <= 0:
        return [False] * len(values)
    return [v > threshold * peak for v in values]


def explain_messages(examples: Sequence[str], marked_tokens: Counter) -> list[dict[str, str]]:
    lines = [f"Excerpt {i + 1}: {ex}" for i, ex in enumerate(examples)]
    common = ", ".join(f"{tok!r} ({n})" for tok, n in marked_tokens.most_common(10))
    user = "\n".join(lines) + f"\n\nMost often marked tokens: {common}\n\nWhat do the marked tokens have in common?"
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def score_messages(kind: str, explanation: str, excerpts: Sequence[str]) -> list[dict[str, str]]:
    system = (DETECTION_SYSTEM if kind == "detection" else FUZZING_SYSTEM).format(n=len(excerpts))
    body = "\n".join(f"Excerpt {i + 1}: {ex}" for i, ex in enumerate(excerpts))
    user = f"Explanation: {explanation}\n\n{body}\n\nAnswer with a list of {len(excerpts)} numbers."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------- parsing
_EXPLANATION = re.compile(r"\[?EXPLANATION\]?\s*:\s*(.+)", re.IGNORECASE)
_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_explanation(text: str) -> str | None:
    """The phrase after the last `[EXPLANATION]:`; None when there is none or it is empty."""
    hits = _EXPLANATION.findall(text or "")
    if not hits:
        return None
    phrase = hits[-1].strip()
    if len(phrase) >= 2 and phrase[0] == phrase[-1] and phrase[0] in "\"'":
        phrase = phrase[1:-1].strip()
    return phrase[:300] or None


def parse_labels(text: str, n: int) -> list[int] | None:
    """The last bracketed list of exactly `n` zeros and ones in `text`; None when there is none."""
    for body in reversed(_LIST.findall(text or "")):
        items = [s.strip() for s in body.split(",")]
        if len(items) == n and all(s in ("0", "1") for s in items):
            return [int(s) for s in items]
    return None


def label_probabilities(reply: Reply, n: int) -> list[float] | None:
    """P(1) per list element, read from the log-probabilities of the reply's '0'/'1' tokens.

    Only when the reply has exactly `n` tokens that are '0' or '1' (one per element, in order);
    otherwise the probabilities cannot be aligned with the elements and None is returned.
    """
    if not reply.logprobs:
        return None
    probs = []
    for alts in reply.logprobs:
        chosen = alts and max(alts, key=lambda a: a[1])[0]  # the greedy token leads its alternatives
        if chosen and chosen.strip() in ("0", "1"):
            p = probability_of_one(alts)
            if p is None:
                return None
            probs.append(p)
    return probs if len(probs) == n else None


# ----------------------------------------------------------------------------- metrics
def binary_scores(truth: Sequence[int], pred: Sequence[int | None], prob: Sequence[float | None]) -> dict[str, Any]:
    """Balanced accuracy over parsed predictions, strict balanced accuracy (unparsed = wrong),
    failure rate and AUROC over the examples that have a probability."""
    n = len(truth)
    failed = sum(p is None for p in pred)
    parsed = [(t, p) for t, p in zip(truth, pred) if p is not None]
    strict = [(t, p if p is not None else 1 - t) for t, p in zip(truth, pred)]
    with_prob = [(t, q) for t, q in zip(truth, prob) if q is not None]
    return {
        "n": n,
        "n_positive": int(sum(truth)),
        "failures": failed,
        "failure_rate": failed / n if n else float("nan"),
        "balanced_accuracy": _balanced_accuracy(parsed),
        "strict_balanced_accuracy": _balanced_accuracy(strict),
        "recall": _rate(parsed, 1),
        "true_negative_rate": _rate(parsed, 0),
        "auroc": _auroc(with_prob),
        "n_with_probability": len(with_prob),
    }


def _rate(pairs, cls: int) -> float | None:
    sel = [p for t, p in pairs if t == cls]
    return sum(p == cls for p in sel) / len(sel) if sel else None


def _balanced_accuracy(pairs) -> float | None:
    tpr, tnr = _rate(pairs, 1), _rate(pairs, 0)
    return None if tpr is None or tnr is None else (tpr + tnr) / 2


def _auroc(pairs) -> float | None:
    """Mann-Whitney AUROC (ties count half); None unless both classes are present."""
    pos = [q for t, q in pairs if t == 1]
    neg = [q for t, q in pairs if t == 0]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- exact silence
class WindowActivations:
    """Max activation of chosen latents over each token window, run through the model and SAE.

    A window is run on its own (with BOS first when the tokenizer has one, as training rows
    start), which is exactly what a scorer sees; special tokens are not counted.
    """

    def __init__(self, sae, model, hookpoint: str, tokenizer, batch_size: int = 16):
        from saelab.models import hooks
        from saelab.models.text import special_ids

        self.sae, self.model = sae, model
        self.hp = hooks.resolve(model, hookpoint)[0]
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.specials = special_ids(tokenizer)
        self.batch_size = batch_size

    def _row(self, window: Sequence[int]) -> list[int]:
        w = list(window)
        return w if self.bos is None or (w and w[0] == self.bos) else [self.bos, *w]

    @torch.no_grad()
    def __call__(self, windows: Sequence[Sequence[int]], latents: Sequence[int]) -> torch.Tensor:
        from saelab.models import hooks
        from saelab.models.text import keep_mask

        device = next(self.model.parameters()).device
        idx = torch.as_tensor(list(latents), dtype=torch.int64)
        out = torch.zeros(len(windows), len(idx))
        for start in range(0, len(windows), self.batch_size):
            chunk = [self._row(w) for w in windows[start : start + self.batch_size]]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for r, w in enumerate(chunk):
                ids[r, : len(w)] = torch.tensor(w, dtype=torch.int64)
                mask[r, : len(w)] = 1
            acts = hooks.run(self.model, ids.to(device), [self.hp], mask.to(device))[self.hp.name]
            keep = keep_mask(ids, mask, self.specials)
            f = self.sae.encode(acts.float().reshape(-1, acts.shape[-1]))[:, idx.to(acts.device)].cpu()
            f = f.reshape(len(chunk), width, len(idx)).masked_fill(~keep[..., None], 0.0)
            out[start : start + len(chunk)] = f.amax(1)
        return out


def decoder_neighbours(sae, latents: Sequence[int], n: int) -> dict[int, list[int]]:
    """The `n` latents with the most similar decoder direction (cosine), nearest first."""
    w = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    out = {}
    for i in latents:
        cos = w @ w[i]
        cos[i] = -float("inf")
        out[int(i)] = cos.topk(min(n, w.shape[0] - 1)).indices.tolist()
    return out


# ----------------------------------------------------------------------------- sampling
@dataclass
class Example:
    token_ids: list[int]
    marked: list[bool]
    activating: bool
    source: str  # "quantile" | "random" | "hard"


def _key(ctx) -> tuple:
    return tuple(ctx.token_ids)


def split_activating(lc, n_explain: int, n_test: int, rng: random.Random):
    """(explain, test) contexts: each quantile bin is shuffled and halved, then both sides are
    drawn round-robin over bins, so both span the activation range and never share a context."""
    bins = [list(b) for b in (lc.quantiles or []) if b] or [list(lc.top)]
    seen: set = set()
    halves: list[tuple[list, list]] = []
    for b in bins:
        b = [c for c in b if _key(c) not in seen and not seen.add(_key(c))]
        rng.shuffle(b)
        halves.append((b[: (len(b) + 1) // 2], b[(len(b) + 1) // 2 :]))
    return _round_robin([h[0] for h in halves], n_explain), _round_robin([h[1] for h in halves], n_test)


def _round_robin(groups: list[list], n: int) -> list:
    out, i = [], 0
    while len(out) < n and any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out[:n]


# ----------------------------------------------------------------------------- the run
def run_autointerp(
    collection,
    client: Client,
    tokenizer,
    *,
    latents: Sequence[int] | None = None,
    window_activations: Callable[[Sequence[Sequence[int]], Sequence[int]], torch.Tensor],
    neighbours: dict[int, list[int]] | None = None,
    config: AutointerpConfig | None = None,
    explanations: dict[int, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain (unless `explanations` are given) and score `latents` of a context collection.

    `window_activations(windows, latents) -> [n_windows, n_latents]` gives each latent's maximum
    activation on each window run alone (`WindowActivations` for a real model); a negative is
    used only where it is 0. `neighbours` maps a latent to latents whose top contexts are
    hard-negative candidates (`decoder_neighbours`). Returns a JSON-ready dict.
    """
    from saelab.progress import bar as progress_bar

    cfg = config or AutointerpConfig()
    latents = [int(i) for i in (latents if latents is not None else sorted(collection.latents))]
    missing = [i for i in latents if i not in collection.latents]
    if missing:
        raise ConfigError(f"latent(s) {missing[:10]} have no contexts in the collection; collect them first")
    rng = random.Random(cfg.seed)
    decode = _decoder(tokenizer, collection)
    t0 = time.perf_counter()

    # activating examples (explain / test split) for every latent
    plan: dict[int, dict[str, Any]] = {}
    for i in latents:
        lc = collection.latents[i]
        explain, test = split_activating(lc, cfg.n_explain, cfg.n_test, random.Random(rng.random()))
        plan[i] = {"explain": explain, "test": test}

    # non-activating contexts: candidates checked exactly, lazily, each window once for all latents
    random_windows = [list(w) for w in getattr(collection, "random_windows", [])]
    # a random window the collector saw the latent fire in (in its document) is never a negative
    fired_in_context = [set(f) for f in getattr(collection, "random_fired", [])] or [set()] * len(random_windows)
    order = list(range(len(random_windows)))
    rng.shuffle(order)  # one shared order, so latents mostly check the same windows
    silence = _Silence(window_activations, latents)
    for i in latents:
        p = plan[i]
        taken = {_key(c) for c in p["explain"] + p["test"]}
        hard = silence.first_silent(i, _hard_candidates(collection, (neighbours or {}).get(i, []), taken), cfg.n_hard)
        taken |= {tuple(w) for w in hard}
        rand_cands = [random_windows[k] for k in order if i not in fired_in_context[k]]
        rand = silence.first_silent(i, [w for w in rand_cands if tuple(w) not in taken], cfg.n_random)
        p["negatives"] = [(w, "random") for w in rand] + [(w, "hard") for w in hard]
        p["rng"] = random.Random(rng.random())
    windows_checked = len(silence.max)

    # explanations
    results: dict[int, dict[str, Any]] = {i: {"latent": i} for i in latents}
    if explanations is None:
        requests, order = [], []
        for i in latents:
            exs = [
                decode_marked(decode, c.token_ids, marks_from_values(c.values, cfg.highlight_threshold))
                for c in plan[i]["explain"]
            ]
            counts = Counter(
                decode([t]).strip()
                for c in plan[i]["explain"]
                for t, m in zip(c.token_ids, marks_from_values(c.values, cfg.highlight_threshold))
                if m
            )
            requests.append(
                Request(
                    explain_messages([e[0] for e in exs], counts),
                    cfg.explain_max_tokens,
                    cfg.explain_temperature,
                    False,
                    cfg.seed,
                    "[EXPLANATION]:" if cfg.prefill else "",
                )
            )
            order.append(i)
        replies = _complete(client, requests, "explaining", progress)
        for i, rep in zip(order, replies):
            phrase = parse_explanation(rep.text)
            results[i].update(
                explanation=phrase if phrase is not None else _fallback(rep.text),
                explanation_parsed=phrase is not None,
                explainer_reply=rep.text if rep.error is None else f"(error: {rep.error})",
            )
    else:
        for i in latents:
            if i not in explanations:
                raise ConfigError(f"no explanation given for latent {i}")
            results[i].update(explanation=explanations[i], explanation_parsed=True, explainer_reply=None)
    explain_s = time.perf_counter() - t0

    # scoring (the true explanations, then the derangement baseline on the same examples)
    t1 = time.perf_counter()
    for i in progress_bar(latents, desc="scoring", enabled=progress):
        lc = collection.latents[i]
        results[i].update(
            density=float(getattr(lc, "density", float("nan"))),
            max_value=float(getattr(lc, "max_value", float("nan"))),
            n_explain_examples=len(plan[i]["explain"]),
            n_test_activating=len(plan[i]["test"]),
            n_negatives={
                "random": sum(s == "random" for _, s in plan[i]["negatives"]),
                "hard": sum(s == "hard" for _, s in plan[i]["negatives"]),
            },
            neighbours=(neighbours or {}).get(i, []),
        )
        sets = _scoring_sets(plan[i], cfg, plan[i]["rng"])
        results[i]["scores"] = {
            kind: _score(client, kind, results[i]["explanation"], sets[kind], cfg, decode) for kind in cfg.scorers
        }
        plan[i]["sets"] = sets
    baseline_from = _derangement(latents, random.Random(cfg.seed + 1)) if cfg.baseline and len(latents) > 1 else {}
    for i in progress_bar(list(baseline_from), desc="baseline", enabled=progress):
        j = baseline_from[i]
        results[i]["baseline"] = {
            "explanation_from": j,
            "explanation": results[j]["explanation"],
            "scores": {
                kind: _score(client, kind, results[j]["explanation"], plan[i]["sets"][kind], cfg, decode)
                for kind in cfg.scorers
            },
        }
    score_s = time.perf_counter() - t1
    rows = [results[i] for i in latents]
    return {
        "config": dataclasses.asdict(cfg),
        "client": client.info(),
        "prompts": prompts_used(),
        "summary": summarize(rows, cfg.scorers),
        "latents": rows,
        "windows_checked": windows_checked,
        "seconds": {"explain": explain_s, "score": score_s},
    }


class _Silence:
    """Each latent's maximum on candidate windows run alone, computed on demand and kept."""

    def __init__(self, window_activations, latents: Sequence[int]):
        self.fn, self.latents = window_activations, list(latents)
        self.col = {i: c for c, i in enumerate(self.latents)}
        self.max: dict[tuple, torch.Tensor] = {}

    def first_silent(self, latent: int, candidates: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """The first `n` distinct candidates on which `latent` is exactly 0, in order."""
        out: list[list[int]] = []
        seen: set = set()
        pos = 0
        while len(out) < n and pos < len(candidates):
            chunk = candidates[pos : pos + max(4, 2 * (n - len(out)))]
            pos += len(chunk)
            todo = list({tuple(w): None for w in chunk if tuple(w) not in self.max})
            if todo:
                for w, row in zip(todo, self.fn([list(w) for w in todo], self.latents)):
                    self.max[w] = row
            for w in chunk:
                k = tuple(w)
                if k not in seen and len(out) < n and float(self.max[k][self.col[latent]]) <= 0:
                    seen.add(k)
                    out.append(list(w))
        return out


def _hard_candidates(collection, neighbours: Sequence[int], taken: set) -> list[list[int]]:
    """Top contexts of the neighbours, round-robin from the nearest, without repeats."""
    lists = [[list(c.token_ids) for c in collection.latents[j].top] for j in neighbours if j in collection.latents]
    out, seen = [], set(taken)
    for w in _round_robin(lists, sum(len(x) for x in lists)):
        if tuple(w) not in seen:
            seen.add(tuple(w))
            out.append(w)
    return out


def _complete(client: Client, requests: list[Request], desc: str, progress: bool) -> list[Reply]:
    from saelab.progress import bar as progress_bar

    if getattr(client, "concurrency", 1) > 1:
        return complete_all(client, requests)
    return [client.complete(r) for r in progress_bar(requests, desc=desc, enabled=progress)]


def _fallback(text: str) -> str:
    """An unparsed explainer reply still yields something to score: its last non-empty line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no explanation)"


def _decoder(tokenizer, collection=None) -> Callable[[list[int]], str]:
    """Token id -> text: the tokenizer's, else the texts the collection stored."""
    cache: dict[int, str] = {}
    stored = getattr(collection, "tokens", None) or {}
    if tokenizer is None and not stored:
        raise ConfigError("no way to show tokens: pass the tokenizer (the collection stores no token texts)")

    def decode(ids: list[int]) -> str:
        if len(ids) == 1:
            t = int(ids[0])
            if t not in cache:
                cache[t] = tokenizer.decode([t]) if tokenizer is not None else stored.get(t, f"<{t}>")
            return cache[t]
        return "".join(decode([t]) for t in ids)

    return decode


def decode_marked(decode, token_ids: Sequence[int], marked: Sequence[bool]) -> tuple[str, int]:
    """(highlighted text, number of marked tokens)."""
    toks = [decode([int(t)]) for t in token_ids]
    return highlight(toks, list(marked)), sum(bool(m) for m in marked)


def _scoring_sets(p: dict[str, Any], cfg: AutointerpConfig, rng: random.Random) -> dict[str, list[tuple[str, int]]]:
    """(excerpt text, true label) lists for each scorer, shuffled once with the latent's seed."""
    test = p["test"]
    marks = [marks_from_values(c.values, cfg.highlight_threshold) for c in test]
    n_marked = math.ceil(sum(sum(m) for m in marks) / max(1, len(marks)))
    sets: dict[str, list] = {}
    items_det = [(list(c.token_ids), [False] * len(c.token_ids), 1) for c in test]
    items_det += [(w, [False] * len(w), 0) for w, _ in p["negatives"]]
    items_fuzz = [(list(c.token_ids), m, 1) for c, m in zip(test, marks)]
    for w, _ in p["negatives"]:
        k = min(max(1, n_marked), len(w))
        chosen = set(rng.sample(range(len(w)), k)) if w else set()
        items_fuzz.append((w, [j in chosen for j in range(len(w))], 0))
    for kind, items in (("detection", items_det), ("fuzzing", items_fuzz)):
        order = list(range(len(items)))
        rng.shuffle(order)
        sets[kind] = [items[j] for j in order]
    return sets


def _score(client: Client, kind: str, explanation: str, items, cfg: AutointerpConfig, decode) -> dict[str, Any]:
    texts = [decode_marked(decode, ids, marks)[0] for ids, marks, _ in items]
    truth = [label for _, _, label in items]
    chunks = [list(range(s, min(s + cfg.per_prompt, len(items)))) for s in range(0, len(items), cfg.per_prompt)]
    requests = [
        Request(
            score_messages(kind, explanation, [texts[j] for j in ch]),
            cfg.score_max_tokens,
            cfg.score_temperature,
            True,
            cfg.seed,
            "[" if cfg.prefill else "",
        )
        for ch in chunks
    ]
    replies = complete_all(client, requests)
    pred: list[int | None] = [None] * len(items)
    prob: list[float | None] = [None] * len(items)
    for ch, rep in zip(chunks, replies):
        labels = parse_labels(rep.text, len(ch)) if rep.error is None else None
        probs = label_probabilities(rep, len(ch)) if labels is not None else None
        for k, j in enumerate(ch):
            pred[j] = labels[k] if labels is not None else None
            prob[j] = probs[k] if probs is not None else None
    out = binary_scores(truth, pred, prob)
    out["replies"] = [rep.text if rep.error is None else f"(error: {rep.error})" for rep in replies]
    return out


def _derangement(items: list[int], rng: random.Random) -> dict[int, int]:
    """A seeded permutation with no fixed point: latent -> the latent whose explanation it borrows."""
    perm = items[:]
    while True:
        rng.shuffle(perm)
        if all(a != b for a, b in zip(items, perm)):
            return dict(zip(items, perm))


METRICS = ("balanced_accuracy", "strict_balanced_accuracy", "auroc", "failure_rate")


def summarize(rows: list[dict[str, Any]], scorers: Sequence[str]) -> dict[str, Any]:
    """Mean of each metric over latents (None entries skipped), for the explanations and the baseline."""

    def mean(vals):
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, Any] = {}
    for kind in scorers:
        out[kind] = {m: mean(r["scores"][kind][m] for r in rows) for m in METRICS}
        base = [r["baseline"]["scores"][kind] for r in rows if "baseline" in r]
        if base:
            out[f"{kind}_baseline"] = {m: mean(b[m] for b in base) for m in METRICS}
    out["explanations_parsed"] = mean(float(r["explanation_parsed"]) for r in rows)
    out["n_latents"] = len(rows)
    return out


# ----------------------------------------------------------------------------- report
def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def report_markdown(res: dict[str, Any]) -> str:
    """A short report: the summary table with the baseline beside it, then one line per latent."""
    cfg, client, s = res["config"], res["client"], res["summary"]
    lines = [
        "# Autointerp",
        "",
        f"Explainer and scorer: {client.get('client')} `{client.get('model')}`"
        + (f" at {client['base_url']}" if client.get("base_url") else "")
        + f"; explain temperature {cfg['explain_temperature']}, score temperature {cfg['score_temperature']}, "
        f"seed {cfg['seed']}.",
        f"{s['n_latents']} latents; {cfg['n_explain']} explain examples, {cfg['n_test']} activating test examples, "
        f"{cfg['n_random']} random + {cfg['n_hard']} hard negatives per latent, {cfg['per_prompt']} excerpts per prompt. "
        f"Explanations parsed: {_fmt(s['explanations_parsed'])}.",
        f"Time: explain {res['seconds']['explain']:.0f} s, score {res['seconds']['score']:.0f} s.",
        "",
        "| scorer | balanced acc. | strict bal. acc. | AUROC | failure rate |",
        "|---|---|---|---|---|",
    ]
    for kind in cfg["scorers"]:
        for name in (kind, f"{kind}_baseline"):
            if name in s:
                m = s[name]
                label = kind if name == kind else f"{kind} (random explanation)"
                lines.append(
                    f"| {label} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['strict_balanced_accuracy'])} | "
                    f"{_fmt(m['auroc'])} | {_fmt(m['failure_rate'])} |"
                )
    lines += [
        "",
        "| latent | density | explanation | " + " | ".join(cfg["scorers"]) + " | baseline |",
        "|---|---|---|" + "---|" * (len(cfg["scorers"]) + 1),
    ]
    for r in res["latents"]:
        sc = " | ".join(_fmt(r["scores"][k]["strict_balanced_accuracy"]) for k in cfg["scorers"])
        base = r.get("baseline")
        bs = "/".join(_fmt(base["scores"][k]["strict_balanced_accuracy"]) for k in cfg["scorers"]) if base else "—"
        expl = r["explanation"].replace("|", "\\|").replace("\n", " ")
        flag = "" if r["explanation_parsed"] else " (unparsed)"
        lines.append(f"| {r['latent']} | {r.get('density', float('nan')):.4f} | {expl}{flag} | {sc} | {bs} |")
    lines += ["", "Per-latent columns are strict balanced accuracy (unparseable replies count as wrong)."]
    return "\n".join(lines) + "\n"
