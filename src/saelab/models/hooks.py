"""Read activations from any `torch.nn.Module` (a `transformers` model in practice) by module path.

A hookpoint is a module path from `model.named_modules()` (`model.layers.6`), optionally with
glob patterns (`model.layers.*`: `*` stays within one dotted component, `**` crosses them) and a `:input` suffix to read what goes *into* the module rather
than what comes out (`model.layers.6.mlp:input` is the MLP input, what a transcoder encodes).
A *site* is the name a batch gives one harvested tensor: the hookpoint's name, or
`alias/hookpoint` (`ft/model.layers.6`) when one source runs the same tokens through several models.
Every hookpoint is read in one forward pass, and the pass is stopped as soon as every hooked
module has run, so harvesting layer 6 of a 30-layer model costs about 7 layers of compute.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import ConfigError

_NUMERIC = re.compile(r"\.(\d+)(?=\.|$)")


@dataclass(frozen=True)
class Hookpoint:
    """One resolved hookpoint: a module path and whether its input or output is read."""

    module: str
    io: str = "output"  # "output" | "input"

    @property
    def name(self) -> str:
        return self.module if self.io == "output" else f"{self.module}:input"

    def __str__(self) -> str:
        return self.name


def site_name(hookpoint: Hookpoint | str, alias: str = "") -> str:
    """The site key of `hookpoint` in model `alias` (no alias: a one-model source)."""
    return f"{alias}/{hookpoint}" if alias else str(hookpoint)


def split_site(name: str) -> tuple[str, str]:
    """`"ft/model.layers.2"` -> ("ft", "model.layers.2"); `"model.layers.2"` -> ("", "model.layers.2")."""
    alias, sep, hookpoint = name.partition("/")
    return (alias, hookpoint) if sep else ("", name)


def parse(spec: str) -> tuple[str, str]:
    """`"path[:input|:output]"` -> (path, io)."""
    path, sep, io = spec.partition(":")
    io = io or "output"
    if io not in ("input", "output"):
        raise ConfigError(f"hookpoint '{spec}': the suffix after ':' must be 'input' or 'output' (got '{io}')")
    if not path:
        raise ConfigError(f"hookpoint '{spec}' has no module path; e.g. 'model.layers.6' or 'transformer.h.3'")
    return path, io


def glob_regex(pattern: str) -> re.Pattern:
    """Glob for module paths: `*` and `?` stay within one path component, `**` crosses dots."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.find("]", i)
            if j < 0:
                raise ConfigError(f"hookpoint pattern '{pattern}' has an unclosed '['")
            out.append(pattern[i : j + 1])
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def near_matches(model: torch.nn.Module, path: str, n: int = 5) -> list[str]:
    """Module paths that look like `path`, for error messages."""
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=n, cutoff=0.5)
    if not close:  # same shape with the layer numbers replaced (user typed layer 40 of 30)
        shape = _NUMERIC.sub(".*", path)
        rx = glob_regex(shape)
        close = sorted({_NUMERIC.sub(".*", nm) for nm in names if rx.match(nm)})[:n]
    if not close:  # last resort: same final component
        last = path.rsplit(".", 1)[-1]
        close = [nm for nm in names if nm.rsplit(".", 1)[-1] == last][:n]
    return close


