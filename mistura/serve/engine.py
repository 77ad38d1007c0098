"""The serving engine: continuous batching over a paged KV cache, with prefix caching and preemption.

    engine = Engine(model, eos_id, max_seqs=16, block_size=8)
    engine.add("r1", Request(prompt_ids, Sampling(max_new_tokens=64, temperature=0)))
    while engine.has_work:
        for event in engine.step():   # each sequence's new token, as it comes
            ...

Requests wait in a queue; each `step` is one forward of the running batch (iteration-level scheduling,
as in Orca and vLLM):

1. every running sequence gets its next tokens first: one for a decode, the next chunk of its prompt while
   its prefill is under way; at most `max_batched_tokens` in all, so a long prompt is prefilled in
   chunks between the decodes of the others instead of stalling them;
2. waiting requests join in arrival order, while there are sequence slots, token budget and free blocks:
   a prompt takes the cached blocks of its longest already computed prefix (mistura.serve.blocks) and
   computes only the rest;
3. one forward over all of them reads and writes the KV cache through each sequence's block table
   (mistura.model.paged); a sequence whose tokens are all computed draws its next token, and ends at
   EOS or at its length limit, its blocks released at once.

A sequence that needs a block when none is free preempts the latest admitted running sequence, which
gives back its blocks and waits at the head of the queue to be computed again from its tokens (prompt
and output so far: recomputation, vLLM's default), its sampling generator where it stood. So no request
fails for lack of blocks, and a greedy one returns exactly what it would alone.

The n completions of one request share its prompt's blocks: the prompt is computed once, and n sequences
fork from it at the first token, each with its own generator (seed + index); the first write into the
shared, partly filled last block copies it (copy-on-write).

Static batching (`static_batching`) admits requests only when nothing runs: the baseline that
continuous batching is measured against (benchmarks/serve.py).

`attention` is how each forward reads the pool (mistura.model.paged_attention): "gather" (SDPA over each
row's context read out of the pool) or "flex" (FlexAttention on the pool in place, compiled for every
query bucket up to `max_batched_tokens` when the engine is built).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from mistura.errors import ConfigError, DataError
from mistura.infer.engine import check_prompts, new_token_budget
from mistura.infer.sampling import Sampling, penalize_repetition, sample_next
from mistura.model import Transformer
from mistura.model.paged import PagedRow, PagePool
from mistura.serve.blocks import BlockManager, OutOfBlocks

MAX_LOGPROBS = 20


@dataclass
class Request:
    """A prompt to continue, n times; stop strings are the caller's to detect (it then aborts the request)."""

    prompt: list[int]
    sampling: Sampling
    n: int = 1
    logprobs: int | None = None  # with each token, its log-probability and this many top alternatives


@dataclass
class Event:
    """A new token of completion `index` of a request; finish_reason "stop" (the token is EOS) or "length" on
    its last."""

    request_id: str
    index: int
    token: int
    logprob: float | None = None  # under the model's raw distribution
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), most likely first
    finish_reason: str | None = None


@dataclass
class EngineStats:
    waiting: int
    running: int
    blocks_total: int
    blocks_used: int
    cached_tokens: int  # positions the used blocks hold (a shared block counted once)
    preemptions: int
    prefix_hit_tokens: int
    generated_tokens: int


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int
    tokens: list[int]  # prompt, then output
    limit: int  # length at which it ends: prompt + max_new_tokens, or the model's context
    request: Request
    generator: torch.Generator
    forks: int  # completions that fork from this one at its first token
    table: list[int] = field(default_factory=list)  # its blocks, in position order
    names: list[bytes] = field(default_factory=list)  # its full blocks' prefix-cache names
    computed: int = 0  # tokens whose keys and values the cache holds


