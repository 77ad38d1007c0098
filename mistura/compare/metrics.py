"""One run's results, as `<out>/metrics/<run>_metrics.json`, from its training log and summary.

    run, model, device               the run's name, its model's name, where it trained
    steps, tokens                    optimizer steps and training tokens seen (steps x batch x seq)
    val_loss, val_ppl                final validation loss (main loss only, nats/token), perplexity
    best_val_loss, best_val_ppl      the lowest over every evaluation of the run
    train_loss                       mean main training loss over the final window (below)
    unigram_loss                     the context-free baseline on the same validation tokens
    tokens_per_s                     median training throughput after warm-up (below)
    peak_memory_bytes, peak_memory_kind
                                     the peak resident set size of the process that trained the
                                     run (Python and PyTorch included: each run has its own
                                     process; a resumed run's last one), or on CUDA the peak
                                     memory allocated by tensors
    params_total, params_active, params_embedding, flops_per_token, train_flops
                                     see mistura.compare.counts; train_flops = flops_per_token x tokens
    moe                              per MoE layer (by model layer index): means over the final
                                     window of its training statistics (mistura.train.moe_metrics):
                                     load (share of assignments per expert), max_util, min_util,
                                     load_cv, dead_experts, entropy, dropped_fraction, aux losses
    wall_s                           training wall time, summed over sessions when resumed
    history                          the curves the plots draw: training and validation loss
                                     against tokens, and each MoE layer's expert load over training

Windows: the final window is the training records of the last FINAL_FRACTION of the steps
(at least the last record), so final figures are not one noisy batch. Throughput leaves out
the records of the first WARMUP_FRACTION of the steps and the first record of every session
(allocator, caches and thread pools warming up); the median then shrugs off the windows that
include an evaluation. A resumed session restarts `elapsed_s` from zero, which is how
sessions are told apart.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from typing import Any

import torch

FINAL_FRACTION = 0.1
WARMUP_FRACTION = 0.1
EXPERT_LOAD = re.compile(r"moe/\d+/load_\d+")  # one expert's share; moe/L/load_cv is a statistic


def run_metrics(
    name: str,
    model_name: str,
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    counts: dict[str, int],
    tokens_per_step: int,
    max_steps: int,
    memory: dict[str, Any],
) -> dict[str, Any]:
    """The metrics JSON of a finished run (fields in the module docstring)."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    final = [r for r in train if r["step"] > (1 - FINAL_FRACTION) * max_steps] or train[-1:]
    best = min([r["val_loss"] for r in evals] + [summary["val_loss"]])
    tokens = summary["steps"] * tokens_per_step
    return {
        "run": name,
        "model": model_name,
        "device": memory["device"],
        "steps": summary["steps"],
        "tokens": tokens,
        "val_loss": summary["val_loss"],
        "val_ppl": summary["val_ppl"],
        "best_val_loss": best,
        "best_val_ppl": math.exp(best),
        "train_loss": statistics.fmean(r["loss/main"] for r in final),
        "unigram_loss": summary["unigram_loss"],
        "tokens_per_s": median_tokens_per_s(train, max_steps),
        "peak_memory_bytes": memory["bytes"],
        "peak_memory_kind": memory["kind"],
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_embedding": counts["embedding"],
        "flops_per_token": counts["flops_per_token"],
        "train_flops": counts["flops_per_token"] * tokens,
        "moe": moe_layers(final),
        "wall_s": sum(session[-1]["elapsed_s"] for session in sessions(train)),
        "history": history(train, evals),
    }


def sessions(train: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Training records grouped by session: elapsed_s starts again from zero when a run resumes."""
    groups: list[list[dict[str, Any]]] = []
    for record in train:
        if not groups or record["elapsed_s"] < groups[-1][-1]["elapsed_s"]:
            groups.append([])
        groups[-1].append(record)
    return groups


def median_tokens_per_s(train: list[dict[str, Any]], max_steps: int) -> float:
    """Median logged throughput after warm-up (see the module docstring); all records if none are left."""
    warm = [r for s in sessions(train) for r in s[1:] if r["step"] > WARMUP_FRACTION * max_steps]
    return statistics.median(r["tokens_per_s"] for r in warm or train)


def moe_layers(window: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{layer: {"load": [mean share of each expert], statistic: mean, ...}} over the window's records."""
    layers = {}
    for layer in layer_ids(window[-1]):
        prefix = f"moe/{layer}/"
        names = [k[len(prefix) :] for k in window[-1] if k.startswith(prefix) and not EXPERT_LOAD.fullmatch(k)]
        loads = zip(*(load_shares(r, layer) for r in window))  # per expert, its share in each record
        layers[layer] = {
            "load": [statistics.fmean(shares) for shares in loads],
            **{name: statistics.fmean(r[prefix + name] for r in window) for name in names},
        }
    return layers


def history(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The plotted curves: losses against tokens seen, and every MoE layer's load shares per training record."""
    return {
        "train_tokens": [r["tokens"] for r in train],
        "train_loss": [r["loss/main"] for r in train],
        "val_tokens": [r["tokens"] for r in evals],
        "val_loss": [r["val_loss"] for r in evals],
        "expert_load": {layer: [load_shares(r, layer) for r in train] for layer in layer_ids(train[-1])},
    }


def layer_ids(record: dict[str, Any]) -> list[str]:
    """The MoE layers a training record reports on (keys moe/<layer>/...), in model order."""
    return sorted({key.split("/")[1] for key in record if key.startswith("moe/")}, key=int)


def load_shares(record: dict[str, Any], layer: str) -> list[float]:
    n_experts = sum(bool(EXPERT_LOAD.fullmatch(key)) and key.split("/")[1] == layer for key in record)
    return [record[f"moe/{layer}/load_{i}"] for i in range(n_experts)]


def peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory so far: tensors allocated on CUDA, the resident set size elsewhere."""
    if device.type == "cuda":
        return {"device": str(device), "bytes": torch.cuda.max_memory_allocated(device), "kind": "CUDA peak allocated"}
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"device": str(device), "bytes": peak * scale, "kind": "process peak RSS"}
