"""The figure of an RL run, reward_kl.png: the reward it gains against the KL to the reference it pays.

    left   the training reward per step (raw and smoothed), the held-out reward at each evaluation,
           and the KL per reply (nats) on a second axis
    right  reward against KL, one point per step coloured by step: a run that learns moves up,
           one that drifts moves right

Drawn on matplotlib's Agg canvas without pyplot, as mistura.compare.plots draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mistura.atomic import atomic_write
from mistura.compare.plots import smooth

DPI = 110


def reward_kl_plot(records: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Draw the figure of the module docstring from a run's metrics records; False (nothing drawn) without steps."""
    train = [r for r in records if "reward" in r and "kl" in r]
    if not train:
        return False
    steps, rewards, kls = ([r[key] for r in train] for key in ("step", "reward", "kl"))
    val = [r for r in records if "val_reward" in r]
    fig = Figure(figsize=(11.0, 4.2))
    left, right = fig.subplots(1, 2)
    left.plot(steps, rewards, color="tab:blue", alpha=0.3, linewidth=0.8)
    left.plot(*smooth(steps, rewards), color="tab:blue", label="reward (training, smoothed)")
    left.plot([r["step"] for r in val], [r["val_reward"] for r in val], "o-", color="tab:green", label="held-out")
    left.set_xlabel("step")
    left.set_ylabel("reward")
    left.legend(loc="center right")
    kl_axis = left.twinx()
    kl_axis.plot(steps, kls, color="tab:red", alpha=0.6, linewidth=0.8)
    kl_axis.set_ylabel("KL to the reference per reply (nats)", color="tab:red")
    left.set_title(title)
    points = right.scatter(kls, rewards, c=steps, cmap="viridis", s=12)
    fig.colorbar(points, ax=right, label="step")
    right.set_xlabel("KL to the reference per reply (nats)")
    right.set_ylabel("reward")
    right.set_title("reward against KL")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_write(path) as file:  # a viewer never reads half a figure
        fig.savefig(file, format="png", dpi=DPI)
    return True