class Engine:
    def __init__(
        self,
        model: Transformer,
        eos_id: int | None,
        *,
        max_seqs: int = 16,
        block_size: int = 8,
        n_blocks: int | None = None,
        kv_bytes: int | None = None,
        max_batched_tokens: int = 256,
        prefix_caching: bool = True,
        static_batching: bool = False,
        attention: str = "gather",
    ):
        if max_seqs < 1 or max_batched_tokens < 1 or block_size < 1:
            raise ConfigError("max_seqs, max_batched_tokens and block_size must be >= 1")
        if n_blocks is not None and kv_bytes is not None:
            raise ConfigError("give the KV pool's size in blocks or in bytes, not both")
        if kv_bytes is not None:
            n_blocks = kv_bytes // PagePool.block_bytes(model, block_size)
            if n_blocks < 1:
                raise ConfigError(
                    f"a KV pool of {kv_bytes} bytes holds no block of {block_size} positions "
                    f"({PagePool.block_bytes(model, block_size)} bytes each)"
                )
        n_blocks = n_blocks or max_seqs * math.ceil(model.config.max_seq_len / block_size)
        self.model, self.eos_id = model.eval(), eos_id
        self.max_seqs, self.max_batched_tokens, self.static_batching = max_seqs, max_batched_tokens, static_batching
        self.pool = PagePool(model, n_blocks, block_size, attention)
        self.pool.warm_up(model, max_batched_tokens)
        self.blocks = BlockManager(n_blocks, block_size, prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.requests: dict[str, list[Sequence]] = {}
        self.preemptions = self.prefix_hit_tokens = self.generated_tokens = 0

    def add(self, request_id: str, request: Request) -> None:
        """Queue `request`; a bad one raises (DataError, ConfigError) and is not queued."""
        if request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        (prompt,) = check_prompts([request.prompt], self.model.config.vocab_size)
        steps = new_token_budget(self.model, len(prompt), request.sampling.max_new_tokens)
        if not 1 <= request.n <= self.max_seqs:
            raise ConfigError(f"n must be between 1 and the {self.max_seqs} sequences the engine runs, got {request.n}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {request.logprobs}")
        blocks = math.ceil((len(prompt) + steps) / self.blocks.block_size)
        if blocks > self.blocks.n_blocks:
            raise DataError(
                f"a prompt of {len(prompt)} tokens and {steps} new ones need {blocks} KV blocks; "
                f"the pool has {self.blocks.n_blocks}"
            )
        seq = Sequence(request_id, 0, prompt, len(prompt) + steps, request, self._generator(request, 0), request.n - 1)
        self.requests[request_id] = [seq]
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Drop every sequence of the request at once, freeing its blocks; an unknown id is ignored."""
        for seq in self.requests.pop(request_id, []):
            if seq in self.running:
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
            self.blocks.release(seq.table)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        """Counts of the moment; only running sequences hold blocks, each full but for those past `computed`."""
        P = self.blocks.block_size
        unfilled: dict[int, int] = {}  # a block past some sequence's computed tokens -> positions left empty
        for seq in self.running:
            full = seq.computed // P
            for i, block in enumerate(seq.table[full:], full):
                unfilled[block] = min(unfilled.get(block, P), P - max(0, seq.computed - i * P))
        return EngineStats(
            len(self.waiting),
            len(self.running),
            self.blocks.n_blocks,
            self.blocks.used,
            self.blocks.used * P - sum(unfilled.values()),
            self.preemptions,
            self.prefix_hit_tokens,
            self.generated_tokens,
        )

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One iteration: schedule, one forward, the new tokens (see the module docstring)."""
        batch = self._schedule()
        if not batch:
            return []
        logits = self._forward(batch)  # (B, V)
        events = []
        for (seq, n), row in zip(batch, logits):
            seq.computed += n
            self.blocks.name(seq.table, seq.names, seq.tokens, seq.computed)
            if seq.computed == len(seq.tokens):
                events += self._sample(seq, row)
        return events

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """The sequences of this step's forward and how many new tokens each computes."""
        budget, batch = self.max_batched_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            n = min(len(seq.tokens) - seq.computed, budget)
            if seq in self.running and self._make_room(seq, n):
                batch.append((seq, n))
                budget -= n
        admitting = not (self.static_batching and self.running)
        while admitting and self.waiting and (budget > 0 or self.static_batching):
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.forks > self.max_seqs:
                break
            n = self._admit(seq, budget)
            if n is None:
                break
            self.waiting.popleft()
            self.running.append(seq)
            if n > 0:
                batch.append((seq, n))
                budget -= n
        return batch

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Blocks for seq's next n tokens, preempting the latest admitted sequences while none are free; False
        when seq itself had to go."""
        while True:
            try:
                self._reserve(seq, n)
                return True
            except OutOfBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False

    def _reserve(self, seq: Sequence, n: int) -> None:
        """Make seq's table cover its next n tokens: its shared, partly filled last block copied (copy-on-write),
        then new blocks appended; OutOfBlocks when none is free."""
        P = self.blocks.block_size
        if seq.computed % P and n:
            shared = self.blocks.writable(seq.table, seq.computed // P)
            if shared is not None:
                self.pool.copy_block(shared, seq.table[seq.computed // P])
        while len(seq.table) * P < seq.computed + n:
            seq.table.append(self.blocks.allocate())

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Start a waiting sequence: its cached prefix taken, blocks for its first chunk of at most `budget` tokens
        reserved; how many tokens that chunk has, or None (nothing taken) when the free blocks do not cover it."""
        P = self.blocks.block_size
        table, names = self.blocks.cached_prefix(seq.tokens[:-1])  # the last token is computed for its logits
        computed = len(table) * P
        n = min(len(seq.tokens) - computed, budget)
        if math.ceil((computed + n) / P) - len(table) > self.blocks.available:
            self.blocks.release(table)
            return None
        seq.table, seq.names, seq.computed = table, names, computed
        self.prefix_hit_tokens += computed
        self._reserve(seq, n)
        return n

    def _preempt(self, seq: Sequence) -> None:
        """Give back seq's blocks; it waits first in the queue, to be computed again from its tokens."""
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.table, seq.names, seq.computed = [], [], 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _forward(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """The logits (B, V) after each sequence's last new token."""
        rows = [PagedRow(seq.table, seq.computed, seq.tokens[seq.computed : seq.computed + n]) for seq, n in batch]
        paged = self.pool.batch(rows)
        hidden = self.model.hidden_states(paged.ids, paged.cache)  # (1, N, D)
        return self.model.logits(hidden[0][paged.last])

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> list[Event]:
        """seq's next token from logits (V,), and those of the completions forking from it at its first."""
        logits = logits[None].float()  # (1, V)
        request = seq.request
        scores = logits
        if request.sampling.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, seq.tokens] = True
            scores = penalize_repetition(logits, seen, request.sampling.repetition_penalty)
        logprobs = torch.log_softmax(logits[0], dim=-1) if request.logprobs is not None else None
        sequences = [seq, *(self._fork(seq, index) for index in range(1, seq.forks + 1))]
        seq.forks = 0
        return [self._emit(s, int(sample_next(scores, request.sampling, s.generator)), logprobs) for s in sequences]

    def _fork(self, seq: Sequence, index: int) -> Sequence:
        """Completion `index` of seq's request, sharing seq's blocks, right after its prompt."""
        for block in seq.table:
            self.blocks.hold(block)
        fork = replace(
            seq,
            index=index,
            forks=0,
            tokens=list(seq.tokens),
            generator=self._generator(seq.request, index),
            table=list(seq.table),
            names=list(seq.names),
        )
        self.running.append(fork)
        self.requests[seq.request_id].append(fork)
        return fork

    def _emit(self, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> Event:
        seq.tokens.append(token)
        self.generated_tokens += 1
        event = Event(seq.request_id, seq.index, token)
        if logprobs is not None:
            event.logprob = float(logprobs[token])
            top = torch.topk(logprobs, seq.request.logprobs)
            event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        if token == self.eos_id:
            event.finish_reason = "stop"
        elif len(seq.tokens) >= seq.limit:
            event.finish_reason = "length"
        if event.finish_reason is not None:
            self._finish(seq)
        return event

    def _finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.table = []
        siblings = self.requests[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self.requests[seq.request_id]

    def _generator(self, request: Request, index: int) -> torch.Generator:
        device = self.model.tok_emb.weight.device
        return torch.Generator(device=device).manual_seed(request.sampling.seed + index)
