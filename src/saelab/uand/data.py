"""The U-AND world: s-sparse boolean inputs and one boolean target for every pair i < j.

A truth table is four 0/1 outputs in the order (x_i, x_j) = 00, 01, 10, 11, so AND is "0001",
OR "0111", XOR "0110", NAND "1110". The cell of an output is 2*x_i + x_j; metrics split errors by
cell because a rare cell (both inputs on) is exactly where a wrong circuit fails.

Pairs are enumerated once with `torch.triu_indices` and every target is a gather over them, so no
code here loops over the C(m, 2) outputs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from saelab.errors import ConfigError
from saelab.uand.config import UANDConfig

NAMED_TABLES = {
    "and": "0001",
    "or": "0111",
    "xor": "0110",
    "nand": "1110",
    "nor": "1000",
    "xnor": "1001",
}


def parse_truth_table(spec: str, field_name: str = "op") -> torch.Tensor:
    """A named operation or four 0/1 characters (order 00, 01, 10, 11) as a float tensor [4]."""
    text = str(spec).strip().lower()
    bits = NAMED_TABLES.get(text, text)
    if len(bits) != 4 or any(ch not in "01" for ch in bits):
        raise ConfigError(
            f"{field_name}={spec!r} is not a truth table: give one of {sorted(NAMED_TABLES)} or four "
            "0/1 characters for the inputs 00, 01, 10, 11 (AND is '0001')"
        )
    return torch.tensor([float(ch) for ch in bits])


def table_name(table: torch.Tensor) -> str:
    bits = "".join(str(int(v)) for v in table.tolist())
    for name, value in NAMED_TABLES.items():
        if value == bits:
            return name.upper()
    return bits


def table_coefficients(table: torch.Tensor) -> tuple[float, float, float, float]:
    """(t00, a, b, e) with f(u, v) = t00 + a*u + b*v + e*u*v: the table as a polynomial.

    The polynomial form is what makes any table cheap: targets are float arithmetic on gathered
    columns, and a least-squares read-out needs only the moments of h with 1, x_i and x_i*x_j.
    """
    t00, t01, t10, t11 = (float(v) for v in table)
    return t00, t10 - t00, t01 - t00, t11 - t10 - t01 + t00


def apply_table(table: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The truth table applied elementwise to 0/1 tensors u (first input) and v (second)."""
    t00, a, b, e = table_coefficients(table)
    out = u * (a + e * v) if (a or e) else torch.zeros_like(u)
    if b:
        out = out + b * v
    return out + t00 if t00 else out


