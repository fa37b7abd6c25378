"""Where a run's metrics records go besides OUT/metrics.jsonl (always written): TensorBoard event
files and Weights & Biases in offline mode, chosen by `TrainConfig.log_to`.

Each record the loop logs (step, losses by name, L0, FVU, dead/dense fractions, throughput) is
flattened to scalars (`losses/mse`, `l0`, ...) and written at its step. Both sinks write under the
run folder and never reach a network: W&B runs offline (`wandb sync` uploads later), with a run id
derived from the folder so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError

SINKS = ("tensorboard", "wandb")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics record, nested dicts flattened with '/'."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            flat[key] = float(value)
    return flat


class MetricSinks:
    """The extra sinks of one run folder; `write(record)` on every logged step, `close()` at the end."""

    def __init__(self, kinds: list[str], out_dir: Path | None, name: str, config: dict[str, Any]):
        self._writers: list[Any] = []
        if not kinds:
            return
        if out_dir is None:
            raise ConfigError(f"log_to {kinds} writes into the run folder; give an out folder (--out)")
        for kind in kinds:
            self._writers.append(_OPEN[kind](Path(out_dir), name, config))

    def write(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), int(record["step"])
        for writer in self._writers:
            writer.write(values, step)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []


class _TensorBoard:
    def __init__(self, out_dir: Path, name: str, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log_to: tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def write(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out_dir: Path, name: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError("log_to: wandb needs the wandb package: pip install wandb") from None
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = hashlib.blake2b(str(out_dir.resolve()).encode(), digest_size=8).hexdigest()
        self.run = wandb.init(
            mode="offline",
            dir=str(out_dir),
            project="saelab",
            name=name,
            id=run_id,
            resume="allow",
            config=config,
        )

    def write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB}
