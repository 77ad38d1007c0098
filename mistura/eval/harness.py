"""mistura checkpoints in EleutherAI's lm-evaluation-harness: the `mistura` model of `lm_eval`.

    mistura eval runs/x --tasks hellaswag --limit 100 --num-fewshot 5      # through simple_evaluate
    python -m mistura.eval.harness --model mistura --model_args pretrained=runs/x --tasks hellaswag

The harness asks a model three things, which this adapter answers with mistura's own pieces:

- loglikelihood (context, continuation): the log-probability of the continuation's tokens after the
  context's, and whether greedy decoding would have produced them; requests of a length are batched,
  and a context longer than the model's window keeps its last tokens;
- loglikelihood_rolling (text): the text's total log-likelihood, by mistura.eval.perplexity's strided
  windows (half a context of stride);
- generate_until (context, {until, max_gen_toks, temperature, do_sample}): a batched continuation with the
  KV cache (mistura.infer.generate.generate_text), cut at the first stop string.

Prompts are encoded as the model was trained: BOS, then the text.

`lm_eval` finds its models in its own registry, which nothing outside its package fills before its
command line runs; `python -m mistura.eval.harness` registers `mistura` and then runs that command
line, with every one of its options, and with mistura's own tasks (mistura.eval.tasks) as the
include path unless `--include_path` names another.
"""

from __future__ import annotations

import functools
import logging
import sys
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

import mistura
from mistura.data.tokenizer import BOS_ID, EOS_ID
from mistura.errors import ConfigError
from mistura.eval.perplexity import spans_nll, windows
from mistura.infer.generate import generate_text
from mistura.infer.sampling import Sampling
from mistura.loading import load_tokenizer

DEFAULT_MAX_GEN_TOKS = 256

log = logging.getLogger(__name__)


@register_model("mistura")
class MisturaLM(TemplateLM):
    """A mistura checkpoint (anything `mistura.load` reads) as an lm_eval model."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, device: str = "cpu", dtype: str | None = None):
        super().__init__()
        from mistura.shards import parse_dtype

        if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # as lm_eval's own models do
            log.warning("device %s: this machine has no CUDA device, running on the CPU", device)
            device = "cpu"
        self.model = mistura.load(pretrained, device, parse_dtype(dtype))
        self.tokenizer = load_tokenizer(pretrained)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(f"the mistura model takes a batch size of 1 or more requests, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.context = self.model.config.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return BOS_ID

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """BOS and the string's ids, as training encoded documents; without BOS when add_special_tokens is False."""
        ids = self.tokenizer.encode(string).ids
        return ids if add_special_tokens is False else [BOS_ID, *ids]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each (key, context ids, continuation ids), batched by length."""
        rows = [(context + continuation)[-(self.context + 1) :] for _, context, continuation in requests]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm) as bar:
            for _, same in groupby(order, key=lambda i: len(rows[i])):
                same = list(same)
                for start in range(0, len(same), self.batch_size):
                    batch = same[start : start + self.batch_size]
                    lengths = [len(requests[i][2]) for i in batch]
                    for i, answer in zip(batch, self._score([rows[i] for i in batch], lengths)):
                        answers[i] = answer
                    bar.update(len(batch))
        return answers

    @torch.no_grad()
    def _score(self, rows: list[list[int]], lengths: list[int]) -> list[tuple[float, bool]]:
        """For rows of one length, the log-probability of each row's last `length` tokens, and whether each was
        the argmax."""
        device = self.model.tok_emb.weight.device
        ids = torch.tensor(rows, device=device)  # (B, T)
        hidden = self.model.hidden_states(ids[:, :-1])[:, -max(lengths) :]  # (B, n, D): token t + 1 at t
        logprobs = F.log_softmax(self.model.logits(hidden).float(), dim=-1)  # (B, n, V), only the scored positions
        answers = []
        for row, n in enumerate(lengths):
            target = ids[row, -n:]  # (n,)
            scores = logprobs[row, -n:]  # (n, V)
            chosen = scores.gather(1, target[:, None]).sum().item()
            answers.append((chosen, bool((scores.argmax(-1) == target).all())))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood, over windows of the model's context moving by half of it."""
        stride = max(1, self.context // 2)
        totals = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            ids = self.tok_encode(text)
            spans = [(ids, *span) for span in windows(len(ids), self.context, stride)]
            totals.append(-spans_nll(self.model, spans, self.context))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut at its first stop string; requests with the same settings batched."""
        jobs = [(context, self._sampling(kwargs)) for context, kwargs in (request.args for request in requests)]
        order = sorted(range(len(jobs)), key=lambda i: repr(jobs[i][1]))
        answers = [""] * len(jobs)
        with tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm) as bar:
            for _, same in groupby(order, key=lambda i: repr(jobs[i][1])):
                same = list(same)
                for start in range(0, len(same), self.batch_size):
                    batch = same[start : start + self.batch_size]
                    sampling = jobs[batch[0]][1]
                    room = self.context - sampling.max_new_tokens
                    prompts = [self.tok_encode(jobs[i][0])[-room:] for i in batch]
                    for i, text in zip(batch, generate_text(self.model, self.tokenizer, prompts, sampling)):
                        answers[i] = text
                    bar.update(len(batch))
        return answers

    def _sampling(self, kwargs: dict[str, Any]) -> Sampling:
        """lm_eval's generation settings as mistura's: greedy unless do_sample, at most half the context."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        new = min(int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.context // 2)
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        return Sampling(max_new_tokens=new, temperature=temperature, top_k=None, stop=tuple(s for s in until if s))


def evaluate_tasks(
    checkpoint: str | Path,
    tasks: list[str],
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """lm_eval's simple_evaluate of `tasks` on the checkpoint, mistura's own tasks included: the checkpoint, the
    tasks, and lm_eval's results, versions, n-shot, higher_is_better and n-samples (what make_table reads)."""
    from lm_eval import simple_evaluate

    from mistura.loading import locate

    locate(checkpoint)  # a missing checkpoint is an error before the harness starts
    manager = task_manager(tasks, include_path)
    results = simple_evaluate(
        model="mistura",
        model_args={"pretrained": str(checkpoint)} | ({"dtype": dtype} if dtype else {}),
        batch_size=batch_size,
        device=str(device),
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,  # a count, or a fraction of each task
        task_manager=manager,
        verbosity="ERROR",
    )
    kept = ("results", "versions", "n-shot", "higher_is_better", "n-samples")
    return {"checkpoint": str(checkpoint), "tasks": tasks, **{key: results[key] for key in kept if key in results}}


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm_eval's TaskManager over its tasks, mistura's own and `include_path`'s; ConfigError names unknown tasks."""
    manager = _task_manager(str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-evaluation-harness task(s): {', '.join(unknown)} (see `lm_eval ls tasks`)")
    return manager


@functools.cache
def _task_manager(include_path: str | None):
    """One TaskManager per include path and process: building one reads every task YAML (seconds)."""
    from lm_eval.tasks import TaskManager

    from mistura.eval.tasks import TASKS_DIR

    return TaskManager(include_path=[str(TASKS_DIR)] + ([include_path] if include_path else []))


def main() -> None:
    """lm_eval's command line, with the `mistura` model registered and mistura's tasks included."""
    from lm_eval.__main__ import cli_evaluate

    from mistura.eval.tasks import TASKS_DIR

    sys.argv[0] = "lm_eval"
    if len(sys.argv) > 2 and not {"--include_path", "-h", "--help"} & set(sys.argv):  # run, ls or validate
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
