"""The study's figures, drawn from the metrics JSON of each run (its `history`).

    plots/<run>_convergence.png    training loss (raw and smoothed) and validation loss against
                                   tokens seen, with the unigram baseline for scale
    plots/convergence.png          every run: smoothed training loss and validation loss
    plots/<run>_utilisation.png    MoE runs: each layer's expert utilisation (share x E; 1 is
                                   an even load) over training

Figures go straight to matplotlib's Agg canvas, without pyplot: no display is needed and no
global state is touched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

DPI = 110


def write_plots(results: list[dict[str, Any]], directory: Path) -> None:
    """Every figure of the module docstring, for these runs' metrics."""
    directory.mkdir(parents=True, exist_ok=True)
    for result in results:
        convergence(result, directory / f"{result['run']}_convergence.png")
        if result["moe"]:
            utilisation(result, directory / f"{result['run']}_utilisation.png")
    combined(results, directory / "convergence.png")


def convergence(result: dict[str, Any], path: Path) -> None:
    curves = result["history"]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.plot(curves["train_tokens"], curves["train_loss"], color="tab:blue", alpha=0.3, linewidth=0.8)
    ax.plot(*smooth(curves["train_tokens"], curves["train_loss"]), color="tab:blue", label="training (smoothed)")
    ax.plot(curves["val_tokens"], curves["val_loss"], "o-", color="tab:orange", label="validation")
    ax.axhline(result["unigram_loss"], color="gray", linestyle="--", linewidth=0.8, label="unigram baseline")
    _loss_axes(ax, f"{result['run']} ({result['model']})")
    ax.legend()
    _save(fig, path)


def combined(results: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(11.0, 4.2))
    train_ax, val_ax = fig.subplots(1, 2, sharey=True)
    for result in results:
        curves = result["history"]
        train_ax.plot(*smooth(curves["train_tokens"], curves["train_loss"]), label=result["run"])
        val_ax.plot(curves["val_tokens"], curves["val_loss"], "o-", markersize=3, label=result["run"])
    _loss_axes(train_ax, "training loss (smoothed)")
    _loss_axes(val_ax, "validation loss")
    val_ax.legend()
    _save(fig, path)


def utilisation(result: dict[str, Any], path: Path) -> None:
    curves = result["history"]
    layers = curves["expert_load"]
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    fig = Figure(figsize=(4.0 * columns, 2.8 * rows + 0.8))  # room for the titles
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (layer, shares) in zip(axes, layers.items()):
        load = np.asarray(shares)  # (records, E)
        for expert in range(load.shape[1]):
            ax.plot(*smooth(curves["train_tokens"], load[:, expert] * load.shape[1]), linewidth=0.9)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.xaxis.set_major_formatter(EngFormatter())
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    fig.suptitle(f"{result['run']}: expert utilisation (share x experts; 1 = even), one line per expert")
    fig.supxlabel("tokens seen")
    _save(fig, path)


def smooth(x: list[float], y: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A moving average over a twentieth of the points, with the x it ends at."""
    window = max(1, len(y) // 20)
    averaged = np.convolve(np.asarray(y, dtype=float), np.ones(window) / window, mode="valid")
    return np.asarray(x, dtype=float)[window - 1 :], averaged


def _loss_axes(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
