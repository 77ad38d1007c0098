"""Scalar heads on a mistura Transformer: a reward model for preferences, a value head for PPO's critic.

    h = backbone.hidden_states(ids)          (B, T, D) the final normed states the lm_head would read
    v = ValueHead(h) = h w + b               (B, T)    a scalar per token: PPO's V(s_t)
    r = v[b, last real token of row b]       (B,)      the reward of the whole sequence

The reward is read at the last real token, which under causal attention has seen the whole
sequence; rows are right-padded (real tokens first, then padding, mask 1 then 0), so padding
comes after every real token and never changes its state. As in InstructGPT (Ouyang et al. 2022)
and TRL's reward models (AutoModelForSequenceClassification, the score at the last non-pad token).

A reward-model checkpoint is the backbone's checkpoint (so `mistura.load` reads it as a language
model) with the head beside it in reward_head.safetensors: `save_reward_model` writes one,
`load_reward_model` reads it back, and `score_texts` rates replies as the model was trained,
each (prompt, reply) formatted as a conversation by the chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from mistura.chat_template import ChatTemplate
from mistura.checkpoint import WEIGHTS_METADATA, check_state, checkpoint_directory, read_tensors, write_model
from mistura.config import ModelConfig
from mistura.errors import CheckpointError, DataError
from mistura.loading import load, locate
from mistura.model import Transformer
from mistura.train.loop import IGNORE
from mistura.tune.batches import collate
from mistura.tune.data import Conversation, exchange
from mistura.tune.encode import Encoder
from mistura.tune.masked import last_index


class ValueHead(nn.Module):
    """A linear map from hidden states (B, T, D) to one scalar per token (B, T), in the head's own dtype."""

    def __init__(self, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, 0.0, init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)  # (B, T)


class HeadedModel(nn.Module):
    """A Transformer backbone with a ValueHead; a checkpoint keeps the head in `head_file` beside the backbone's files.

    It stands where the training loop expects a Transformer (config, activation checkpointing, the experts'
    bias update), so a reward model and PPO's policy with its critic train in the same loop.
    """

    head_file: str
    kind: str  # what it is and the command that trains one, for the error of a checkpoint without the head

    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.head = ValueHead(backbone.config.d_model, backbone.config.init_std)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @property
    def activation_checkpointing(self) -> bool:
        return self.backbone.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.backbone.activation_checkpointing = enabled

    def balance_step(self) -> None:
        """The backbone's expert-bias update after an optimizer step (see Transformer.balance_step)."""
        self.backbone.balance_step()


class RewardModel(HeadedModel):
    """A Transformer backbone with a ValueHead: per-token scores (values) and the sequence's reward (forward)."""

    head_file = "reward_head.safetensors"
    kind = "reward model (mistura reward-model trains one)"

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        """The head's scalar at every position (B, T) of token ids idx (B, T): a PPO critic's V(s_t)."""
        return self.head(self.backbone.hidden_states(idx))

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reward (B,) of each right-padded row of idx (B, T): the score at its last token where mask is 1."""
        scores = self.values(idx)  # (B, T)
        rows = torch.arange(idx.size(0), device=idx.device)
        return scores[rows, last_index(mask)]


def write_reward_model(directory: Path, model: RewardModel, tokenizer_file: Path | None) -> None:
    """The backbone's checkpoint files and the head's reward_head.safetensors, into `directory`."""
    write_model(directory, model.backbone, tokenizer_file)
    write_head(directory, model)


def write_head(directory: Path, model: HeadedModel) -> None:
    """The head alone, in model.head_file, beside backbone files written otherwise (LoRA adapters, say)."""
    head = {name: tensor.detach().contiguous().cpu() for name, tensor in model.head.state_dict().items()}
    save_file(head, directory / model.head_file, metadata=WEIGHTS_METADATA)


def save_reward_model(directory: str | Path, model: RewardModel, tokenizer_file: Path | None = None) -> Path:
    """Save a reward model as a checkpoint directory, atomically (see the module docstring)."""
    directory = Path(directory)
    with checkpoint_directory(directory) as tmp:
        write_reward_model(tmp, model, tokenizer_file)
    return directory


def read_head(directory: Path, model: HeadedModel) -> None:
    """Load model.head_file of `directory` into `model.head`, names and shapes checked."""
    path = directory / model.head_file
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {model.head_file}: not a {model.kind}")
    state = read_tensors(path)
    check_state(state, model.head.state_dict(), str(path))
    model.head.load_state_dict(state)


def load_reward_model(path: str | Path, device: torch.device | str | None = None) -> RewardModel:
    """A reward-model checkpoint (or a reward-model run's latest checkpoint), verified, in eval mode."""
    directory = locate(path)
    model = RewardModel(load(directory))
    read_head(directory, model)
    return model.to(device).eval()


def reply_rewards(model: RewardModel, ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Each row's reward (B,) for unshifted ids and labels (B, T): the score at the reply's last token, the last
    position whose label is not IGNORE. kwargs go to hidden_states (return_aux=True gives (rewards, auxes))."""
    out = model.backbone.hidden_states(ids, **kwargs)
    hidden, auxes = out if kwargs.get("return_aux") else (out, None)
    scores = model.head(hidden)  # (B, T)
    rewards = scores[torch.arange(ids.size(0), device=ids.device), last_index(labels != IGNORE)]
    return (rewards, auxes) if auxes is not None else rewards


@torch.no_grad()
def score_texts(
    model: RewardModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """The reward (B,) of each reply to its prompt, the pair formatted as a user and an assistant message and
    scored where training scored it, at the reply's last token."""
    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts for {len(completions)} replies: give one prompt per reply")
    encoder = Encoder(tokenizer, template, model.config.max_seq_len)
    examples = [
        encoder.encode(Conversation(tuple(exchange({"prompt": prompt, "completion": reply}, where)), where))
        for where, prompt, reply in zip(
            (f"reply {i}" for i in range(1, len(prompts) + 1)), prompts, completions, strict=False
        )
    ]
    device = model.head.proj.weight.device
    rewards = [
        reply_rewards(model, *collate(examples[start : start + batch_size], device, shift=False))
        for start in range(0, len(examples), batch_size)
    ]
    return torch.cat(rewards).float().cpu() if rewards else torch.zeros(0)
