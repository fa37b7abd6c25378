"""`saelab elephant`: if "elephant" is exactly grey + big + mammal, does a dictionary have an
elephant latent, and what does a fine-tune do to it?

For each condition (label direction off or on, one dictionary architecture) and seed:

1. build the base model of `saelab.toys.elephant` (its heads fitted by logistic regression) and
   fine-tune it by gradient descent to know `lives_in_zoo` (the elephant and two others);
2. run stage-wise diffing (`saelab.diffing.stages.train_stages`): S on the base model's rows of
   base data, then D (fine-tune data), M (fine-tuned model), F via D and via M, and the control;
3. measure on held-out rows:
   - **the entity latent**: the latent of S whose firing best picks out rows with the elephant
     (F1 of "fires" against "elephant present"), its precision, recall, activation-weighted
     precision, and its decoder's cosine with the elephant's representation and with grey, big
     and mammal. Baseline: a dictionary whose latents are exactly the attribute directions,
     firing with the true attribute coefficients (its best latent for the elephant is grey, big
     or mammal);
   - **shared circuitry**: on the final dictionary (F via D), the latents each head (afraid_of_mice,
     lives_in_zoo) reads most, scored |w . d_j| * mean activation of j; the overlap of the two top
     sets and what the shared latents are. Baselines: the true-factor dictionary (attributes,
     labels, the new direction z) and the entity dictionary (one latent per entity);
   - **rotation**: the entity latent's encoder and decoder cosines across the stages, against
     the control's null (its 1% quantile) and as an empirical p-value among control latents.

Every number is reported per seed and as mean +- sd over seeds.
"""

from __future__ import annotations

import argparse
import html
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from saelab.config import StrictModel
from saelab.errors import ConfigError
from saelab.toys import elephant as E

STAGES = ("S", "D", "M", "F_via_D", "F_via_M")
STAGE_MODEL = {"S": "base", "D": "base", "M": "ft", "F_via_D": "ft", "F_via_M": "ft", "control": "base"}
STAGE_DATA = {"S": "base", "D": "ft", "M": "base", "F_via_D": "ft", "F_via_M": "ft", "control": "base"}
ARCHITECTURES = ("batchtopk", "topk", "relu")
PLOT = "entity_latent.png"


class ElephantExperiment(StrictModel):
    """What `saelab elephant` runs; the defaults take a few minutes on one CPU thread."""

    seeds: PositiveInt = Field(3, description="Seeds per condition (world, fine-tune and dictionary).")
    seed: int = Field(0, description="First seed.")
    labels: list[bool] = Field([False, True], description="Label-direction conditions to run.")
    label_norm: PositiveFloat = Field(1.0, description="Norm of a label direction (attributes have norm 1).")
    architectures: list[str] = Field(["batchtopk", "relu"], description="Dictionaries: batchtopk, topk, relu (L1).")
    d_sae: PositiveInt = Field(64, description="Dictionary width.")
    k: PositiveInt = Field(2, description="k of the TopK family (the world has about 1.2 entities per row).")
    l1_coefficient: PositiveFloat = Field(1.0, description="L1 coefficient of the relu dictionary.")
    steps: PositiveInt = Field(1000, description="Training steps of S.")
    stage_steps: PositiveInt = Field(400, description="Steps of every later stage.")
    batch_size: PositiveInt = Field(256, description="Rows per training batch.")
    lr: PositiveFloat = Field(3e-3, description="Adam learning rate of every stage.")
    eval_rows: PositiveInt = Field(8192, description="Held-out rows per (model, data) pair.")
    top_latents: PositiveInt = Field(3, description="Latents per head in the shared-circuitry overlap.")
    entity_f1: float = Field(0.9, gt=0, le=1, description="F1 at or above which S has an elephant latent.")
    min_fires: PositiveInt = Field(
        500,
        description="Control latents firing fewer training rows than this are left out of the null (rare ones rotate noisily).",
    )
    finetune_steps: PositiveInt = Field(200, description="Gradient steps of the model's fine-tune.")
    world: dict[str, Any] = Field(default_factory=dict, description="Overrides of the world (ElephantSpec fields).")

    def check(self) -> None:
        bad = [a for a in self.architectures if a not in ARCHITECTURES]
        if bad or not self.architectures:
            raise ConfigError(f"architectures: {bad or 'none given'}; choose from {', '.join(ARCHITECTURES)}")
        if not self.labels:
            raise ConfigError("labels: give at least one of false, true")
        for key in ("label", "label_norm", "seed"):
            if key in self.world:
                raise ConfigError(f"world.{key} is set by the experiment (labels, label_norm, seed); remove it")
        E.ElephantSpec.parse({**self.world, "label": True, "label_norm": self.label_norm})
        if self.k > self.d_sae:
            raise ConfigError(f"k={self.k} exceeds d_sae={self.d_sae}")

    def sae_config(self, arch: str, d: int) -> dict[str, Any]:
        base = {"architecture": arch, "d_in": d, "d_sae": self.d_sae}
        return base | ({"l1_coefficient": self.l1_coefficient} if arch == "relu" else {"k": self.k})


