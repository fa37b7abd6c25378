"""Training throughput and peak memory: saelab against sae-lens, dictionary-learning and sparsify.

    bash benchmarks/setup_env.sh                                  # the benchmark's own venv, once
    .bench-venv/bin/python benchmarks/throughput.py              # d_in 384 and 768, width 16x, batch 4096, k 32
    .bench-venv/bin/python benchmarks/throughput.py --device cuda
    .bench-venv/bin/python benchmarks/throughput.py --d-in 64 --steps 2 --warmup 1   # a quick check of every adapter

A step is one full optimizer step of each tool's own trainer (forward, backward, its optimizer,
its own weight constraints such as decoder renormalisation) on one fixed batch of Gaussian
activations, the same batch (same seed) for every tool. The floor is one `x @ W_enc` of the
same shape, the one matmul no SAE step can avoid. Each (tool, architecture, d_in) runs in a
fresh subprocess so its peak memory is its own: peak resident memory on CPU (which includes the
tool's imports; the after-import figure is in the per-run line and results.json), peak
allocated CUDA memory with `--device cuda`. Tools that are not importable are skipped with a
note; so is an architecture a tool does not have (sparsify is TopK only). The TopK family runs
at k; relu, jumprelu and gated start at L0 ~ k in every tool (see `start_at_l0`), and the table
shows the L0 after the timed steps. Every run also checks
that the tool's training loss went down over its steps (warm-up included), so a broken adapter
cannot pass for a fast one; with a handful of steps this is a sanity check, not a guarantee.

Besides SAEs (`--kinds sae`), the same step is timed for a TopK transcoder and skip transcoder
(reading one Gaussian batch and writing another of the same width, against sparsify's
`transcode=True` / `skip_connection=True`; sae-lens' transcoders are inference-only) and for a
BatchTopK crosscoder over `--sites` sites of width d_in each (saelab only: no pip release of the
other tools trains one). A crosscoder's floor is its encoder matmul, [B, S*d_in] @ [S*d_in, d_sae],
the cost of S single-site encoder matmuls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import torch

TOOLS = ["saelab", "sae-lens", "dictionary-learning", "sparsify"]
MODULES = {
    "saelab": "saelab",
    "sae-lens": "sae_lens",
    "dictionary-learning": "dictionary_learning",
    "sparsify": "sparsify",
}
ARCHITECTURES = ["topk", "batchtopk", "relu", "jumprelu", "gated"]
KINDS = ["sae", "transcoder", "skip_transcoder", "crosscoder"]
# The architecture each dictionary kind beyond SAEs is timed with (sparsify's transcoders are TopK).
KIND_ARCHITECTURE = {"transcoder": "topk", "skip_transcoder": "topk", "crosscoder": "batchtopk"}

SAELENS_CLASSES = {  # saelab architecture -> sae-lens training class and its coefficients
    "topk": ("TopKTrainingSAE", {}),
    "batchtopk": ("BatchTopKTrainingSAE", {}),
    "relu": ("StandardTrainingSAE", {"l1": 5.0}),
    "jumprelu": ("JumpReLUTrainingSAE", {"l0": 1.0}),
    "gated": ("GatedTrainingSAE", {"l1": 5.0}),
}

# A latent counts as dead after this many tokens without firing. Every tool's default is far
# beyond the few steps timed here except saelab's (200k tokens, 49 steps of 4096), so it is
# raised to dictionary-learning's and sparsify's 10M: no tool pays for AuxK on a fresh SAE.
DEAD_AFTER_TOKENS = 10_000_000


class Unsupported(Exception):
    """The tool has no such architecture."""


def fixed_batch(batch: int, d_in: int, device: str, seed: int = 1234) -> torch.Tensor:
    """The same Gaussian batch in every subprocess (E||x|| ~ sqrt(d_in), so no tool rescales it)."""
    return torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed)).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def rss_mib() -> float:
    """Current resident memory (Linux); nan elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# A ReLU-family SAE (relu, jumprelu, gated) fires latent j on row x when
