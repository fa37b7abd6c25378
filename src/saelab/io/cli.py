"""`saelab convert SRC --out DIR`: read an SAE in any known format, write it in the SAELens v6 layout
(or, with `--to saelab-dictionary`, in saelab's own layout, which also holds crosscoders and the
transcoders SAELens has no class for; those are refused by `--to saelens` with that advice).

The written cfg.json records where the SAE came from (`metadata.saelab_provenance`: source format,
path, hookpoint, the scalings folded in), so a converted file says what was done to it.
"""

from __future__ import annotations

import argparse
import json

from saelab.io import formats


def register(subparsers) -> None:
    names = formats.list_formats()
    writers = [n for n in names if formats.get_format(n).write is not None]
    p = subparsers.add_parser(
        "convert",
        help="Convert an SAE from another library's files to the SAELens v6 layout.",
        description="Formats read: " + "; ".join(f"{n} ({formats.get_format(n).reads})" for n in names),
    )
    p.add_argument("src", help="Folder (or a file in it) of the SAE to convert.")
    p.add_argument("--out", required=True, help="Folder to write.")
    p.add_argument("--from", dest="source_format", choices=names, help="Source format (default: detected).")
    p.add_argument("--to", dest="target_format", choices=writers, default="saelens", help="Target format.")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    sae = formats.read(args.src, args.source_format)
    out = formats.get_format(args.target_format).write(sae, args.out)
    prov = getattr(sae, "provenance", {})
    cfg = sae.cfg
    reads, writes = cfg.read_sites or [prov.get("hook_name")], cfg.write_sites or [prov.get("hook_name")]
    sites = f"hook={reads[0]}" if reads == writes and len(reads) == 1 else f"reads {reads} writes {writes}"
    widths = f" d_out={cfg.output_width}" if cfg.is_transcoder else ""
    print(
        f"{prov.get('source_format')} -> {args.target_format}: {sae.architecture} d_in={cfg.d_in}{widths} "
        f"d_sae={cfg.d_sae} {sites} -> {out}"
    )
    if prov.get("folded_scaling"):
        print("folded into the weights: " + json.dumps(prov["folded_scaling"]))
    return 0
