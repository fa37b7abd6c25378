"""`saelab harvest`, `saelab fidelity`, `saelab inspect` and `saelab steer`: real models from the shell.

Each takes the model, hookpoint and text either from flags or, for commands that read an SAE,
from the source config saved with the SAE (`saelab train` records it), and writes
`--out DIR/results.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError
from saelab.io.atomic import write_json, write_text


def _model_flags(p: argparse.ArgumentParser, need_hookpoint: bool = False) -> None:
    p.add_argument(
        "--model", help="Local model folder, a model in the local Hugging Face cache, or 'smollm2' (default model)."
    )
    p.add_argument("--gguf-file", help="GGUF file inside --model, for quantised checkpoints.")
    p.add_argument(
        "--hookpoint",
        nargs="+" if need_hookpoint else None,
        help="Module path(s), globs allowed (model.layers.*); ':input' reads a module's input.",
    )
    p.add_argument(
        "--data", help="Text: 'pydoc' (Python's help topics), a .txt/.jsonl/.parquet path, or a folder's file."
    )
    p.add_argument("--column", default=None, help="Text column of a JSONL/Parquet dataset (default: text).")
    p.add_argument("--context-size", type=int, default=None, help="Tokens per row (default: as trained, else 128).")
    p.add_argument("--device", default=None, help="torch device (default: cpu).")
    p.add_argument("--dtype", default=None, help="Model dtype: float32 (default), bfloat16, float16.")


def register(subparsers) -> None:
    p = subparsers.add_parser("harvest", help="Run a model over text once and cache activations at hookpoints to disk.")
    _model_flags(p, need_hookpoint=True)
    p.add_argument(
        "--models",
        nargs="+",
        metavar="[ALIAS=]MODEL",
        help="Several models run on the same tokens (instead of --model); sites are stored as ALIAS/hookpoint. "
        "Two models without aliases are 'base' and 'ft'. They must share one vocabulary.",
    )
    p.add_argument("--tokens", type=int, default=None, help="Stop after this many kept tokens (default: all the data).")
    p.add_argument("--shard-tokens", type=int, default=262_144, help="Tokens per shard file (default: 262144).")
    p.add_argument("--cache-dtype", default="float32", help="Stored dtype: float32, bfloat16 or float16.")
    p.add_argument("--model-batch-size", type=int, default=8, help="Rows per forward pass (default: 8).")
    p.add_argument(
        "--out", required=True, help="Cache folder (continues a partial cache of the same model/hookpoints)."
    )
    p.set_defaults(func=run_harvest)

    for name, func, help_ in [
        ("fidelity", run_fidelity, "Splice a dictionary into its model: CE loss recovered, KL, top-1 agreement."),
        ("inspect", run_inspect, "Top-activating contexts, density and logit lens of an SAE's latents."),
    ]:
        p = subparsers.add_parser(name, help=help_)
        p.add_argument("sae", help="SAE, transcoder or crosscoder folder (SAELens layout, e.g. RUN/sae).")
        _model_flags(p)
        p.add_argument("--rows", type=int, default=64, help="Text rows to evaluate on (default: 64).")
        p.add_argument(
            "--skip-docs", type=int, default=0, help="Start this many documents into the data (held-out text)."
        )
        p.add_argument("--out", required=True, help="Folder for results.json (and the reports).")
        if name == "fidelity":
            p.add_argument(
                "--no-per-site",
                action="store_true",
                help="Crosscoders and CLTs: skip splicing each site alone (one set of forwards per site).",
            )
        if name == "inspect":
            p.add_argument("--latents", help="Comma-separated latent ids (default: the most frequent ones).")
            p.add_argument("--n-latents", type=int, default=20, help="How many latents when --latents is not given.")
            p.add_argument("--top-k", type=int, default=8, help="Contexts per latent (default: 8).")
        p.set_defaults(func=func)

    p = subparsers.add_parser("steer", help="Generate text with and without adding an SAE latent's decoder direction.")
    p.add_argument("sae", help="SAE folder.")
    _model_flags(p)
    p.add_argument("--latent", type=int, required=True, help="Latent id.")
    p.add_argument(
        "--scale", type=float, required=True, help="Multiple of the decoder direction (add) or the value (clamp)."
    )
    p.add_argument("--mode", choices=["add", "clamp"], default="add")
    p.add_argument("--prompt", default="The", help="Prompt text.")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--out", help="Folder for results.json.")
    p.set_defaults(func=run_steer)


# ---------------------------------------------------------------------------- shared
def _spec_from(
    args: argparse.Namespace, saved: dict[str, Any] | None = None, need_hookpoint: bool = True
) -> dict[str, Any]:
    """Model/hookpoint/data from flags, falling back to the SAE's recorded training source."""
    spec: dict[str, Any] = {}
    if saved:
        spec.update(
            {
                k: v
                for k, v in saved.items()
                if k
                in (
                    "model",
                    "models",
                    "gguf_file",
                    "hookpoint",
                    "hookpoints",
                    "data",
                    "column",
                    "context_size",
                    "dtype",
                    "device",
                    "packing",
                    "prepend_bos",
                    "exclude_special",
                )
            }
        )
    for flag, key in [
        ("model", "model"),
        ("gguf_file", "gguf_file"),
        ("hookpoint", "hookpoint"),
        ("data", "data"),
        ("column", "column"),
        ("context_size", "context_size"),
        ("device", "device"),
        ("dtype", "dtype"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            spec[key] = value
    if getattr(args, "model", None) is not None:
        spec.pop("models", None)  # --model replaces the recorded model(s)
    if "model" not in spec and "models" not in spec:
        raise ConfigError("which model? pass --model (the SAE does not record a model source)")
    if need_hookpoint and "hookpoint" not in spec:
        raise ConfigError("which hookpoint? pass --hookpoint (the SAE does not record one)")
    spec.setdefault("data", "pydoc")
    return spec


def _sae_and_spec(args: argparse.Namespace, need_hookpoint: bool = True):
    """The dictionary and its model source; `need_hookpoint=False` for dictionaries that name their sites."""
    from saelab.evals.splice import model_source_spec
    from saelab.io.formats import load, read_metadata

    sae = load(args.sae)  # either saelab layout: SAELens v6, or saelab's for crosscoders and TopK transcoders
    saved = model_source_spec(read_metadata(args.sae).get("saelab_source"))
    return sae, _spec_from(args, saved, need_hookpoint and sae.cfg.read_sites is None)


def _eval_stream(spec: dict[str, Any], n_rows: int, skip_docs: int, batch_rows: int = 8):
    """Model, tokenizer, hookpoint name, specials and a generator of up to `n_rows` rows of
    text (batches of `batch_rows`), `skip_docs` documents into the data."""
    from saelab.models.source import _load
    from saelab.models.text import eval_batches, special_ids

    model, tokenizer = _load(spec)
    hookpoint = spec["hookpoint"][0] if isinstance(spec["hookpoint"], list) else spec["hookpoint"]
    specials = special_ids(tokenizer) if spec.get("exclude_special", True) else None
    return model, tokenizer, hookpoint, specials, eval_batches(tokenizer, spec, n_rows, skip_docs, batch_rows)


def _eval_rows(spec: dict[str, Any], n_rows: int, skip_docs: int):
    """As `_eval_stream`, with the rows held in a list (metrics that read them twice)."""
    model, tokenizer, hookpoint, specials, batches = _eval_stream(spec, n_rows, skip_docs)
    return model, tokenizer, hookpoint, specials, list(batches)


# ---------------------------------------------------------------------------- commands
def run_harvest(args: argparse.Namespace) -> int:
    from saelab.activations.cache import write_cache
    from saelab.models.source import harvester_from_spec

    if args.models and args.model:
        raise ConfigError("--model and --models: give one model or several, not both")
    spec = _spec_from(args, {"model": ""} if args.models else None)
    if args.models:  # a list, so that name_models names the defaults and refuses a repeated alias
        spec.pop("model")
        spec["models"] = [dict(zip(("alias", "model"), m.split("=", 1))) if "=" in m else m for m in args.models]
    spec["model_batch_size"] = args.model_batch_size
    t0 = time.perf_counter()
    harvester = harvester_from_spec(spec)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = spec["data"]
    manifest = write_cache(
        harvester,
        args.out,
        args.tokens,
        args.shard_tokens,
        args.cache_dtype,
        data_desc=data if isinstance(data, (str, dict)) else "in-memory",
        progress=True,
    )
    seconds = time.perf_counter() - t0
    record = {
        "cache": str(args.out),
        "model": manifest["model"],
        **({"models": manifest["models"]} if manifest.get("models") else {}),
        "hookpoints": manifest["hookpoints"],
        "tokens": manifest["total_tokens"],
        "shards": len(manifest["shards"]),
        "complete": manifest["complete"],
        "load_seconds": load_s,
        "harvest_seconds": seconds,
    }
    write_json(Path(args.out) / "results.json", record)
    print(
        f"cached {record['tokens']} tokens at {', '.join(manifest['hookpoints'])} in {len(manifest['shards'])} "
        f"shard(s) -> {args.out} ({seconds:.1f} s)"
    )
    return 0


def run_fidelity(args: argparse.Namespace) -> int:
    """Any dictionary: an SAE at its hookpoint, a transcoder, crosscoder or CLT at the sites it names."""
    from saelab.evals.splice import fidelity_from_spec

    sae, spec = _sae_and_spec(args, need_hookpoint=True)
    record = {"sae": str(args.sae), **fidelity_from_spec(sae, spec, args.rows, args.skip_docs, not args.no_per_site)}
    write_json(Path(args.out) / "results.json", record)
    _print_record(record)
    return 0


def _print_record(record: dict[str, Any], indent: str = "  ") -> None:
    for k, v in record.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print_record(v, indent + "  ")
        else:
            print(f"{indent}{k:32s} {v:.4g}" if isinstance(v, float) else f"{indent}{k:32s} {v}")


def run_inspect(args: argparse.Namespace) -> int:
    from saelab.models.inspection import html_report, inspect_latents, text_report

    latents = _latent_ids(args.latents) if args.latents else None  # checked before any model loads
    sae, spec = _sae_and_spec(args)
    if latents is not None and max(latents) >= sae.cfg.d_sae:
        raise ConfigError(
            f"--latents: latent {max(latents)} does not exist; the SAE has {sae.cfg.d_sae} (0..{sae.cfg.d_sae - 1})"
        )
    model, tokenizer, hookpoint, specials, batches = _eval_rows(spec, args.rows, args.skip_docs)
    res = inspect_latents(
        sae, model, tokenizer, hookpoint, batches, latents, args.n_latents, args.top_k, specials=specials
    )
    res = {"sae": str(args.sae), "model": spec["model"], **res}
    out = Path(args.out)
    write_json(out / "results.json", res)
    text = text_report(res)
    write_text(out / "report.txt", text)
    write_text(out / "report.html", html_report(res))
    print(text[:3000])
    print(f"wrote {out}/results.json, report.txt, report.html")
    return 0


def _latent_ids(text: str) -> list[int]:
    """`--latents 3,17,42` as ints; anything else is one line naming the bad entry."""
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ConfigError(f"--latents: {part!r} is not a latent id; give comma-separated integers such as 3,17,42")
        ids.append(int(part))
    return ids


def run_steer(args: argparse.Namespace) -> int:
    from saelab.models.source import _load
    from saelab.models.steering import generate

    if not args.prompt:
        raise ConfigError("--prompt is empty; give the text to continue (e.g. --prompt 'The')")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    sae, spec = _sae_and_spec(args)
    model, tokenizer = _load(spec)
    hookpoint = spec["hookpoint"][0] if isinstance(spec["hookpoint"], list) else spec["hookpoint"]
    out = generate(
        model,
        tokenizer,
        args.prompt,
        hookpoint,
        sae,
        args.latent,
        scale=args.scale,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
    )
    record = {"sae": str(args.sae), "latent": args.latent, "scale": args.scale, "mode": args.mode, **out}
    if args.out:
        write_json(Path(args.out) / "results.json", record)
    print(json.dumps(record, indent=2))
    return 0