# x_in @ W[:, j] + bias[j] > threshold[j]. A fresh one fires about half its latents, far from a
# trained SAE's L0 and from the TopK runs' k; `--start-l0 k` (the default) shifts each latent's
# bias on the batch so it fires on k/d_sae of the rows, the same way in every tool, so every
# step is timed at L0 ~ k (where sparse kernels, if a tool has them, apply).
def gate(x_in, W, bias, threshold=None):
    """The firing rule, as a callable read afresh each time (weights change in place)."""
    return lambda: (x_in(), W(), bias(), None if threshold is None else threshold())


@torch.no_grad()
def margins(g, chunk: int = 2048):
    x_in, W, bias, threshold = g()
    for s in range(0, W.shape[1], chunk):
        m = x_in @ W[:, s : s + chunk] + bias[s : s + chunk]
        yield s, (m if threshold is None else m - threshold[s : s + chunk])


@torch.no_grad()
def start_at_l0(g, k: int) -> None:
    _, _, bias, _ = g()
    for s, m in margins(g):
        fire = max(1, round(m.shape[0] * k / bias.shape[0]))
        bias[s : s + m.shape[1]] -= m.kthvalue(m.shape[0] - fire, dim=0).values


@torch.no_grad()
def l0_of(g) -> float:
    fired, rows = 0, 0
    for _, m in margins(g):
        fired, rows = fired + int((m > 0).sum()), m.shape[0]
    return fired / rows


# ---------------------------------------------------------------------------------------- floor
def make_floor(arch, x, d_sae, k, args):
    w = torch.randn(x.shape[1], d_sae, device=x.device)

    def step():
        x @ w

    return step, None


# --------------------------------------------------------------------------------------- saelab
def make_saelab(arch, x, d_sae, k, args):
    """saelab's own training step (`Member.train_step`, the public single step): loss terms,
    backward, the architecture's before/after-step hooks, gradient clipping, fused Adam, latent
    statistics. Warm-ups off (the steady state); no input scaling or b_dec initialisation from
    data (no tool's init is timed)."""
    import itertools

    import saelab
    from saelab.activations.base import Batch
    from saelab.train import Trainer

    cfg = {"architecture": arch, "d_in": x.shape[1], "d_sae": d_sae}
    if saelab.sae.get_class(arch).sweep_parameter == "k":
        cfg["k"] = k
    y = args.target
    if args.kind in ("transcoder", "skip_transcoder"):
        cfg.update(site="in", write_site="out", d_out=y.shape[1], skip=args.kind == "skip_transcoder")
        batch = Batch(x=x, sites={"in": x, "out": y})
    elif args.kind == "crosscoder":
        names = [f"site{i}" for i in range(args.sites)]
        cfg.update(site=names)
        batch = Batch(x=x, sites=dict(zip(names, x.chunk(args.sites, dim=1))))
    else:
        batch = Batch(x=x)
    sae = saelab.create(cfg)
    trainer = Trainer(
        sae,
        lambda: itertools.repeat(batch),  # a function: the trainer rewinds its source once
        {
            "steps": 10**9,
            "progress": False,
            "device": args.device,
            "lr_warmup_steps": 0,
            "sparsity_warmup_steps": 0,
            "dead_after_tokens": DEAD_AFTER_TOKENS,
            "normalize_activations": "none",
            "b_dec_init": "zeros",
            "norm_estimation_batches": 1,
        },
    )
    trainer.start(resume=False)
    (member,) = trainer.members.values()

    def step():
        return member.train_step(x, batch, y).loss.detach()

    if args.kind != "sae":
        return step, None
    x_in = (lambda: x - sae.b_dec) if sae.cfg.apply_b_dec_to_input else (lambda: x)
    gates = {
        "relu": gate(x_in, lambda: sae.W_enc, lambda: sae.b_enc),
        "jumprelu": gate(x_in, lambda: sae.W_enc, lambda: sae.b_enc, lambda: sae.log_threshold.exp()),
        "gated": gate(x_in, lambda: sae.W_enc, lambda: sae.b_gate),
    }
    return step, gates.get(arch)


