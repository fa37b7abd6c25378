"""Training throughput and peak memory: saelab against sae-lens and the encoder-matmul floor.

    .venv/bin/python benchmarks/throughput.py                    # d_in 384 and 768, width 16x, batch 4096, k 32
    .venv/bin/python benchmarks/throughput.py --d-in 384 --steps 3

Each (tool, architecture, d_in) runs in a fresh subprocess so its peak resident memory is its
own. A step is one full optimizer step (forward, backward, Adam, the architecture's own weight
updates) on a fixed batch of Gaussian activations; the floor is one `x @ W_enc` of the same
shape, the one matmul no SAE step can avoid. sae-lens runs when it is installed (the test extra
installs it); other tools are left out when not importable.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SAELENS_CLASSES = {  # saelab architecture -> sae-lens training class and its coefficients
    "topk": ("TopKTrainingSAE", {}),
    "batchtopk": ("BatchTopKTrainingSAE", {}),
    "relu": ("StandardTrainingSAE", {"l1": 5.0}),
    "jumprelu": ("JumpReLUTrainingSAE", {"l0": 1.0}),
    "gated": ("GatedTrainingSAE", {"l1": 5.0}),
}


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def bench_floor(d_in: int, d_sae: int, batch: int, steps: int, warmup: int) -> float:
    x, w = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    return timed(lambda: x @ w, steps, warmup)


def bench_saelab(arch: str, d_in: int, d_sae: int, batch: int, k: int, steps: int, warmup: int) -> float:
    import saelab
    from saelab.train import Trainer

    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae}
    if saelab.sae.get_class(arch).sweep_parameter == "k":
        cfg["k"] = k
    sae = saelab.create(cfg)
    x = torch.randn(batch, d_in)
    trainer = Trainer(sae, [x], {"steps": 10**9, "progress": False})
    return timed(lambda: trainer._train_step(x), steps, warmup)


def bench_saelens(arch: str, d_in: int, d_sae: int, batch: int, k: int, steps: int, warmup: int) -> float:
    import sae_lens
    from sae_lens.saes.sae import TrainStepInput

    cls_name, coefficients = SAELENS_CLASSES[arch]
    cls = getattr(sae_lens, cls_name)
    cfg_cls = getattr(sae_lens, cls_name + "Config")
    extra = {"k": k} if "TopK" in cls_name else {}
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, **extra))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    x = torch.randn(batch, d_in)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step():
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, 1000, False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    return timed(step, steps, warmup)


def run_one(args) -> dict:
    d_sae = args.d_in * args.expansion
    if args.tool == "floor":
        seconds = bench_floor(args.d_in, d_sae, args.batch, args.steps, args.warmup)
    elif args.tool == "saelab":
        seconds = bench_saelab(args.arch, args.d_in, d_sae, args.batch, args.k, args.steps, args.warmup)
    else:
        seconds = bench_saelens(args.arch, args.d_in, d_sae, args.batch, args.k, args.steps, args.warmup)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tool": args.tool, "architecture": args.arch, "d_in": args.d_in, "step_s": seconds,
            "activations_per_s": args.batch / seconds, "peak_mib": peak_mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, nargs="+", default=[384, 768])
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--architectures", nargs="+", default=list(SAELENS_CLASSES))
    p.add_argument("--out", help="Write results.json here.")
    p.add_argument("--one", nargs=3, metavar=("TOOL", "ARCH", "D_IN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.tool, args.arch, args.d_in = args.one[0], args.one[1], int(args.one[2])
        print(json.dumps(run_one(args)))
        return

    try:
        import sae_lens  # noqa: F401

        tools = ["saelab", "sae-lens"]
    except ImportError:
        tools = ["saelab"]
    rows = []
    for d_in in args.d_in:
        jobs = [("floor", "-")] + [(t, a) for a in args.architectures for t in tools]
        for tool, arch in jobs:
            cmd = [sys.executable, __file__, "--one", tool, arch, str(d_in), "--expansion", str(args.expansion),
                   "--batch", str(args.batch), "--k", str(args.k), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{tool} {arch} d_in={d_in}: failed\n{done.stderr[-800:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{tool:9s} {arch:10s} d_in={d_in:4d}  {r['step_s']*1000:8.1f} ms/step  "
                  f"{r['activations_per_s']:9.0f} act/s  peak {r['peak_mib']:7.0f} MiB", flush=True)

    print("\n| d_in | architecture | saelab ms/step | sae-lens ms/step | speed-up | saelab / floor | peak MiB saelab | peak MiB sae-lens |")
    print("|---|---|---|---|---|---|---|---|")
    for d_in in args.d_in:
        floor = next((r["step_s"] for r in rows if r["tool"] == "floor" and r["d_in"] == d_in), float("nan"))
        for arch in args.architectures:
            ours = next((r for r in rows if r["tool"] == "saelab" and r["architecture"] == arch and r["d_in"] == d_in), None)
            theirs = next((r for r in rows if r["tool"] == "sae-lens" and r["architecture"] == arch and r["d_in"] == d_in), None)
            if ours is None:
                continue
            t_theirs = theirs["step_s"] * 1000 if theirs else float("nan")
            print(f"| {d_in} | {arch} | {ours['step_s']*1000:.0f} | {t_theirs:.0f} | "
                  f"{t_theirs / (ours['step_s']*1000):.2f}x | {ours['step_s']/floor:.1f}x | {ours['peak_mib']:.0f} | "
                  f"{theirs['peak_mib'] if theirs else float('nan'):.0f} |")
    if args.out:
        from pathlib import Path

        from saelab.io.atomic import write_json

        write_json(Path(args.out) / "results.json", rows)


if __name__ == "__main__":
    main()
