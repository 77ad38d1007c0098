"""Reward sources for RL: what scores a batch of sampled replies, named by a spec string.

An RL trainer builds a reward once, `reward = load_reward(spec)`, and scores each batch with one call,
`reward(prompts, completions, **columns)` -> a float32 tensor (B,) on the CPU. The specs:

    ends_sentence          1 if the reply ends a sentence (. ! ? or …, closing quotes or brackets allowed), else 0
    contains:WORD          1 if the reply holds WORD as a whole word, case-insensitive, else 0
    length:MIN-MAX         1 if the reply's word count n is in [MIN, MAX]; outside, exp(-3 d / bound), d the
                           distance to the bound missed: 0.22 for half the bound short or over (d = bound / 2)
    no_repeat              the share of distinct words among the reply's words (0 for an empty reply)
    exact:COLUMN           1 if the reply equals the prompt's COLUMN (its line's key: "answer" for a conversation
                           file), both stripped, case-folded and their whitespace collapsed, else 0
    module:function        a function of yours, called as TRL calls one:
                           function(prompts=..., completions=..., **columns) -> a number per reply;
                           module is importable, or a path to a .py file (path/to/rewards.py:function)
    model:PATH             a reward model (mistura.tune.reward_model), each pair scored as it was trained
    critic:PATH            RLAIF: a language model asked whether each reply is good; the reward is its
                           p(sim) / (p(sim) + p(não)) for the answer (mistura.tune.rlaif)

Every call is checked, whatever the source: a reward that raises, or returns something other than one
finite real number per reply, is a DataError naming the spec (and the offending index), not a NaN that
surfaces in the loss a thousand steps later.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistura.errors import ConfigError, DataError, MisturaError
from mistura.loading import load, load_tokenizer
from mistura.tune.reward_model import load_reward_model, score_texts
from mistura.tune.rlaif import NO, YES, answer_token_ids, yes_probability
from mistura.tune.template import tuning_template

Scorer = Callable[[str], float]  # one reply's reward, for the built-ins that read the reply alone

SENTENCE_END = re.compile(r"[.!?…][\"'»”’)\]}]*$")
WORD = re.compile(r"\w+")
LENGTH_SHARPNESS = 3.0  # length:MIN-MAX's partial credit exp(-3 d / bound): 0.05 at d = bound
CRITIC_QUESTION = "Pergunta: {prompt}\nResposta: {completion}\nA resposta é boa? Responda sim ou não."


class Reward(ABC):
    """A source of rewards; calling it scores one batch, the result checked (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name  # the spec it was built from, for logs and errors

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise DataError(f"the reward {self.name} got {len(prompts)} prompts for {len(completions)} replies")
        try:
            result = self.score(prompts, completions, **columns)
        except MisturaError:
            raise
        except Exception as err:  # a user's function can raise anything: report it under the spec's name
            raise DataError(f"the reward {self.name} raised {type(err).__name__}: {err}") from err
        return checked(result, len(completions), self.name)

    @abstractmethod
    def score(self, prompts: list[str], completions: list[str], **columns: list) -> Any:
        """The rewards of a batch, unchecked: one number per reply."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def checked(result: Any, size: int, name: str) -> torch.Tensor:
    """`result` as a float32 tensor (size,), or a DataError saying what is wrong with it, and where."""
    if isinstance(result, (torch.Tensor, np.ndarray)):
        if result.ndim != 1:
            raise DataError(f"the reward {name} returned an array of shape {tuple(result.shape)}, not ({size},)")
        result = result.tolist()
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        raise DataError(f"the reward {name} returned a {type(result).__name__}, not a sequence of numbers")
    if len(result) != size:
        raise DataError(f"the reward {name} returned {len(result)} values for {size} replies")
    values = []
    for index, value in enumerate(result):
        if not isinstance(value, numbers.Real):
            raise DataError(f"the reward {name} gave {value!r} for reply {index}, not a real number")
        try:
            values.append(float(value))
        except OverflowError:  # an int beyond any float, 10**400 say
            values.append(math.inf)
    rewards = torch.tensor(values, dtype=torch.float32)
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:  # float32 checked: 1e300 is finite for Python but inf here
        raise DataError(f"the reward {name} gave {values[bad[0]]} for reply {bad[0]}: rewards must be finite")
    return rewards


# ---- built-ins: verifiable rewards of the reply alone


def ends_sentence(reply: str) -> float:
    return 1.0 if SENTENCE_END.search(reply.strip()) else 0.0


def no_repeat(reply: str) -> float:
    words = [word.lower() for word in WORD.findall(reply)]
    return len(set(words)) / len(words) if words else 0.0


def contains(word: str, spec: str) -> Scorer:
    if not word.strip():
        raise ConfigError(f"the reward {spec!r} names no word: write contains:WORD, e.g. contains:Capitu")
    pattern = re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)
    return lambda reply: 1.0 if pattern.search(reply) else 0.0


def length(bounds: str, spec: str) -> Scorer:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", bounds)
    if not match or int(match[1]) > int(match[2]):
        raise ConfigError(f"the reward {spec!r} needs length:MIN-MAX, whole numbers with MIN <= MAX, e.g. length:5-40")
    low, high = int(match[1]), int(match[2])

    def score(reply: str) -> float:
        n = len(reply.split())
        if low <= n <= high:
            return 1.0
        bound = low if n < low else high
        return math.exp(-LENGTH_SHARPNESS * abs(n - bound) / max(bound, 1))

    return score


@dataclass(frozen=True)
class Builtin:
    """A built-in reward: `make(parameter, spec)` gives its scorer; `form` is how its spec is written."""

    make: Callable[[str | None, str], Scorer]
    form: str


def without_parameter(scorer: Scorer, name: str) -> Callable[[str | None, str], Scorer]:
    def make(parameter: str | None, spec: str) -> Scorer:
        if parameter is not None:
            raise ConfigError(f"the reward {spec!r} takes no parameter: write {name}")
        return scorer

    return make


def with_parameter(make: Callable[[str, str], Scorer], form: str) -> Callable[[str | None, str], Scorer]:
    def check(parameter: str | None, spec: str) -> Scorer:
        if parameter is None:
            raise ConfigError(f"the reward {spec!r} needs a parameter: write {form}")
        return make(parameter, spec)

    return check


BUILTINS: dict[str, Builtin] = {
    "ends_sentence": Builtin(without_parameter(ends_sentence, "ends_sentence"), "ends_sentence"),
    "no_repeat": Builtin(without_parameter(no_repeat, "no_repeat"), "no_repeat"),
    "contains": Builtin(with_parameter(contains, "contains:WORD"), "contains:WORD"),
    "length": Builtin(with_parameter(length, "length:MIN-MAX"), "length:MIN-MAX"),
}


class BuiltinReward(Reward):
    def __init__(self, name: str, scorer: Scorer):
        super().__init__(name)
        self.scorer = scorer

    def score(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        return [self.scorer(reply) for reply in completions]


class ExactReward(Reward):
    """exact:COLUMN, a verifiable reward: the reply against the reference answer its prompt's line holds."""

    def __init__(self, name: str, column: str):
        super().__init__(name)
        self.column = column

    def score(self, prompts: list[str], completions: list[str], **columns: list) -> list[float]:
        answers = columns.get(self.column)
        if answers is None:
            raise DataError(f"the reward {self.name} needs a {self.column!r} key on the lines of the prompt file")
        for index, answer in enumerate(answers):
            if not isinstance(answer, str):
                raise DataError(f"the reward {self.name}: the prompt of reply {index} has no {self.column!r} string")
        return [float(normalised(reply) == normalised(answer)) for reply, answer in zip(completions, answers)]


def normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


# ---- a user's function, TRL's convention


class FunctionReward(Reward):
    def __init__(self, name: str, function: Callable[..., Any]):
        super().__init__(name)
        self.function = function

    def score(self, prompts: list[str], completions: list[str], **columns: list) -> Any:
        return self.function(prompts=prompts, completions=completions, **columns)


def import_function(spec: str, module: str, attribute: str) -> Callable[..., Any]:
    """`attribute` of `module` (a dotted name, or a .py file's path), checked to be callable."""
    try:
        loaded = import_file(module) if module.endswith(".py") else importlib.import_module(module)
    except Exception as err:  # any error of the user's module, SyntaxError included
        raise ConfigError(f"the reward {spec!r}: cannot import {module}: {type(err).__name__}: {err}") from err
    function = getattr(loaded, attribute, None)
    if not callable(function):
        raise ConfigError(f"the reward {spec!r}: {module} has no function {attribute!r}")
    return function


def import_file(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no file {file}")
    name = f"mistura_reward_{file.stem}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as an import does: dataclasses and pickle look their module up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# ---- models: a trained reward model, or a critic asked a question


class ModelReward(Reward):
    """A reward model's score of each (prompt, reply), formatted by its chat template as in training."""

    def __init__(self, name: str, path: str, device: torch.device | str):
        super().__init__(name)
        self.model = load_reward_model(path, device)
        self.tokenizer = load_tokenizer(path)
        self.template = tuning_template(path)

    def score(self, prompts: list[str], completions: list[str], **columns: list) -> torch.Tensor:
        return score_texts(self.model, self.tokenizer, self.template, prompts, completions)


class CriticReward(Reward):
    """RLAIF: the critic is asked CRITIC_QUESTION about each pair in a user message; the reward is how much of
    its next-token probability, over the answers, goes to yes (YES against NO, spellings summed).

    A question longer than the critic's context loses its start (the prompt's, first): the critic still
    reads the end of the reply and the question, so one long reply does not stop a run.
    """

    def __init__(self, name: str, path: str, device: torch.device | str, batch_size: int = 8):
        super().__init__(name)
        self.model = load(path, device)
        self.tokenizer = load_tokenizer(path)
        self.template = tuning_template(path)
        self.yes_ids = answer_token_ids(self.tokenizer, YES)
        self.no_ids = answer_token_ids(self.tokenizer, NO)
        self.batch_size = batch_size  # rows per forward: the logits are (rows, T, V)

    def encode(self, prompt: str, completion: str) -> list[int]:
        question = CRITIC_QUESTION.format(prompt=prompt, completion=completion)
        ids = self.template.encode(self.tokenizer, [{"role": "user", "content": question}])
        return ids[-self.model.config.max_seq_len :]

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], **columns: list) -> torch.Tensor:
        rows = [self.encode(prompt, reply) for prompt, reply in zip(prompts, completions, strict=True)]
        chunks = [
            self.answer_logits(rows[start : start + self.batch_size]) for start in range(0, len(rows), self.batch_size)
        ]
        logits = torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.vocab_size)  # (B, V)
        return yes_probability(logits, self.yes_ids, self.no_ids).cpu()

    def answer_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """The next-token logits (B, V) after each row, the rows right-padded: under causal attention the
        padding after a row's last token cannot change what the model predicts there."""
        device = self.model.lm_head.weight.device
        lengths = torch.tensor([len(row) for row in rows], device=device)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, device=device)
        logits = self.model(ids)  # (B, T, V)
        return logits[torch.arange(len(rows), device=device), lengths - 1].float()


def load_reward(spec: str, device: torch.device | str = "cpu") -> Reward:
    """The reward a spec names (see the module docstring); an unknown or malformed spec is a ConfigError."""
    head, colon, tail = spec.partition(":")
    if head in BUILTINS:
        return BuiltinReward(spec, BUILTINS[head].make(tail if colon else None, spec))
    if head == "exact":
        if not tail.strip():
            raise ConfigError(f"the reward {spec!r} names no column: write exact:COLUMN, e.g. exact:answer")
        return ExactReward(spec, tail.strip())
    if head in ("model", "critic") and tail:
        return (ModelReward if head == "model" else CriticReward)(spec, tail, device)
    module, _, attribute = spec.rpartition(":")
    if module and attribute.isidentifier():
        return FunctionReward(spec, import_function(spec, module, attribute))
    forms = ", ".join(builtin.form for builtin in BUILTINS.values())
    raise ConfigError(
        f"unknown reward {spec!r}: give a built-in ({forms}, exact:COLUMN), module:function (module importable or "
        "a .py file), model:PATH (a reward model) or critic:PATH (a language model asked yes or no)"
    )