# ------------------------------------------------------------------------------------- sae-lens
def make_saelens(arch, x, d_sae, k, args):
    """sae-lens' SAETrainer._train_step: training_forward_pass with the coefficients, the
    firing statistics, backward, gradient-norm clipping at 1, Adam (its default lr 3e-4). Its
    constant lr and coefficient schedulers are left out (a Python call each)."""
    import sae_lens
    from sae_lens.saes.sae import TrainStepInput

    cls_name, coefficients = SAELENS_CLASSES[arch]
    cls = getattr(sae_lens, cls_name)
    cfg_cls = getattr(sae_lens, cls_name + "Config")
    extra = {"k": k} if "TopK" in cls_name else {}
    sae = cls(cfg_cls(d_in=x.shape[1], d_sae=d_sae, device=args.device, **extra))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    since_fired = torch.zeros(d_sae, device=x.device)
    act_freq = torch.zeros(d_sae, device=x.device)
    n_steps = [0]

    def step():
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, n_steps[0], False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n_steps[0] += 1
        return out.loss.detach()

    x_in = lambda: x - sae.b_dec * sae.cfg.apply_b_dec_to_input  # noqa: E731  (its process_sae_in)
    gates = {
        "relu": gate(x_in, lambda: sae.W_enc, lambda: sae.b_enc),
        "jumprelu": gate(x_in, lambda: sae.W_enc, lambda: sae.b_enc, lambda: sae.threshold),
        "gated": gate(x_in, lambda: sae.W_enc, lambda: sae.b_gate),
    }
    return step, gates.get(arch)