def resolve(model: torch.nn.Module, specs: str | list[str]) -> list[Hookpoint]:
    """Expand glob patterns to concrete hookpoints, in the model's module order.

    A pattern that matches nothing raises ConfigError listing the nearest module paths.
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ConfigError("no hookpoint given; name at least one module path such as 'model.layers.6'")
    names = [name for name, _ in model.named_modules() if name]
    order = {name: i for i, name in enumerate(names)}
    found: list[Hookpoint] = []
    for spec in specs:
        path, io = parse(spec)
        if any(c in path for c in "*?["):
            rx = glob_regex(path)
            hits = sorted((nm for nm in names if rx.match(nm)), key=_natural_key)
        else:
            hits = [path] if path in order else []
        if not hits:
            near = near_matches(model, path)
            hint = f"; near matches: {', '.join(near)}" if near else ""
            raise ConfigError(
                f"hookpoint '{spec}' matches no module of {type(model).__name__}{hint}. "
                "List every path with [n for n, _ in model.named_modules()]"
            )
        for nm in hits:
            hp = Hookpoint(nm, io)
            if hp not in found:
                found.append(hp)
    return found


class StopForward(Exception):
    """Raised inside a hook once every hookpoint has been read, to skip the rest of the model."""


def first_tensor(value: Any) -> torch.Tensor:
    """The activation tensor in a module's output or input (tuples and ModelOutputs hold it first)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise ConfigError(f"the hooked module returned {type(value).__name__}, which holds no activation tensor first")


def replace_first(value: Any, new: torch.Tensor) -> Any:
    """`value` with its activation tensor swapped for `new` (same container type)."""
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise ConfigError(f"cannot replace the activation inside a {type(value).__name__}")


@contextlib.contextmanager
def capture(
    model: torch.nn.Module, hookpoints: list[Hookpoint], stop_early: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, every forward of `model` fills the yielded dict {hookpoint name: tensor}.

    With `stop_early`, the hook that completes the set raises StopForward; `run` catches it.
    """
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    wanted = {hp.name for hp in hookpoints}
    handles = []

    def make(hp: Hookpoint) -> Callable:
        def hook(module, args, *rest):
            value = args if hp.io == "input" else rest[0]
            store[hp.name] = first_tensor(value).detach()
            if stop_early and wanted.issubset(store):
                raise StopForward

        return hook

    try:
        for hp in hookpoints:
            mod = modules[hp.module]
            if hp.io == "input":
                handles.append(mod.register_forward_pre_hook(make(hp)))
            else:
                handles.append(mod.register_forward_hook(make(hp)))
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    hookpoints: list[Hookpoint],
    attention_mask: torch.Tensor | None = None,
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """One forward pass of `model` returning {hookpoint name: activations [B, T, d]}."""
    with capture(model, hookpoints, stop_early) as store:
        try:
            kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
            if _accepts_use_cache(model):
                kwargs["use_cache"] = False  # no KV cache to allocate when nothing is generated
            model(input_ids=input_ids, **kwargs)
        except StopForward:
            pass
    missing = [hp.name for hp in hookpoints if hp.name not in store]
    if missing:
        raise ConfigError(f"hookpoint(s) {missing} never ran during the forward pass of {type(model).__name__}")
    return {hp.name: store[hp.name] for hp in hookpoints}


def _accepts_use_cache(model: torch.nn.Module) -> bool:
    import inspect

    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def intervene(
    model: torch.nn.Module,
    hookpoint: Hookpoint,
    fn: Callable[[torch.Tensor], torch.Tensor],
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Inside the block, the activation at `hookpoint` is replaced by `fn(activation)`.

    `fn` maps `[n, d]` rows to `[n, d]` rows. With `positions` (a bool mask `[B, T]` for the
    next forward), only those rows are replaced; the others pass through untouched, so special
    tokens the SAE never saw keep their clean values.
    """
    module = dict(model.named_modules())[hookpoint.module]

    def swap(act: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return fn(act.reshape(-1, act.shape[-1])).reshape(act.shape).to(act.dtype)
        new = act.clone()
        mask = positions.to(act.device)
        new[mask] = fn(act[mask]).to(act.dtype)
        return new

    if hookpoint.io == "input":
        handle = module.register_forward_pre_hook(lambda mod, args: replace_first(args, swap(first_tensor(args))))
    else:
        handle = module.register_forward_hook(lambda mod, args, out: replace_first(out, swap(first_tensor(out))))
    try:
        yield
    finally:
        handle.remove()