# ---------------------------------------------------------------------------- measurements
@torch.no_grad()
def codes(sae: Any, x: torch.Tensor) -> torch.Tensor:
    from saelab.evals.core import eval_mode

    with eval_mode(sae):
        return sae.encode(x.to(sae.W_enc.device)).float().cpu()


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def firing_scores(f: torch.Tensor, present: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per latent: precision, recall and F1 of "fires" (f > 0) against `present` [N] (bool), and
    the share of its activation that falls on `present` rows (activation-weighted precision)."""
    fires = f > 0
    tp = (fires & present[:, None]).sum(0).float()
    precision = tp / fires.sum(0).clamp_min(1)
    recall = tp / present.sum().clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    mass = f.clamp_min(0)
    weighted = mass[present].sum(0) / mass.sum(0).clamp_min(1e-12)
    return {"precision": precision, "recall": recall, "f1": f1, "weighted_precision": weighted}


def candidates(model: E.EntityModel) -> tuple[list[str], torch.Tensor]:
    """Named directions a latent may be: each entity's representation, each attribute, each
    label (when on) and the new fact z (when learned)."""
    names = [f"entity:{n}" for n in model.entity_names] + [f"attribute:{a}" for a in model.attributes]
    dirs = [model.representations(), model.attribute_directions]
    if model.labels.abs().sum() > 0:
        names += [f"label:{n}" for n in model.entity_names]
        dirs.append(model.labels)
    if model.new_fact.abs().sum() > 0:
        names.append("new_fact:z")
        dirs.append(model.new_fact[None, :])
    return names, _unit(torch.cat(dirs).detach())


def latent_kind(model: E.EntityModel, decoder: torch.Tensor) -> list[tuple[str, float]]:
    """Per decoder row: the closest named direction and its cosine."""
    names, dirs = candidates(model)
    cos = _unit(decoder.detach().float()) @ dirs.t()
    best = cos.max(1)
    return [(names[int(i)], float(v)) for v, i in zip(best.values, best.indices, strict=True)]


def entity_latent(f: torch.Tensor, decoder: torch.Tensor, model: E.EntityModel, batch, latent: int | None = None):
    """The elephant latent of a dictionary (codes f on `batch`, decoder rows [F, d]): the latent
    `latent`, or the one with the best F1 for elephant rows; what it scores and points at."""
    present = batch.features[:, model.elephant] > 0
    s = firing_scores(f, present)
    j = int(s["f1"].argmax()) if latent is None else latent
    dec = _unit(decoder.detach().float())
    h = _unit(model.representations()[model.elephant].detach())
    attr = {a: float(dec[j] @ model.attribute_direction(a)) for a in E.ELEPHANT}
    kind, kind_cos = latent_kind(model, decoder[j : j + 1])[0]
    return {
        "latent": j,
        **{k: float(v[j]) for k, v in s.items()},
        "decoder_cos_elephant": float(dec[j] @ h),
        "max_decoder_cos_elephant": float((dec @ h).max()),
        "decoder_cos_attributes": attr,  # of this latent
        "attribute_latent_cos": {a: float((dec @ model.attribute_direction(a)).max()) for a in E.ELEPHANT},
        "kind": kind,
        "kind_cos": kind_cos,
        "firing_rate": float((f[:, j] > 0).float().mean()),
    }


def factor_dictionary(model: E.EntityModel, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The model's true factors as a dictionary: (decoder [F, d], codes [N, F], names): the
    attributes (coefficient: the summed magnitude of the row's entities that have it), the labels
    (when on) and z (when learned)."""
    dec, code, names = [model.attribute_directions], [features @ model.membership], list(model.attributes)
    if model.labels.abs().sum() > 0:
        dec.append(model.labels)
        code.append(features)
        names += [f"label:{n}" for n in model.entity_names]
    if model.new_fact.abs().sum() > 0:
        dec.append(model.new_fact[None, :])
        code.append(features @ model.zoo[:, None])
        names.append("new_fact:z")
    return torch.cat(dec).detach(), torch.cat(code, 1), names


def entity_dictionary(model: E.EntityModel, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One latent per entity, along its representation, firing with its magnitude."""
    return model.representations().detach(), features, list(model.entity_names)


def circuit_latents(w: torch.Tensor, decoder: torch.Tensor, f: torch.Tensor, top: int) -> dict[str, Any]:
    """The latents a linear read-out w reads most: score_j = |w . d_j| * mean activation of j."""
    score = (decoder.detach().float() @ w).abs() * f.clamp_min(0).mean(0)
    total = float(score.sum())
    order = score.argsort(descending=True)[:top].tolist()
    return {"top": order, "shares": [float(score[j]) / max(total, 1e-12) for j in order]}


def circuit_overlap(model: E.EntityModel, decoder, f, top: int, names: list[str], elephant_latent: int | None):
    """afraid_of_mice against lives_in_zoo on one dictionary: top latents, their overlap, and the
    share of each head's score on the elephant latent."""
    heads = {h: circuit_latents(model.heads[h][0], decoder, f, top) for h in (E.OLD_FACT, E.NEW_FACT)}
    a, b = set(heads[E.OLD_FACT]["top"]), set(heads[E.NEW_FACT]["top"])
    shared = sorted(a & b)
    out = {
        "heads": {h: {**v, "names": [names[j] for j in v["top"]]} for h, v in heads.items()},
        "jaccard": len(a & b) / len(a | b),
        "shared": [names[j] for j in shared],
    }
    if elephant_latent is not None:
        for h in heads:
            score = (decoder.detach().float() @ model.heads[h][0]).abs() * f.clamp_min(0).mean(0)
            out[f"{h}_share_on_elephant_latent"] = float(score[elephant_latent] / score.sum().clamp_min(1e-12))
        out["elephant_latent_shared"] = elephant_latent in shared
    return out


def rotation(res: Any, latent: int) -> dict[str, Any]:
    """The latent's cosines on every transition, the control's null, and its empirical p-value
    (the fraction of control latents that rotated at least as much)."""
    from saelab.diffing.stages import KINDS, TRANSITIONS

    control = res.cosines("S", "control")
    alive = res.alive("control")
    out: dict[str, Any] = {"null": {k: res.null(k) for k in KINDS}}
    for name, (a, b) in TRANSITIONS.items():
        cos = res.cosines(a, b)
        row = {}
        for k in KINDS:
            c = float(cos[k][latent])
            ref = control[k][alive & torch.isfinite(control[k])]
            row[k] = c
            row[f"{k}_beyond_null"] = bool(c < out["null"][k])
            row[f"{k}_control_fraction"] = (1 + int((ref <= c).sum())) / (1 + ref.numel())
        out[name] = row
    return out


# ---------------------------------------------------------------------------- one condition
def run_condition(cfg: ElephantExperiment, label: bool, arch: str, seed: int) -> dict[str, Any]:
    """One (label, architecture, seed): the models, the stages and every measurement."""
    from saelab.diffing.stages import train_stages

    spec = E.ElephantSpec.parse({**cfg.world, "label": label, "label_norm": cfg.label_norm, "seed": seed})
    base = E.base_model(spec, seed=seed)
    tuned = E.finetune(base, steps=cfg.finetune_steps, seed=seed)
    ft = tuned.model
    models = {"base": base, "ft": ft}
    sources = {
        f"{m}/{d}": E.source(models[m], d, cfg.batch_size, seed=seed + 101 * i)
        for i, (m, d) in enumerate((("base", "base"), ("base", "ft"), ("ft", "base"), ("ft", "ft")))
    }
    train = {"lr": cfg.lr, "progress": False, "dead_after_tokens": 50_000}
    res = train_stages(
        cfg.sae_config(arch, spec.d),
        sources,
        steps=cfg.steps,
        stage_steps=cfg.stage_steps,
        train=train,
        seed=seed,
        min_fires=cfg.min_fires,
    )
    held = {(m, d): E.rows(models[m], d, cfg.eval_rows, seed) for m in models for d in ("base", "ft")}

    def on(stage: str):
        batch = held[(STAGE_MODEL[stage], STAGE_DATA[stage])]
        sae = res.saes[stage]
        return batch, codes(sae, batch.x), sae.W_dec.detach().float().cpu()

    batch, f_s, dec_s = on("S")
    ent = entity_latent(f_s, dec_s, base, batch)
    j = ent["latent"]
    attr_dec, attr_code, _ = factor_dictionary(base, batch.features)
    n_attr = len(base.attributes)
    baseline = entity_latent(attr_code[:, :n_attr], attr_dec[:n_attr], base, batch)
    stages = {}
    for stage in STAGES:
        b, f, dec = on(stage)
        model = models[STAGE_MODEL[stage]]
        stages[stage] = {
            "tracked": entity_latent(f, dec, model, b, latent=j),  # S's elephant latent, here
            "best": entity_latent(f, dec, model, b),  # this stage's own best
            "fvu": float(((codes_decode(res.saes[stage], f) - b.x) ** 2).sum() / ((b.x - b.x.mean(0)) ** 2).sum()),
            "l0": float((f > 0).float().sum(1).mean()),
        }
    b, f_f, dec_f = on("F_via_D")
    f_ent = stages["F_via_D"]["best"]["latent"]
    names_f = [k for k, _ in latent_kind(ft, dec_f)]
    fd, fc, fnames = factor_dictionary(ft, b.features)
    ed, ec, enames = entity_dictionary(ft, b.features)
    circuits = {
        "F_via_D": circuit_overlap(ft, dec_f, f_f, cfg.top_latents, names_f, f_ent),
        "factor_baseline": circuit_overlap(ft, fd, fc, cfg.top_latents, fnames, None),
        "entity_baseline": circuit_overlap(ft, ed, ec, cfg.top_latents, enames, ft.elephant),
    }
    return {
        "label": label,
        "architecture": arch,
        "seed": seed,
        "model": {
            "base_head_accuracy": E.head_accuracy(base, "base", seed),
            "ft_head_accuracy": tuned.accuracy,
            "new_fact_norm": tuned.new_fact_norm,
            "elephant_norm": float(base.representations()[0].norm()),
            "zoo": [base.entity_names[e] for e in base.zoo_entities],
        },
        "entity": ent,
        "has_entity_latent": ent["f1"] >= cfg.entity_f1,
        "attribute_baseline": baseline,
        "stages": stages,
        "circuits": circuits,
        "rotation": rotation(res, j)
        | {"representation_cos": float(_cos(base.representations()[0], ft.representations()[0]))},
        "stage_null": res.as_dict(top=5)["null"],
        "stage_summary": res.summary(),
    }


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_unit(a.detach()) * _unit(b.detach())).sum(-1)


@torch.no_grad()
def codes_decode(sae: Any, f: torch.Tensor) -> torch.Tensor:
    from saelab.evals.core import eval_mode

    with eval_mode(sae):
        return sae.decode(f.to(sae.W_dec.device)).float().cpu()


# ---------------------------------------------------------------------------- aggregate and report
SUMMARY = {
    "entity_f1": lambda r: r["entity"]["f1"],
    "entity_precision": lambda r: r["entity"]["precision"],
    "entity_recall": lambda r: r["entity"]["recall"],
    "entity_weighted_precision": lambda r: r["entity"]["weighted_precision"],
    "entity_decoder_cos": lambda r: r["entity"]["decoder_cos_elephant"],
    "entity_max_attribute_cos": lambda r: max(r["entity"]["decoder_cos_attributes"].values()),
    "has_entity_latent": lambda r: float(r["has_entity_latent"]),
    "attribute_latent_cos": lambda r: statistics.fmean(r["entity"]["attribute_latent_cos"].values()),
    "baseline_f1": lambda r: r["attribute_baseline"]["f1"],
    "baseline_precision": lambda r: r["attribute_baseline"]["precision"],
    "baseline_decoder_cos": lambda r: r["attribute_baseline"]["decoder_cos_elephant"],
    "tracked_f1_F": lambda r: r["stages"]["F_via_D"]["tracked"]["f1"],
    "best_f1_F": lambda r: r["stages"]["F_via_D"]["best"]["f1"],
    "circuit_jaccard": lambda r: r["circuits"]["F_via_D"]["jaccard"],
    "factor_baseline_jaccard": lambda r: r["circuits"]["factor_baseline"]["jaccard"],
    "entity_baseline_jaccard": lambda r: r["circuits"]["entity_baseline"]["jaccard"],
    "elephant_latent_shared": lambda r: float(r["circuits"]["F_via_D"]["elephant_latent_shared"]),
    "circuit_attribute_latents": lambda r: _attribute_fraction(r["circuits"]["F_via_D"]),
    "mice_share_on_entity_latent": lambda r: r["circuits"]["F_via_D"][f"{E.OLD_FACT}_share_on_elephant_latent"],
    "zoo_share_on_entity_latent": lambda r: r["circuits"]["F_via_D"][f"{E.NEW_FACT}_share_on_elephant_latent"],
    "cos_S_M_encoder": lambda r: r["rotation"]["S->M"]["encoder"],
    "cos_S_M_decoder": lambda r: r["rotation"]["S->M"]["decoder"],
    "cos_D_F_encoder": lambda r: r["rotation"]["D->F_via_D"]["encoder"],
    "cos_D_F_decoder": lambda r: r["rotation"]["D->F_via_D"]["decoder"],
    "rotated_S_M": lambda r: float(r["rotation"]["S->M"]["decoder_beyond_null"]),
    "rotated_D_F": lambda r: float(r["rotation"]["D->F_via_D"]["decoder_beyond_null"]),
    "representation_cos": lambda r: r["rotation"]["representation_cos"],
    "tracked_cos_F": lambda r: r["stages"]["F_via_D"]["tracked"]["decoder_cos_elephant"],
    "null_encoder": lambda r: r["rotation"]["null"]["encoder"],
    "null_decoder": lambda r: r["rotation"]["null"]["decoder"],
    "p_S_M_decoder": lambda r: r["rotation"]["S->M"]["decoder_control_fraction"],
    "p_D_F_decoder": lambda r: r["rotation"]["D->F_via_D"]["decoder_control_fraction"],
    "fvu_S": lambda r: r["stages"]["S"]["fvu"],
    "l0_S": lambda r: r["stages"]["S"]["l0"],
    "new_fact_norm": lambda r: r["model"]["new_fact_norm"],
    "mice_accuracy": lambda r: r["model"]["base_head_accuracy"][E.OLD_FACT],
    "zoo_accuracy": lambda r: r["model"]["ft_head_accuracy"][E.NEW_FACT],
}


def _attribute_fraction(circuit: dict[str, Any]) -> float:
    """Of both heads' top latents, the fraction whose decoder is closest to an attribute direction."""
    names = [n for h in circuit["heads"].values() for n in h["names"]]
    return sum(n.startswith("attribute:") for n in names) / len(names)


def _stats(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per condition (label, architecture): mean, sd, min and max over seeds of every SUMMARY value."""
    conds: dict[tuple[bool, str], list[dict]] = {}
    for r in runs:
        conds.setdefault((r["label"], r["architecture"]), []).append(r)
    return [
        {"label": label, "architecture": arch, "seeds": len(rs)}
        | {name: _stats([get(r) for r in rs]) for name, get in SUMMARY.items()}
        for (label, arch), rs in conds.items()
    ]


def _pm(s: dict[str, float]) -> str:
    return "nan" if s["n"] == 0 else f"{s['mean']:.3f} ± {s['sd']:.3f}"


TABLE = {
    "entity F1 (S)": "entity_f1",
    "precision": "entity_precision",
    "recall": "entity_recall",
    "weighted precision": "entity_weighted_precision",
    "decoder cos(elephant)": "entity_decoder_cos",
    "seeds with entity latent": "has_entity_latent",
    "best attribute-latent cos": "attribute_latent_cos",
    "attribute-dictionary F1": "baseline_f1",
}
CIRCUIT_TABLE = {
    "top-k Jaccard mice/zoo": "circuit_jaccard",
    "seeds sharing the elephant latent": "elephant_latent_shared",
    "attribute latents among top": "circuit_attribute_latents",
    "factor baseline": "factor_baseline_jaccard",
    "entity baseline": "entity_baseline_jaccard",
    "mice share on entity latent": "mice_share_on_entity_latent",
    "zoo share on entity latent": "zoo_share_on_entity_latent",
}
ROTATION_TABLE = {
    "cos S→M enc": "cos_S_M_encoder",
    "cos S→M dec": "cos_S_M_decoder",
    "cos D→F enc": "cos_D_F_encoder",
    "cos D→F dec": "cos_D_F_decoder",
    "control null enc": "null_encoder",
    "control null dec": "null_decoder",
    "p S→M dec": "p_S_M_decoder",
    "p D→F dec": "p_D_F_decoder",
    "cos h_base·h_ft": "representation_cos",
    "F latent cos h_ft": "tracked_cos_F",
    "seeds rotated S→M": "rotated_S_M",
    "seeds rotated D→F": "rotated_D_F",
    "tracked F1 in F": "tracked_f1_F",
}


def _rows(summary: list[dict], table: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"label": "on" if c["label"] else "off", "dictionary": c["architecture"]}
        | {col: _pm(c[key]) for col, key in table.items()}
        for c in summary
    ]


def conclusions(summary: list[dict], cfg: ElephantExperiment) -> list[str]:
    """Plain sentences, one per condition, read off the numbers (whichever way they come out)."""
    out = []
    for c in summary:
        lab = "with" if c["label"] else "without"
        has = c["has_entity_latent"]
        n = c["seeds"]
        k = round(has["mean"] * n)
        f1, base = c["entity_f1"], c["baseline_f1"]
        verdict = (
            "has an elephant latent"
            if k == n
            else ("has no elephant latent" if k == 0 else f"has an elephant latent in {k} of {n} seeds")
        )
        rot = [round(c[key]["mean"] * n) for key in ("rotated_S_M", "rotated_D_F")]
        out.append(
            f"{c['architecture']} {lab} a label direction: S {verdict} (firing F1 >= {cfg.entity_f1}); best "
            f"elephant F1 {_pm(f1)} (precision {_pm(c['entity_precision'])}, recall {_pm(c['entity_recall'])}) "
            f"against {_pm(base)} for the attribute dictionary; that latent's decoder has cosine "
            f"{_pm(c['entity_decoder_cos'])} with the elephant (the best latent for grey, big or mammal "
            f"{_pm(c['attribute_latent_cos'])}). On the fine-tuned dictionary, afraid_of_mice's and lives_in_zoo's "
            f"top-{cfg.top_latents} latents overlap with Jaccard {_pm(c['circuit_jaccard'])} (true factors "
            f"{_pm(c['factor_baseline_jaccard'])}, one latent per entity {_pm(c['entity_baseline_jaccard'])}); "
            f"the elephant latent is in both top sets in {round(c['elephant_latent_shared']['mean'] * n)} of {n} seeds "
            f"and {c['circuit_attribute_latents']['mean']:.0%} of the top latents are attribute latents. "
            f"The elephant latent's decoder rotates beyond the control's null on S→M in {rot[0]} of {n} seeds "
            f"(cosine {_pm(c['cos_S_M_decoder'])}) and on D→F in {rot[1]} of {n} "
            f"({_pm(c['cos_D_F_decoder'])}; null {_pm(c['null_decoder'])})."
        )
    return out


def plot(summary: list[dict], path: Path) -> None:
    from saelab.io.atomic import save_figure
    from saelab.plotting import new_figure, plt

    fig, axes = new_figure(ncols=2, size=(6.0, 4.0))
    names = [f"{c['architecture']}\nlabel {'on' if c['label'] else 'off'}" for c in summary]
    x = range(len(summary))
    width = 0.27

    def bars(ax, series: tuple[tuple[str, str], ...]) -> None:
        """One bar per condition for each (summary key, legend label), with its seed spread."""
        for i, (key, lab) in enumerate(series):
            ax.bar(
                [v + (i - 1) * width for v in x],
                [c[key]["mean"] for c in summary],
                width,
                yerr=[c[key]["sd"] for c in summary],
                label=lab,
                capsize=3,
            )
        ax.set_xticks(list(x), names, fontsize=8)

    ax = axes[0][0]
    bars(ax, (("entity_f1", "F1"), ("entity_precision", "precision"), ("baseline_f1", "attribute dict. F1")))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("elephant latent of S (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    bars(ax, (("cos_S_M_decoder", "S→M"), ("cos_D_F_decoder", "D→F"), ("null_decoder", "control null")))
    ax.set_ylabel("decoder cosine of the elephant latent")
    lo = min(c[k]["min"] for c in summary for k in ("cos_S_M_decoder", "cos_D_F_decoder", "null_decoder"))
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def report_markdown(record: dict[str, Any]) -> str:
    cfg = record["config"]
    s = record["summary"]
    lines = [
        "# The elephant experiment",
        "",
        "Entities are bundles of one colour, one size and one class; the elephant is grey + big + mammal. "
        "The model represents an entity as the sum of its attribute directions, with or without a label "
        f"direction of norm {cfg['label_norm']} of its own. `afraid_of_mice` is a logistic-regression read-out "
        "that fires for the elephant; the fine-tune learns `lives_in_zoo` (the elephant and two others) by "
        "gradient descent as a new direction z and a new head, and its data over-samples the zoo entities. "
        f"Dictionaries: d_sae {cfg['d_sae']}, k {cfg['k']} (TopK family) or L1 {cfg['l1_coefficient']} (relu); "
        f"S {cfg['steps']} steps, each later stage {cfg['stage_steps']}; {cfg['seeds']} seeds; mean ± sd over seeds.",
        "",
        "## Does the dictionary have an elephant latent?",
        "",
        'The latent of S with the best F1 of "fires" against "the elephant is in the row" on held-out rows. '
        "The attribute dictionary (latents exactly the attribute directions, firing with the true coefficients) "
        "is the trivial baseline: its best latent for the elephant is grey, big or mammal.",
        "",
        _md(_rows(s, TABLE)),
        "## Do the old and the new circuit share a latent?",
        "",
        f"On the final dictionary (F via D), each head's top-{cfg['top_latents']} latents by |w · d_j| × mean "
        "activation; Jaccard overlap of the two sets and each head's share of its score on F's elephant latent. "
        "Baselines: the true-factor dictionary (attributes, labels, z) and the entity dictionary (one latent per entity).",
        "",
        _md(_rows(s, CIRCUIT_TABLE)),
        "## How far does the elephant latent rotate?",
        "",
        "Cosine of S's elephant latent between stages (encoder and decoder); the control (S trained on, "
        "nothing changed) gives the null (the 1% quantile of its cosines over latents that fired at least "
        f"{cfg['min_fires']} times) and the empirical p-value (the fraction of those control latents that rotated "
        "at least as much). For scale: the cosine between the elephant's representation before and after the "
        "fine-tune (h_base·h_ft), and the cosine of that latent's decoder in F with h_ft.",
        "",
        _md(_rows(s, ROTATION_TABLE)),
        "## Conclusion",
        "",
        *[f"- {c}" for c in record["conclusions"]],
        "",
        f"Wall time {record['wall_s']:.0f} s. Plot: `{PLOT}`. Every seed's numbers are in `results.json`.",
        "",
    ]
    return "\n".join(lines)


def _md(rows: list[dict]) -> str:
    from saelab.report import markdown_table

    return markdown_table(rows)


def report_html(record: dict[str, Any]) -> str:
    s = record["summary"]
    esc = html.escape

    def table(rows: list[dict]) -> str:
        cols = list(rows[0])
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>The elephant experiment</title>"
        "<style>body{font-family:sans-serif;max-width:75em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>"
        "<h1>The elephant experiment</h1>"
        "<h2>Does the dictionary have an elephant latent?</h2>"
        + table(_rows(s, TABLE))
        + "<h2>Do the old and the new circuit share a latent?</h2>"
        + table(_rows(s, CIRCUIT_TABLE))
        + "<h2>How far does the elephant latent rotate?</h2>"
        + table(_rows(s, ROTATION_TABLE))
        + f"<p><img src='{PLOT}' alt='elephant latent scores'></p><h2>Conclusion</h2><ul>"
        + "".join(f"<li>{esc(c)}</li>" for c in record["conclusions"])
        + f"</ul><p>Wall time {record['wall_s']:.0f} s.</p></body></html>"
    )


def run_elephant(cfg: ElephantExperiment | dict[str, Any], out: str | Path | None = None) -> dict[str, Any]:
    """Every condition and seed; writes results.json, report.md, report.html and the plot into `out`."""
    from saelab.io.atomic import ensure_folder
    from saelab.progress import bar

    cfg = cfg if isinstance(cfg, ElephantExperiment) else ElephantExperiment.parse(dict(cfg))
    cfg.check()
    folder = ensure_folder(out, "report folder") if out is not None else None
    t0 = time.perf_counter()
    plan = [(lab, arch, cfg.seed + s) for lab in cfg.labels for arch in cfg.architectures for s in range(cfg.seeds)]
    runs = []
    with bar(total=len(plan), desc="elephant", unit="run") as progress:
        for lab, arch, seed in plan:
            runs.append(run_condition(cfg, lab, arch, seed))
            progress.update(1)
    record = {"config": cfg.model_dump(), "runs": runs, "wall_s": time.perf_counter() - t0}
    return write_outputs(record, folder)


def write_outputs(record: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """Summarise a record's runs (mean, sd over seeds), state the conclusions, and write
    results.json, report.md, report.html and the plot into `folder` (when given)."""
    from saelab.diffing.report import _finite_or_null
    from saelab.io.atomic import write_json, write_text

    cfg = ElephantExperiment.parse(dict(record["config"]))
    summary = aggregate(record["runs"])
    record = _finite_or_null(record | {"summary": summary, "conclusions": conclusions(summary, cfg)})
    if folder is not None:
        write_json(folder / "results.json", record)
        write_text(folder / "report.md", report_markdown(record))
        write_text(folder / "report.html", report_html(record))
        plot(summary, folder / PLOT)
    return record


# ---------------------------------------------------------------------------- the command
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "elephant",
        help="If elephant = grey + big + mammal, does a dictionary have an elephant latent; what does a fine-tune do?",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, default=Path("runs/elephant"), help="Report folder (default runs/elephant).")
    p.add_argument("--seeds", type=int, default=3, help="Seeds per condition (default 3).")
    p.add_argument("--seed", type=int, default=0, help="First seed (default 0).")
    p.add_argument(
        "--architectures", nargs="+", default=["batchtopk", "relu"], help="Dictionaries (default: batchtopk relu)."
    )
    p.add_argument("--steps", type=int, default=1000, help="Training steps of S (default 1000).")
    p.add_argument("--stage-steps", type=int, default=400, help="Steps of every later stage (default 400).")
    p.add_argument("--label-norm", type=float, default=1.0, help="Norm of the label direction (default 1).")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from saelab.report import text_table

    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads}: need at least 1 thread")
    torch.set_num_threads(args.threads)
    cfg = ElephantExperiment.parse(
        {
            "seeds": args.seeds,
            "seed": args.seed,
            "architectures": list(args.architectures),
            "steps": args.steps,
            "stage_steps": args.stage_steps,
            "label_norm": args.label_norm,
        }
    )
    record = run_elephant(cfg, args.out)
    print(text_table(_rows(record["summary"], TABLE)), end="")
    for line in record["conclusions"]:
        print(f"- {line}")
    print(f"wrote {args.out}/results.json, report.md, report.html and {PLOT} ({record['wall_s']:.0f} s)")
    return 0
