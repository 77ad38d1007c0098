"""Reinforcement learning from a reward, `mistura rl`: PPO (a policy with a value head) or GRPO (no critic).

One training step, one line of metrics:

    rollout    train.batch_size prompts, rl.group_size replies to each, sampled by the policy (in eval
               mode) through the batched engine and its KV cache (mistura.infer.engine.generate)
    score      the reward of each (prompt, reply) (mistura.tune.rewards): verifiable, a reward model,
               a function of yours, or an AI critic (RLAIF)
    read       one forward pass of the policy (log-probs and entropy; PPO's values too) and one of
               the frozen reference (log-probs) over each prompt + reply, without gradient
    advantage  PPO: r_t = -kl_coef KL_t, plus the score at the reply's last token, then GAE and
               whitening (mistura.tune.advantages); kl_coef fixed or steered toward rl.kl_target
               GRPO: each reply's score against its group's mean, over the group's std
    update     rl.epochs passes over the replies in rl.mini_batches optimizer steps each:
               PPO   clipped surrogate + vf_coef x clipped value loss - entropy_coef x entropy
               GRPO  clipped surrogate + kl_coef x KL_t (k3) to the reference (mistura.tune.policy)

The log-probabilities are those of the logits over rl.temperature, the distribution the replies
were drawn from. A step logs, with the loop's fields: reward (mean score) and reward_std, kl (the
policy's KL to the reference per reply, in nats: the sum of log pi - log ref over its tokens),
entropy (per token), reply_length, ended (the share of replies that drew the end of turn), and
the update's clip fractions and losses. Evaluation samples one reply to each held-out prompt with
a fixed seed and logs val_reward, val_kl, val_reply_length, once before the first step too; the
run keeps the best val_reward.
Each evaluation redraws reward_kl.png in the run's folder: the reward and the KL along the run.

Checkpoints are SFT's (a checkpoint, or LoRA adapters) with, for PPO, the value head beside
them (value_head.safetensors): `mistura.load` and `mistura chat` take the policy as they take
any fine-tune. A resumed run continues the uninterrupted one exactly: the replies of step s are
drawn with a seed of (train.seed, s), and the KL coefficient is saved with each checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.lora import trainable_share
from mistura.model import Transformer
from mistura.train.loggers import read_metrics
from mistura.train.optim import lr_at, set_lr
from mistura.tune.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalized_rewards,
)
from mistura.tune.batches import ExampleBatches
from mistura.tune.config import RLConfig
from mistura.tune.data import hold_out
from mistura.tune.encode import Encoder
from mistura.tune.logprobs import token_entropy, token_logprobs
from mistura.tune.masked import masked_mean, masked_whiten
from mistura.tune.plots import reward_kl_plot
from mistura.tune.policy import entropy_bonus, grpo_loss, ppo_policy_loss, ppo_value_loss
from mistura.tune.preference import mean_metrics
from mistura.tune.prompts import Prompt, columns, encode_prompts, read_prompts
from mistura.tune.reward_model import HeadedModel
from mistura.tune.rewards import load_reward
from mistura.tune.tuned import TunedLoop

PLOT = "reward_kl.png"


class PolicyWithValue(HeadedModel):
    """PPO's actor and critic on one backbone: the logits (B, T, V) and a value per position (B, T)."""

    head_file = "value_head.safetensors"
    kind = "PPO checkpoint (mistura rl --algorithm ppo writes one)"

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        hidden, auxes = self.backbone.hidden_states(idx, return_aux=True)  # (B, T, D)
        return self.backbone.logits(hidden), self.head(hidden), auxes


