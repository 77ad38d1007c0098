"""How a training run shows its progress: the bar, and the line that says why it ended.

Without a time budget the bar counts steps out of max_steps. With one (train.max_minutes) it
shows the percentage of the run done, whose end, and so the time left, is whichever of
max_steps and the budget comes first (mistura.train.optim.fraction_done).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from mistura.train.config import TrainConfig

BUDGET_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"


def progress_bar(name: str, cfg: TrainConfig, step: int, fraction: float, enabled: bool) -> tqdm:
    """The bar of a run named `name` that is at `step`, `fraction` of the way through."""
    if cfg.max_minutes is None:
        return tqdm(total=cfg.max_steps, initial=step, disable=not enabled, desc=name, unit="step")
    desc = f"{name} ({cfg.max_minutes:g} min or {cfg.max_steps} steps)"
    return tqdm(total=100, initial=100 * fraction, disable=not enabled, desc=desc, bar_format=BUDGET_BAR)


def advance(bar: tqdm, cfg: TrainConfig, fraction: float) -> None:
    """Move the bar after a step: one step, or up to the fraction of the run now done."""
    bar.update(1 if cfg.max_minutes is None else 100 * fraction - bar.n)


def ending(cfg: TrainConfig, step: int, train_seconds: float, stopped_by_time: bool) -> str:
    """The line that says what ended the run: the time budget, or max_steps."""
    if stopped_by_time:
        return f"stopped by the time budget ({cfg.max_minutes:g} min) at step {step} of {cfg.max_steps}"
    budget = "" if cfg.max_minutes is None else f" of the {cfg.max_minutes:g} min budget"
    return f"reached max_steps {cfg.max_steps} after {train_seconds / 60:.1f} min of training{budget}"
