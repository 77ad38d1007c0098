"""Where training records go: always `<run>/metrics.jsonl`, and optional experiment trackers.

TensorBoard, Weights & Biases and MLflow are used only when asked for in
`train.loggers` and installed; a missing one is announced once and skipped.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class Backend(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project="mistura", name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_dict(config, "run_config.json")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS: dict[str, Callable[[Path, dict[str, Any]], Backend]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "mlflow": MLflow,
}


class MetricsLog:
    """Appends each record as one JSON line and forwards its numbers to the trackers."""

    def __init__(self, run_dir: Path, backends: tuple[str, ...], config: dict[str, Any], notice=print):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.backends: list[Backend] = []
        for name in backends:
            try:
                self.backends.append(BACKENDS[name](run_dir, config))
            except ImportError:
                notice(f"logger '{name}' is not installed; skipping it (pip install {name})")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            k: float(v)
            for k, v in record.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool) and k != "step"
        }
        for backend in self.backends:
            backend.log(scalars, record["step"])

    def drop_after(self, step: int) -> None:
        """Forget records past `step`, written by a run that is now resumed from that step."""
        kept = [r for r in read_metrics(self.path.parent) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