@dataclass
class Rollout:
    """Replies to prompts and what the update reads of them; rows are replies, each prompt's group_size in a row.

    x is prompt + reply without its last token, y the tokens each position predicts, both right-padded;
    mask is 1 where y is a reply token. Per-token tensors are (N, T), per-reply ones (N,).
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor  # the reward of each reply
    logprobs: torch.Tensor  # of the policy that sampled the replies (PPO's pi_old)
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    ended: torch.Tensor  # (N,) bool: the reply drew the end of turn
    values: torch.Tensor | None = None  # PPO's critic, V(s_t)
    advantages: torch.Tensor | None = None  # (N, T) for PPO, (N,) for GRPO
    returns: torch.Tensor | None = None  # PPO's value targets

    @property
    def kl(self) -> torch.Tensor:
        """Each reply's KL to the reference (N,): sum_t log pi - log ref over its tokens (k1, TRL's objective/kl)."""
        return ((self.logprobs - self.ref_logprobs) * self.mask).sum(-1)

    def statistics(self) -> dict[str, torch.Tensor]:
        """What a step or an evaluation logs of its replies (see the module docstring)."""
        return {
            "reward": self.scores.mean(),
            "reward_std": self.scores.std() if self.scores.numel() > 1 else torch.zeros(()),
            "kl": self.kl.mean(),
            "entropy": masked_mean(self.entropy, self.mask),
            "reply_length": self.mask.sum(-1).float().mean(),
            "ended": self.ended.float().mean(),
        }


class RLTrainer(TunedLoop):
    """PPO or GRPO on a checkpoint (see the module docstring); fit() trains, as every TrainLoop."""

    monitor, monitor_mode = "val_reward", "max"
    eval_at_start = True  # the held-out reward before any update: what the run improves on

    def __init__(self, run: RLConfig, log=print, clock: Callable[[], float] = time.perf_counter):
        super().__init__(run, log, clock)
        self.settings = s = run.rl
        backbone = self.load_base()
        self.eos_id = self.tokenizer.token_to_id(self.template.eos_token)
        encoder = Encoder(self.tokenizer, self.template, backbone.config.max_seq_len)
        self.train_prompts, self.val_prompts = self.prompts(encoder)
        self.reward = load_reward(s.reward, self.device)
        self.reference = self.load_reference()
        self.adapt(backbone)
        self.use_model(PolicyWithValue(backbone) if s.algorithm == "ppo" else backbone)
        self.loader = PromptBatches(self.train_prompts, self.cfg.batch_size, self.cfg.seed, self.device)
        self.kl_controller = (
            AdaptiveKLController(s.kl_coef, s.kl_target, s.kl_horizon)
            if s.kl_target is not None
            else FixedKLController(s.kl_coef)
        )
        self.tokens = 0  # prompt and reply tokens of every rollout
        self.window: dict[str, float] = {}

    def prompts(self, encoder: Encoder) -> tuple[list[Prompt], list[Prompt]]:
        """The training and held-out prompts, formatted: data.val, or a share of data.train held out."""
        data = self.run.data
        train = read_prompts(data.train)
        if data.val is not None:
            train, val = train, read_prompts(data.val)
        else:
            train, val = hold_out(train, data.val_fraction, data.seed)
        reply = self.settings.max_new_tokens
        return encode_prompts(train, encoder, reply), encode_prompts(val, encoder, reply)

    @property
    def policy(self) -> Transformer:
        """The language model that samples the replies (PPO's without its value head)."""
        return language_model(self.model)

    # ---- one step: rollout, advantages, updates

    def train_step(self) -> tuple[float, float, float]:
        """One RL step: a rollout, its advantages, its updates; returns the mean loss, aux loss and last norm."""
        set_lr(self.optimizer, lr_at(self.step, self.cfg, self.fraction_done))
        batch, seed = self.loader.next_batch(), self.cfg.seed * 1_000_003 + self.step  # seed: exact resume
        rollout = self.rollout(self.model, batch, self.settings.group_size, seed)
        self.tokens += sum(len(prompt.ids) for prompt in batch) * self.settings.group_size + int(rollout.mask.sum())
        self.advantages(rollout)
        losses, auxes, grad_norm, updates = self.update(rollout, torch.Generator().manual_seed(seed))
        self.step += 1
        self.window = self.step_metrics(rollout, updates)
        return sum(losses) / len(losses), sum(auxes) / len(auxes), grad_norm

    def update(self, rollout: Rollout, order: torch.Generator) -> tuple[list[float], list[float], float, list]:
        """rl.epochs passes over the rollout's replies, shuffled by `order`, in rl.mini_batches optimizer steps
        each; the losses, auxiliary losses and metrics of every update, and the last gradient norm."""
        losses, auxes, updates, grad_norm = [], [], [], 0.0
        size = rollout.x.size(0) // self.settings.mini_batches
        for _ in range(self.settings.epochs):
            permutation = torch.randperm(rollout.x.size(0), generator=order).to(self.device)
            for rows in permutation.split(size):
                loss, aux, metrics = self.update_loss(rollout, rows)
                (loss + aux).backward()
                grad_norm = self.optimizer_step()
                losses.append(loss.item())
                auxes.append(aux.item())
                updates.append(metrics)
        return losses, auxes, grad_norm, updates

    def step_metrics(self, rollout: Rollout, updates: list) -> dict[str, float]:
        """What the step logs: its replies' statistics and its updates' mean metrics; PPO's KL coefficient, which
        then moves toward its target (when adaptive) for the next step."""
        updated = mean_metrics(updates)
        if "kl" in updated:  # GRPO's KL term, per token (TRL's "kl"); "kl" here is the rollout's, per reply
            updated["kl_per_token"] = updated.pop("kl")
        window = updated | {name: float(value) for name, value in rollout.statistics().items()}
        if self.settings.algorithm == "ppo":
            window["kl_coef"] = self.kl_controller.value
            self.kl_controller.update(window["kl"], rollout.x.size(0))
        return window

    @torch.no_grad()
    def rollout(self, model: torch.nn.Module, prompts: Sequence[Prompt], group: int, seed: int) -> Rollout:
        """Sample `group` replies to each prompt with `model`'s policy, score them and read them (no update)."""
        s = self.settings
        rows = [prompt for prompt in prompts for _ in range(group)]
        sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=None, seed=seed)
        with evaluating(model):
            replies = generate(language_model(model), [prompt.ids for prompt in rows], sampling, self.eos_id)
            ended = [bool(reply) and reply[-1] == self.eos_id for reply in replies]
            texts = [self.tokenizer.decode(r[:-1] if end else r) for r, end in zip(replies, ended, strict=True)]
            scores = self.reward([prompt.text for prompt in rows], texts, **columns(rows)).to(self.device)
            x, y, mask = pack([prompt.ids for prompt in rows], replies, self.device)
            with self._autocast():
                logits, values, _ = self.outputs(model, x)
                ref_logits = self.reference(x)
        logits = logits.float() / s.temperature
        logprobs = token_logprobs(logits, y, mask)
        ref_logprobs = token_logprobs(ref_logits.float() / s.temperature, y, mask)
        entropy = token_entropy(logits, mask)
        values = None if values is None else values.float()
        ended = torch.tensor(ended, device=self.device)
        return Rollout(x, y, mask, scores, logprobs, ref_logprobs, entropy, ended, values)

    def outputs(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """The logits (N, T, V), the values (N, T) (None without a value head) and the experts' auxes of x."""
        if self.settings.algorithm == "ppo":  # a PolicyWithValue, or its compiled forward
            return model(x)
        logits, auxes = model(x, return_aux=True)
        return logits, None, auxes

    def advantages(self, rollout: Rollout) -> None:
        """Fill the rollout's advantages (and PPO's value targets), see the module docstring."""
        s = self.settings
        if s.algorithm == "grpo":
            rollout.advantages = group_advantages(rollout.scores, s.group_size, s.scale_rewards)
            return
        kl_coef = self.kl_controller.value
        rewards, _ = kl_penalized_rewards(
            rollout.logprobs, rollout.ref_logprobs, rollout.scores, rollout.mask, kl_coef, s.kl_estimator
        )
        advantages, rollout.returns = gae(rewards, rollout.values, rollout.mask, s.gamma, s.lam)
        rollout.advantages = masked_whiten(advantages, rollout.mask)

    def update_loss(self, rollout: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The loss of the replies `rows` under the current policy, the experts' auxiliary loss, the metrics."""
        s = self.settings
        x, y, mask = rollout.x[rows], rollout.y[rows], rollout.mask[rows]
        with self._autocast():
            logits, values, auxes = self.outputs(self.forward, x)
        self.moe_monitor.update(auxes)
        aux = sum((aux.loss for aux in auxes), torch.zeros((), device=x.device))
        logits = logits.float() / s.temperature
        logprobs = token_logprobs(logits, y, mask)
        if s.algorithm == "grpo":
            loss, metrics = grpo_loss(
                logprobs,
                rollout.logprobs[rows],
                rollout.advantages[rows],
                mask,
                rollout.ref_logprobs[rows],
                s.kl_coef,
                s.clip,
                s.clip_high,
                s.loss_type,
                s.max_new_tokens,
            )
            return loss, aux, metrics
        policy_loss, metrics = ppo_policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask, s.clip)
        value_loss, value_metrics = ppo_value_loss(
            values.float(), rollout.values[rows], rollout.returns[rows], mask, s.value_clip
        )
        bonus = entropy_bonus(token_entropy(logits, mask), mask, s.entropy_coef)
        metrics |= value_metrics | {"loss/policy": policy_loss.detach(), "loss/value": value_loss.detach()}
        return policy_loss + s.vf_coef * value_loss + bonus, aux, metrics

    # ---- what the loop logs, evaluates and saves

    def extra_metrics(self) -> dict[str, float]:
        return self.window

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """One reply to each held-out prompt (the first eval_batches x batch_size), sampled with a fixed seed."""
        prompts = self.val_prompts[: self.cfg.eval_batches * self.cfg.batch_size]
        rollout = self.rollout(self.eval_model, prompts, 1, seed=self.cfg.seed)
        record = {f"val_{name}": float(value) for name, value in rollout.statistics().items()}
        self.draw()
        return record

    def fit(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        """TrainLoop.fit, then the figure of the whole run; its path is the summary's "plot"."""
        summary = super().fit(resume, progress)
        return summary | {"plot": str(self.draw())}

    def draw(self) -> Path | None:
        """Redraw reward_kl.png from the run's metrics so far; None before the first logged step."""
        path = self.out_dir / PLOT
        return path if reward_kl_plot(read_metrics(self.out_dir), path, self.what()) else None

    def eval_message(self, record: dict[str, Any]) -> str:
        return (
            f"step {self.step}: held-out reward {record['val_reward']:.3f}, KL {record['val_kl']:.2f} nats, "
            f"{record['val_reply_length']:.1f} tokens per reply"
        )

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_controller.value, "tokens": self.tokens}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_controller.value = float(state.get("kl_coef", self.kl_controller.value))
        self.tokens = int(state.get("tokens", 0))

    def validation_batches(self) -> list:
        return []  # evaluate() samples replies instead of averaging a loss over batches

    def tokens_done(self) -> int:
        return self.tokens

    def what(self) -> str:
        s = self.settings
        return f"{s.algorithm.upper()} on the reward {s.reward}"

    def describe(self) -> str:
        cfg, s, amp = self.cfg, self.settings, "bf16 autocast" if self.amp_dtype else "fp32"
        budget = "" if cfg.max_minutes is None else f" (or {cfg.max_minutes:g} min of training)"
        return (
            f"{self.what()} ({self.run.method}) from {self.base}: {trainable_share(self.model)} parameters train | "
            f"device {self.device} ({amp}) | {cfg.max_steps} steps{budget} of {cfg.batch_size} prompts x "
            f"{s.group_size} replies of at most {s.max_new_tokens} tokens | {len(self.train_prompts)} training "
            f"prompts, {len(self.val_prompts)} held out"
        )


def language_model(model: torch.nn.Module) -> Transformer:
    """The Transformer that samples: PPO's policy without its value head, GRPO's model itself."""
    return model.backbone if isinstance(model, PolicyWithValue) else model


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout, no capacity drops) inside the block, in its former mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def pack(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], device: torch.device):
    """(x, y, mask) (N, T) of prompt + reply rows, right-padded: y[t] = the token after x[t], mask 1 on replies."""
    rows = [list(prompt) + list(reply) for prompt, reply in zip(prompts, replies, strict=True)]
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length - 1, dtype=torch.bool)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, len(prompt) - 1 : len(row) - 1] = True  # the positions that predict the reply's tokens
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask.to(device)


class PromptBatches(ExampleBatches):
    """Training batches of `batch_size` prompts, drawn as ExampleBatches draws examples (its state, its order)."""

    @staticmethod
    def collate(prompts: Sequence[Prompt], device: torch.device, shift: bool) -> list[Prompt]:
        return list(prompts)

    @staticmethod
    def length(prompt: Prompt) -> int:
        return len(prompt.ids)