@lru_cache(maxsize=8)
def pair_indices(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of all pairs i < j, in row-major order; output k is pair (I[k], J[k])."""
    i, j = torch.triu_indices(m, m, offset=1)
    return i, j


def pair_index(i: torch.Tensor, j: torch.Tensor, m: int) -> torch.Tensor:
    """Position of pair (i, j), i < j, in the `pair_indices(m)` order."""
    return i * (2 * m - i - 1) // 2 + (j - i - 1)


def all_inputs(m: int, s: int) -> torch.Tensor:
    """Every input with exactly s of m inputs on, once each: [C(m, s), m] float 0/1.

    Under sparsity "exact" all of them are equally likely, so metrics over this set are the
    exact expected metrics (no sampling error).
    """
    idx = torch.combinations(torch.arange(m), s) if s > 1 else torch.arange(m)[:, None]
    return torch.zeros(len(idx), m).scatter_(1, idx, 1.0)


def active_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, pair) of every pair with both inputs on, in O(n s^2) instead of O(n m^2).

    Each row's active inputs are padded to the largest count k in the batch; all k x k
    combinations with a < b and both real are kept.
    """
    n, m = x.shape
    on = x > 0
    k = int(on.sum(1).max()) if n else 0
    if k < 2:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    # Active column indices first (sorted ascending), padding (m) after.
    cols = torch.where(on, torch.arange(m), m).sort(dim=1).values[:, :k]  # [n, k]
    a, b = torch.triu_indices(k, k, offset=1)
    ca, cb = cols[:, a], cols[:, b]  # [n, C(k,2)], ca < cb
    valid = cb < m
    rows = torch.arange(n)[:, None].expand_as(ca)[valid]
    return rows, pair_index(ca[valid], cb[valid], m)


def touched_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, pair) of every pair with at least one input on: all outputs not in cell 00.

    About s*m per row instead of C(m, 2); the rest share cell 00 and can be sampled.
    """
    n, m = x.shape
    on = x > 0
    k = int(on.sum(1).max()) if n else 0
    if k == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    a = torch.where(on, torch.arange(m), m).sort(dim=1).values[:, :k, None]  # [n, k, 1], padding = m
    c = torch.arange(m)[None, None, :]
    # every partner c of an active a, counting a pair of two actives once (from its smaller end)
    keep = (a < m) & (c != a) & ~(on[:, None, :] & (c < a))
    rows = torch.arange(n)[:, None, None].expand(n, k, m)[keep]
    a, c = a.expand(n, k, m)[keep], c.expand(n, k, m)[keep]
    return rows, pair_index(torch.minimum(a, c), torch.maximum(a, c), m)


class DataConfig(UANDConfig):
    """The task: which inputs occur and which boolean function of each pair is the target."""

    m: int = Field(100, ge=2, description="number of boolean input features (at least 2, to have a pair)")
    s: int = Field(3, ge=1, description="sparsity: active inputs per sample (exact, cap, or mean)")
    sparsity: Literal["exact", "at_most", "bernoulli"] = Field(
        "exact",
        description="exact: exactly s on; at_most: Bernoulli(s/m) capped at s; bernoulli: Bernoulli(s/m)",
    )
    op: str = Field("and", description="truth table per pair: and/or/xor/nand/nor/xnor or e.g. '0001'")
    d0: int | None = Field(None, ge=1, description="if set, inputs are stored in superposition in d0 < m dimensions")
    noise: float = Field(0.0, ge=0, allow_inf_nan=False, description="std of Gaussian noise added to the model's input")
    circuit_op: str | None = Field(
        None, description="two-step circuit: target = circuit_op(op(x_i, x_j), x_k) for a fixed random k per pair"
    )
    seed: int = Field(0, description="seed of the fixed parts of the world (embedding, wiring)")

    @field_validator("s")
    @classmethod
    def _s_at_most_m(cls, s: int, info: ValidationInfo) -> int:
        m = info.data.get("m")
        if m is not None and s > m:
            raise ValueError(f"s={s} exceeds m={m}: at most m inputs can be active; lower s")
        return s

    @field_validator("op")
    @classmethod
    def _op_is_a_table(cls, op: str) -> str:
        parse_truth_table(op, "op")
        return op

    @field_validator("circuit_op")
    @classmethod
    def _circuit_needs_a_third_input(cls, op: str | None, info: ValidationInfo) -> str | None:
        if op is not None:
            parse_truth_table(op, "circuit_op")
            if info.data.get("m", 3) < 3:
                raise ValueError("circuit_op needs m >= 3 so each pair has a third input")
        return op


class UANDTask:
    """Samples inputs and computes targets for one `DataConfig`.

    The fixed parts of the world (superposition embedding, third input of each circuit output)
    are drawn once from `config.seed`; per-batch sampling takes its own generator so that
    training and evaluation streams are independent.
    """

    def __init__(self, config: DataConfig):
        self.config = config
        self.m = config.m
        self.table = parse_truth_table(config.op, "op")
        self.pairs = pair_indices(config.m)
        world = torch.Generator().manual_seed(config.seed)
        self.embed: torch.Tensor | None = None
        if config.d0 is not None:
            # Random unit directions are near-orthogonal (|cos| ~ 1/sqrt(d0)): the usual
            # superposition picture, with E^T E ~ I so a linear read-back recovers x approximately.
            e = torch.randn(config.d0, config.m, generator=world)
            self.embed = e / e.norm(dim=0, keepdim=True)
        self.circuit_table: torch.Tensor | None = None
        self.third: torch.Tensor | None = None
        if config.circuit_op is not None:
            self.circuit_table = parse_truth_table(config.circuit_op, "circuit_op")
            i, j = self.pairs
            # k uniform over the inputs other than i and j, drawn for all pairs at once.
            k = torch.randint(0, config.m - 2, (len(i),), generator=world)
            lo, hi = torch.minimum(i, j), torch.maximum(i, j)
            k = k + (k >= lo).long()
            k = k + (k >= hi).long()
            self.third = k

    @property
    def n_in(self) -> int:
        """Width of the model's input: m for basis-aligned inputs, d0 in superposition."""
        return self.m if self.embed is None else self.embed.shape[0]

    @property
    def n_pairs(self) -> int:
        return len(self.pairs[0])

    def with_op(self, op: str) -> UANDTask:
        """The same world (embedding, wiring, inputs) with another truth table per pair."""
        cfg = DataConfig(**{**self.config.to_dict(), "op": op})
        return UANDTask(cfg)

    def sample_x(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Boolean inputs [n, m] as float 0/1."""
        cfg = self.config
        if cfg.sparsity == "exact":
            idx = torch.rand(n, cfg.m, generator=generator).topk(cfg.s, dim=1).indices
            return torch.zeros(n, cfg.m).scatter_(1, idx, 1.0)
        on = torch.rand(n, cfg.m, generator=generator) < cfg.s / cfg.m
        if cfg.sparsity == "bernoulli":
            return on.float()
        # at_most: keep a random s of the active inputs when more than s are on.
        priority = torch.rand(n, cfg.m, generator=generator) + on.float()  # actives rank first
        keep = torch.zeros_like(on).scatter_(1, priority.topk(cfg.s, dim=1).indices, True)
        return (on & keep).float()

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the model sees: x itself or its embedding E x, plus optional Gaussian noise."""
        inputs = x if self.embed is None else x @ self.embed.T
        if self.config.noise > 0:
            noise = torch.randn(inputs.shape, generator=generator) * self.config.noise
            inputs = inputs + noise
        return inputs

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, inputs): clean booleans [n, m] and the model's input [n, n_in]."""
        x = self.sample_x(n, generator)
        return x, self.encode(x, generator)

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """Cell index 2*x_i + x_j of every output, [n, P] long."""
        i, j = self.pairs
        return (2 * x[:, i] + x[:, j]).long()

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Targets [n, P]: each pair's truth table, then the circuit step if there is one."""
        i, j = self.pairs
        y = apply_table(self.table, x[:, i], x[:, j])
        if self.circuit_table is not None:
            y = apply_table(self.circuit_table, y, x[:, self.third])
        return y

    def targets_at(self, x: torch.Tensor, rows: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Targets of the given (row, pair) entries only (broadcasting rows against pairs)."""
        i, j = self.pairs
        y = apply_table(self.table, x[rows, i[pairs]], x[rows, j[pairs]])
        if self.circuit_table is not None:
            y = apply_table(self.circuit_table, y, x[rows, self.third[pairs]])
        return y

    def positive_rate(self) -> float:
        """Expected fraction of outputs with target 1 (for reports; estimated for non-exact modes)."""
        gen = torch.Generator().manual_seed(12345)
        x = self.sample_x(512, gen)
        return float(self.targets(x).mean())
