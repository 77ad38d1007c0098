"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule over steps or a time budget."""

from __future__ import annotations

import math

import torch
from torch import nn

from mistura.train.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay for linear weights; none for norms, biases, embeddings.

    Embeddings are excluded because decay would shrink rarely seen tokens' vectors
    toward zero between their updates; norms and biases are offsets and gains, not
    features. A tied lm_head is the embedding, so it is excluded too.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) parameters are listed once
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and id(param) not in embeddings
        (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=1e-8)


def fraction_done(step: int, train_seconds: float, config: TrainConfig) -> float:
    """How far the run is, from 0 to 1: step / max_steps, or with a time budget the time spent
    training over max_minutes when that is further along. The run ends when it reaches 1."""
    done = step / config.max_steps
    if config.max_minutes is not None:
        done = max(done, train_seconds / (60.0 * config.max_minutes))
    return min(1.0, done)


def lr_at(step: int, config: TrainConfig, done: float | None = None) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to lr * min_lr_ratio as the fraction
    of the run `done` (default step / max_steps; see fraction_done) goes from warmup_steps / max_steps to 1.

    Warmup is counted in steps. The cosine also caps it, so a run whose time budget ends during
    the warmup still ends at the floor.
    """
    done = step / config.max_steps if done is None else done
    start = config.warmup_steps / config.max_steps
    phase = min(1.0, max(0.0, (done - start) / (1.0 - start)))
    floor = config.lr * config.min_lr_ratio
    cosine = floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * phase))
    if step < config.warmup_steps:
        return min(cosine, config.lr * (step + 1) / config.warmup_steps)
    return cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