# -------------------------------------------------------------------------- dictionary-learning
def make_dictionary_learning(arch, x, d_sae, k, args):
    """dictionary-learning's own `trainer.update(step, x)`, unchanged: its loss, backward, its
    gradient projection / ConstrainedAdam, clipping, optimizer and scheduler step, decoder renorm.
    Warm-ups off and the TopK threshold EMA on (its steady state after step 1000); the first
    update (step 0, which also sets b_dec to the geometric median) runs before the timed steps."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = {
        "steps": 10**9,
        "activation_dim": x.shape[1],
        "dict_size": d_sae,
        "layer": 0,
        "lm_name": "benchmark",
        "device": args.device,
        "warmup_steps": 0,
    }
    if arch == "topk":
        trainer = TopKTrainer(k=k, threshold_start_step=0, seed=0, **common)
    elif arch == "batchtopk":
        trainer = BatchTopKTrainer(k=k, threshold_start_step=0, seed=0, **common)
    elif arch == "relu":  # decoder-norm-weighted L1, no unit-norm constraint: saelab's default `relu`
        trainer = StandardTrainerAprilUpdate(sparsity_warmup_steps=None, seed=0, **common)
    elif arch == "jumprelu":
        trainer = JumpReluTrainer(sparsity_warmup_steps=None, target_l0=float(k), seed=0, **common)
    elif arch == "gated":
        trainer = GatedSAETrainer(sparsity_warmup_steps=None, seed=0, **common)
    else:
        raise Unsupported(arch)

    last = []
    loss_fn = trainer.loss

    def recording_loss(*a, **kw):  # every trainer computes its loss here; keep it for the check
        loss = loss_fn(*a, **kw)
        last[:] = [loss.detach()]
        return loss

    trainer.loss = recording_loss
    trainer.update(0, x)
    count = [1]

    def step():
        trainer.update(count[0], x)
        count[0] += 1
        return last[0]

    ae = trainer.ae
    gates = {
        "relu": gate(lambda: x - ae.bias, lambda: ae.encoder.weight.T, lambda: ae.encoder.bias),
        "jumprelu": gate(lambda: x, lambda: ae.W_enc, lambda: ae.b_enc, lambda: ae.threshold),
        "gated": gate(lambda: x - ae.decoder_bias, lambda: ae.encoder.weight.T, lambda: ae.gate_bias),
    }
    return step, gates.get(arch)


# ------------------------------------------------------------------------------------- sparsify
def make_sparsify(arch, x, d_sae, k, args):
    """One step of sparsify's Trainer.fit with loss_fn='fvu' (its hook plus the step that
    follows), on its own SparseCoder: renormalise W_dec, forward (fused TopK encoder, sparse
    decoder, FVU against the batch variance, AuxK when latents are dead), the firing mask,
    backward, removal of the gradient parallel to the decoder rows, its default optimizer
    (sign-SGD in a schedule-free wrapper, or `--sparsify-optimizer adam`), the dead-latent
    counters. Left out: the model forward and the token mask its hook copies the batch through.
    b_dec starts at the batch mean, as its first step sets it. Its bf16 autocast and TF32
    matmuls on CUDA apply only with --native-precision."""
    if arch != "topk" or args.kind == "crosscoder":
        raise Unsupported(arch)
    from sparsify import SparseCoder
    from sparsify.config import SparseCoderConfig, TrainConfig

    transcode = args.kind != "sae"
    y = args.target if transcode else x
    cfg = TrainConfig(
        SparseCoderConfig(k=k, num_latents=d_sae, transcode=transcode, skip_connection=args.kind == "skip_transcoder"),
        auxk_alpha=1 / 32,
        optimizer=args.sparsify_optimizer,
        lr_warmup_steps=0,
    )
    torch.manual_seed(0)
    sae = SparseCoder(x.shape[1], cfg.sae, x.device, dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.data = y.mean(0).to(sae.dtype)
    if cfg.optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(
            SignSGD([{"params": sae.parameters(), "lr": cfg.lr or 5e-3 / (sae.num_latents / 2**14) ** 0.5}]),
            momentum=0.95,
        )
        opt.train()
        scheduler = None
    else:
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam([{"params": sae.parameters(), "lr": cfg.lr or 2e-4 / (sae.num_latents / 2**14) ** 0.5}])
        scheduler = get_linear_schedule_with_warmup(opt, cfg.lr_warmup_steps, 10**9)
    if args.native_precision:
        torch.set_float32_matmul_precision("high")
        forward = sae
    else:  # the forward without its class-level CUDA bf16 autocast: fp32 like every other tool
        forward = lambda **kw: type(sae).forward.__wrapped__(sae, **kw)  # noqa: E731
    since_fired = torch.zeros(sae.num_latents, device=x.device, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, device=x.device, dtype=torch.bool)
    fvu_log = [0.0]

    normalize = sae.cfg.normalize_decoder and not transcode  # its trainer leaves transcoder rows free

    def step():
        if normalize:
            sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (y - y.mean(0)).pow(2).sum()
        out = forward(x=x, y=y, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu_log[0] += float(out.fvu.detach())
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        if normalize:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        return loss.detach()

    return step, None


MAKERS = {
    "floor": make_floor,
    "saelab": make_saelab,
    "sae-lens": make_saelens,
    "dictionary-learning": make_dictionary_learning,
    "sparsify": make_sparsify,
}


def run_one(args) -> dict:
    d_sae = args.d_in * args.expansion
    cuda = args.device.startswith("cuda")
    if args.tool != "floor":
        __import__(MODULES[args.tool])
        if args.kind != "sae" and args.tool in ("sae-lens", "dictionary-learning"):
            raise Unsupported(args.kind)  # sae-lens' transcoders are inference-only; neither trains crosscoders
    after_import = rss_mib()
    width = args.d_in * (args.sites if args.kind == "crosscoder" else 1)
    x = fixed_batch(args.batch, width, args.device)
    args.target = fixed_batch(args.batch, args.d_in, args.device, seed=4321) if "transcoder" in args.kind else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    step, g = MAKERS[args.tool](args.arch, x, d_sae, args.k, args)
    if g is not None and args.start_l0 == "k":
        start_at_l0(g, args.k)
    l0_start = l0_of(g) if g is not None else None
    losses = []
    seconds = timed(lambda: losses.append(step()), args.steps, args.warmup, args.device)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses = [float(v) for v in losses if v is not None]
    return {
        "tool": args.tool,
        "architecture": args.arch,
        "kind": args.kind,
        "d_in": args.d_in,
        "d_sae": d_sae,
        "device": args.device,
        "step_s": seconds,
        "activations_per_s": args.batch / seconds,
        "peak_mib": peak,
        "rss_after_import_mib": after_import,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "l0_start": l0_start,
        "l0": l0_of(g) if g is not None else (None if args.tool == "floor" else float(args.k)),
    }


def loss_note(r: dict) -> str:
    if r["loss_first"] is None:
        return ""
    l0 = f"  L0 {r['l0_start']:.1f} -> {r['l0']:.1f}" if r.get("l0_start") is not None else ""
    ok = r["loss_last"] < r["loss_first"]
    return l0 + f"  loss {r['loss_first']:.4g} -> {r['loss_last']:.4g}" + ("" if ok else "  (DID NOT DECREASE)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, nargs="+", default=[384, 768])
    p.add_argument("--expansion", type=int, default=16, help="d_sae = expansion * d_in.")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="k of the TopK family (dictionary-learning's JumpReLU target L0).")
    p.add_argument("--steps", type=int, help="Timed steps (default 5 on CPU, 50 on CUDA).")
    p.add_argument("--warmup", type=int, help="Untimed steps first (default 2 on CPU, 10 on CUDA).")
    p.add_argument("--architectures", nargs="+", default=ARCHITECTURES, choices=ARCHITECTURES)
    p.add_argument(
        "--kinds",
        nargs="+",
        default=KINDS,
        choices=KINDS,
        help="SAEs (every architecture) and, beyond them, a TopK (skip) transcoder and a BatchTopK crosscoder.",
    )
    p.add_argument("--sites", type=int, default=3, help="Sites of a crosscoder (each d_in wide).")
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (cuda when there is one).")
    p.add_argument(
        "--sparsify-optimizer",
        default="signum",
        choices=["signum", "adam"],
        help="sparsify's optimizer: its default sign-SGD (schedule-free), or Adam like the others.",
    )
    p.add_argument(
        "--native-precision",
        action="store_true",
        help="Let sparsify use its own CUDA bf16 autocast and TF32 matmuls (default: fp32 for every tool).",
    )
    p.add_argument(
        "--start-l0",
        default="k",
        choices=["k", "init"],
        help="relu, jumprelu, gated: shift each latent's encoder (gate) bias so the fresh SAE starts at "
        "L0 ~ k on the batch, in every tool (default), or keep each tool's own init (L0 ~ d_sae/2).",
    )
    p.add_argument("--out", help="Write results.json here.")
    p.add_argument("--one", nargs=4, metavar=("TOOL", "ARCH", "D_IN", "KIND"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if args.one:
        args.tool, args.arch, args.d_in, args.kind = args.one[0], args.one[1], int(args.one[2]), args.one[3]
        try:
            print(json.dumps(run_one(args)))
        except Unsupported:
            print(json.dumps({"unsupported": True}))
        return

    tools = []
    for tool in args.tools:
        if importlib.util.find_spec(MODULES[tool]) is None:
            print(
                f"note: {tool} is not installed (module {MODULES[tool]}); skipped. "
                "`bash benchmarks/setup_env.sh` installs every tool.",
                file=sys.stderr,
            )
        else:
            tools.append(tool)
    name = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {name}; width {args.expansion}x, batch {args.batch}, k {args.k}, "
        f"{args.steps} timed steps after {args.warmup}; peak = {'max CUDA allocated' if cuda else 'max RSS'}",
        flush=True,
    )
    rows, skipped, broken = [], [], set()
    for d_in in args.d_in:
        jobs = [("floor", "-", "sae")] if "sae" in args.kinds else []
        jobs += [(t, a, "sae") for a in args.architectures for t in tools] if "sae" in args.kinds else []
        for kind in (k for k in args.kinds if k != "sae"):
            jobs += [("floor", "-", kind)] if kind == "crosscoder" else []
            jobs += [(t, KIND_ARCHITECTURE[kind], kind) for t in tools]
        for tool, arch, kind in jobs:
            if tool in broken:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--one",
                tool,
                arch,
                str(d_in),
                kind,
                "--sites",
                str(args.sites),
                "--expansion",
                str(args.expansion),
                "--batch",
                str(args.batch),
                "--k",
                str(args.k),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
                "--sparsify-optimizer",
                args.sparsify_optimizer,
                "--start-l0",
                args.start_l0,
            ] + (["--native-precision"] if args.native_precision else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{tool} {arch} d_in={d_in}: failed\n{done.stderr[-1500:]}", file=sys.stderr)
                if "ImportError" in done.stderr or "ModuleNotFoundError" in done.stderr:
                    print(f"note: {tool} does not import; skipped from here on", file=sys.stderr)
                    broken.add(tool)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            if r.get("unsupported"):
                skipped.append(f"{tool}/{arch}" + ("" if kind == "sae" else f" {kind}"))
                continue
            rows.append(r)
            base = "" if cuda else f" (after import {r['rss_after_import_mib']:.0f})"
            label = arch if kind == "sae" else f"{arch} {kind}"
            print(
                f"{tool:19s} {label:24s} d_in={d_in:4d}  {r['step_s'] * 1000:9.2f} ms/step  "
                f"{r['activations_per_s']:10.0f} act/s  peak {r['peak_mib']:7.0f} MiB{base}{loss_note(r)}",
                flush=True,
            )
    if skipped:
        print("not in the tool: " + ", ".join(sorted(set(skipped))))

    def find(tool, arch, d_in, kind="sae"):
        return next(
            (
                r
                for r in rows
                if r["tool"] == tool and r["architecture"] == arch and r["d_in"] == d_in and r["kind"] == kind
            ),
            None,
        )

    print(
        "\nspeed-up = the tool's step time / saelab's step time (above 1: saelab is faster); "
        "/ floor = step time / one x @ W_enc"
    )
    print("\n| d_in | architecture | tool | L0 | ms/step | activations/s | peak MiB | speed-up | / floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d_in in args.d_in:
        floor = find("floor", "-", d_in)
        if floor:
            print(
                f"| {d_in} | (floor: x @ W_enc) | torch | | {floor['step_s'] * 1000:.1f} | "
                f"{floor['activations_per_s']:.0f} | {floor['peak_mib']:.0f} | | 1.0x |"
            )
        table = [(a, "sae") for a in args.architectures if "sae" in args.kinds]
        table += [(KIND_ARCHITECTURE[k], k) for k in args.kinds if k != "sae"]
        for arch, kind in table:
            ours = find("saelab", arch, d_in, kind)
            base = find("floor", "-", d_in, "crosscoder") if kind == "crosscoder" else floor
            if kind == "crosscoder" and base:
                print(
                    f"| {d_in} x {args.sites} sites | (floor: [B, {args.sites}d] @ W_enc) | torch | | "
                    f"{base['step_s'] * 1000:.1f} | {base['activations_per_s']:.0f} | {base['peak_mib']:.0f} | | 1.0x |"
                )
            label = arch if kind == "sae" else f"{arch} {kind}"
            for tool in tools:
                r = find(tool, arch, d_in, kind)
                if r is None:
                    continue
                speedup = f"{r['step_s'] / ours['step_s']:.2f}x" if ours else "n/a"
                over_floor = f"{r['step_s'] / base['step_s']:.1f}x" if base else "n/a"
                print(
                    f"| {d_in} | {label} | {tool} | {r['l0']:.0f} | {r['step_s'] * 1000:.1f} | "
                    f"{r['activations_per_s']:.0f} | {r['peak_mib']:.0f} | {speedup} | {over_floor} |"
                )
    flat = [
        f"{r['tool']}/{r['architecture']}/{r['d_in']}"
        for r in rows
        if r["loss_first"] is not None and not r["loss_last"] < r["loss_first"]
    ]
    if flat:
        print(
            "\nWARNING: the training loss did not go down over the steps of " + ", ".join(flat) + " (expected "
            "early on for sae-lens' jumprelu, whose L0 term's straight-through gradient raises L0 at first "
            "while the MSE falls; anything else points at a broken adapter)",
            file=sys.stderr,
        )
    if args.out:
        from pathlib import Path

        from saelab.io.atomic import write_json

        write_json(
            Path(args.out) / "results.json",
            {"config": {k: v for k, v in vars(args).items() if k != "one"}, "torch": torch.__version__, "rows": rows},
        )


if __name__ == "__main__":
    main()
