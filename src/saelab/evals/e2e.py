"""The end-to-end comparison: local, e2e and e2e+ds dictionaries judged by what the model does.

For each dictionary spliced at one hookpoint (at the positions it was trained on: real tokens, not
BOS/pad/specials), over the same token rows:
- CE loss of the clean and the spliced model, and its increase (spliced - clean), on the
  next-token predictions (as `downstream_fidelity` scores them);
- KL(p_clean || p_spliced) = sum_v p_clean (log p_clean - log p_spliced), mean per scored position;
- L0 (mean active latents per spliced position) and alive latents (fraction that fired at least
  once over these rows);
- explained variance 1 - FVU of the SAE's output at its hookpoint, and of the spliced forward's
  activations at each downstream hookpoint against the clean ones (same positions). Pure e2e can
  keep the logits while leaving the activation manifold; these columns show it.

`e2e_report` returns one `E2ERow` per dictionary; `to_markdown` formats the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch

from saelab.errors import ConfigError
from saelab.evals.downstream import _ce, _kl
from saelab.models import hooks
from saelab.models.text import keep_mask
from saelab.train.e2e import resolve_sites, spliced


@dataclass
class E2ERow:
    name: str
    hookpoint: str
    ce_clean: float
    ce_sae: float
    ce_increase: float  # ce_sae - ce_clean, nats
    kl_clean_spliced: float  # mean KL(p_clean || p_spliced) per scored position, nats
    l0: float
    alive_fraction: float
    explained_variance: float  # at the hookpoint
    downstream_explained_variance: dict[str, float] = field(default_factory=dict)
    positions: int = 0  # spliced positions

    def to_dict(self) -> dict:
        return asdict(self)


def _ev(resid: float, total: float) -> float:
    return 1.0 - resid / total if total > 0 else float("nan")


@torch.no_grad()
def e2e_report(
    saes: Mapping[str, torch.nn.Module],
    model: torch.nn.Module,
    hookpoint: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    downstream: list[str] = (),
    specials: torch.Tensor | None = None,
) -> list[E2ERow]:
    """One row per dictionary of `saes` (name -> SAE taking raw activations at `hookpoint`), over
    `batches` of (input_ids [B, T], attention_mask [B, T])."""
    hp, ds = resolve_sites(model, hookpoint, list(downstream))
    device = next(model.parameters()).device
    batches = [(ids.to(device), mask.to(device)) for ids, mask in batches]
    if not batches:
        raise ConfigError("no token rows to evaluate on")
    clean = []
    for ids, mask in batches:
        keep = keep_mask(ids, mask, specials)
        with hooks.capture(model, [hp, *ds], stop_early=False) as store:
            logits = model(input_ids=ids, attention_mask=mask).logits
        score = mask[:, :-1].bool() & mask[:, 1:].bool()
        acts = {name: t[keep].float() for name, t in store.items()}
        clean.append((keep, score, logits, torch.log_softmax(logits[:, :-1].float(), -1)[score], acts))
    rows = []
    for name, sae in saes.items():
        sae = sae.eval()
        ce_c, ce_s, kls = [], [], []
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
        l0_sum, n = 0.0, 0
        sums = {k: [0.0, 0.0] for k in [hp.name, *(d.name for d in ds)]}  # residual, total
        stats = {k: [] for k in sums}
        for (ids, mask), (keep, score, logits, clean_logp, acts) in zip(batches, clean):
            x = acts[hp.name]
            f = sae.encode(x)
            x_hat = sae.decode(f, ids[keep])
            if sae.cfg.skip:
                x_hat = x_hat + sae.skip_out(x)
            fired |= (f != 0).any(0)
            l0_sum += float((f != 0).sum())
            n += x.shape[0]
            stats[hp.name].append((x_hat, x))
            with spliced(model, hp, keep, x_hat, ds, grad=False) as store:
                out = model(input_ids=ids, attention_mask=mask).logits
            for d in ds:
                stats[d.name].append((store[d.name][keep].float(), acts[d.name]))
            ce_c.append(_ce(logits, ids, score))
            ce_s.append(_ce(out, ids, score))
            kls.append(_kl(clean_logp, out, score))
        for key, pairs in stats.items():  # FVU about the mean over all rows, as the trainer's fvu
            target = torch.cat([t for _, t in pairs])
            pred = torch.cat([p for p, _ in pairs])
            sums[key] = [float((pred - target).pow(2).sum()), float((target - target.mean(0)).pow(2).sum())]
        c, s = float(torch.cat(ce_c).mean()), float(torch.cat(ce_s).mean())
        rows.append(
            E2ERow(
                name=name,
                hookpoint=hp.name,
                ce_clean=c,
                ce_sae=s,
                ce_increase=s - c,
                kl_clean_spliced=float(torch.cat(kls).mean()),
                l0=l0_sum / max(n, 1),
                alive_fraction=float(fired.float().mean()),
                explained_variance=_ev(*sums[hp.name]),
                downstream_explained_variance={d.name: _ev(*sums[d.name]) for d in ds},
                positions=n,
            )
        )
    return rows


def to_markdown(rows: list[E2ERow]) -> str:
    """The comparison as a Markdown table (one column per downstream hookpoint)."""
    ds = list(rows[0].downstream_explained_variance) if rows else []
    head = ["SAE", "CE increase", "KL(clean‖spliced)", "L0", "alive", f"EV {rows[0].hookpoint}" if rows else "EV"]
    head += [f"EV {d}" for d in ds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.name,
            f"{r.ce_increase:.4f}",
            f"{r.kl_clean_spliced:.4f}",
            f"{r.l0:.1f}",
            f"{r.alive_fraction:.2f}",
            f"{r.explained_variance:.3f}",
        ]
        cells += [f"{r.downstream_explained_variance[d]:.3f}" for d in ds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
