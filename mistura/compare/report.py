"""`<out>/report.md`: the whole study on one page.

At the top the command and the machine; then the shared set-up, a table of every run, the
MoE layers' statistics, a generated summary (lowest perplexity; most learned per active
parameter and per training FLOP), the plots and one sample per prompt and run.

"Learned" is the validation loss a run gained over the unigram baseline (nats/token): a
model that ignores context scores the baseline, so the gain is what the architecture and
its training bought, and dividing it by the active parameters or the training FLOPs asks
which run spent them best.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from mistura.compare.metrics import FINAL_FRACTION, WARMUP_FRACTION
from mistura.plan import TOKENS_PER_PARAM


def write_report(
    results: list[dict[str, Any]],
    out: Path,
    title: str,
    command: str,
    scores: list[dict[str, Any]] | None = None,
) -> Path:
    """Write out/report.md from the runs' metrics, their samples in out/generations/ and, if the suite has an
    `eval:` block, their scores (mistura.compare.evaluate)."""
    train = results[0]["spec"]["run"]["train"]
    data = results[0]["spec"]["run"]["data"]
    seq_len = results[0]["spec"]["run"]["model"]["max_seq_len"]
    lines = [
        f"# Comparison study: {title}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Written: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; trained on "
        f"{', '.join(sorted({r['device'] for r in results}))}.",
        "",
        f"Every run reads the same tokens in the same order: data `{data['dir']}` (source {data['source']}, "
        f"vocabulary {data['vocab_size']}), {train['max_steps']} steps x {train['batch_size'] * train['grad_accum']} "
        f"x {seq_len} = {results[0]['tokens']:,} training tokens, seed {train['seed']}, learning rate {train['lr']:g} "
        f"with {train['warmup_steps']} warm-up steps and a cosine decay to {train['min_lr_ratio']:g}x; validation "
        f"on {train['eval_batches']} batches every {train['eval_interval']} steps. That is "
        f"{results[0]['tokens'] / results[0]['params_active']:.2g} tokens per active parameter of {results[0]['run']}; "
        f"compute-optimal training would give it about {TOKENS_PER_PARAM:g} (`mistura plan`).",
        "",
        "## Results",
        "",
        *results_table(results),
        "",
        *moe_table(results),
        *eval_table(results, scores),
        "## Summary",
        "",
        *summary(results),
        "",
        "## Plots",
        "",
        "![every run](plots/convergence.png)",
        "",
        *plots(results),
        "## Samples",
        "",
        *samples(results, out / "generations"),
        "## How the figures are measured",
        "",
        *definitions(),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def machine() -> str:
    """CPU model, cores, memory, OS, Python, PyTorch and GPU of the machine writing the report."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; {platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}, PyTorch {torch.__version__}{gpu}"
    )


def results_table(results: list[dict[str, Any]]) -> list[str]:
    header = [
        "run", "model", "params total", "params active", "FLOPs/token", "val loss", "val ppl", "best val ppl",
        "train loss", "tokens/s", "peak memory", "wall",
    ]  # fmt: skip
    rows = [
        [
            r["run"],
            f"`{r['model']}`",
            millions(r["params_total"]),
            millions(r["params_active"]),
            millions(r["flops_per_token"]),
            f"{r['val_loss']:.3f}",
            f"{r['val_ppl']:.1f}",
            f"{r['best_val_ppl']:.1f}",
            f"{r['train_loss']:.3f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB",
            f"{r['wall_s']:,.0f} s",
        ]
        for r in results
    ]
    return table(header, rows)


def moe_table(results: list[dict[str, Any]]) -> list[str]:
    """Each MoE run's layer statistics, averaged over its MoE layers (per layer: the metrics JSON)."""
    rows = [moe_row(r) for r in results if r["moe"]]
    if not rows:
        return []
    header = [
        "run", "MoE layers", "max util", "min util", "load CV", "entropy", "dropped", "dead experts", "aux losses",
    ]  # fmt: skip
    return [
        "### Mixture-of-Experts layers",
        "",
        f"Means over the last {FINAL_FRACTION:.0%} of training steps, then over the run's MoE layers "
        "(each layer's own figures and expert loads are in `metrics/<run>_metrics.json`). Utilisation is an "
        "expert's share of the assignments times the number of experts: 1 is an even load.",
        "",
        *table(header, rows),
        "",
    ]


def moe_row(result: dict[str, Any]) -> list[str]:
    layers = list(result["moe"].values())
    mean = {key: sum(layer[key] for layer in layers) / len(layers) for key in layers[0] if key != "load"}
    losses = ", ".join(f"{key} {value:.3g}" for key, value in mean.items() if key.endswith("_loss"))
    return [
        result["run"],
        ", ".join(result["moe"]),
        f"{mean['max_util']:.2f}",
        f"{mean['min_util']:.2f}",
        f"{mean['load_cv']:.3f}",
        f"{mean['entropy']:.3f}",
        f"{mean['dropped_fraction']:.2%}",
        f"{mean['dead_experts']:.2f}",
        losses,
    ]


def eval_table(results: list[dict[str, Any]], scores: list[dict[str, Any]] | None) -> list[str]:
    """Each run's validation perplexity beside its scores on the suite's text and lm-evaluation-harness tasks."""
    if not scores:
        return []
    spec = scores[0]["spec"]
    header = ["run", "val ppl"] + (["text ppl", "text bits/byte"] if spec["text"] else [])
    metrics = [(task, key) for task, figures in scores[0]["tasks"].items() for key in figures if is_metric(key)]
    header += [f"{task} {key.removesuffix(',none')}" for task, key in metrics]
    rows = []
    for result, score in zip(results, scores):
        text = [f"{score['text']['perplexity']:.1f}", f"{score['text']['bits_per_byte']:.3f}"] if spec["text"] else []
        tasks = [with_stderr(score["tasks"][task], key) for task, key in metrics]
        rows.append([result["run"], f"{result['val_ppl']:.1f}", *text, *tasks])
    return ["### Evaluation", "", eval_note(spec, scores[0]["text"]), "", *table(header, rows), ""]


def eval_note(spec: dict[str, Any], text: dict[str, Any] | None) -> str:
    """What the evaluation table's columns were measured on."""
    note = []
    if text:
        note.append(f"Text: `{spec['text']}`, windows of {text['ctx']} tokens moving by {text['stride']}.")
    if spec["tasks"]:
        limit = f", at most {spec['limit']:g} examples per task" if spec["limit"] is not None else ""
        shots = f", {spec['num_fewshot']} shot(s)" if spec["num_fewshot"] is not None else ""
        note.append(f"Tasks: lm-evaluation-harness{limit}{shots}; ± is the standard error.")
    return " ".join(note + ["Each run's scores are in `evals/<run>_eval.json`."])


def is_metric(key: str) -> bool:
    """lm_eval's "acc,none" is a metric under filter none; "acc_stderr,none" is its standard error."""
    return "," in key and "_stderr," not in key


def with_stderr(figures: dict[str, Any], key: str) -> str:
    name, _, where = key.partition(",")
    value, stderr = figures[key], figures.get(f"{name}_stderr,{where}")
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.3f} ± {stderr:.3f}" if isinstance(stderr, (int, float)) else f"{value:.3f}"


def summary(results: list[dict[str, Any]]) -> list[str]:
    def gain(r: dict[str, Any]) -> float:
        return r["unigram_loss"] - r["val_loss"]

    best = min(results, key=lambda r: r["val_loss"])
    per_param = max(results, key=lambda r: gain(r) / r["params_active"])
    per_flop = max(results, key=lambda r: gain(r) / r["train_flops"])
    return [
        f"- Lowest validation perplexity: **{best['run']}**, {best['val_ppl']:.1f} (loss {best['val_loss']:.3f}; "
        f"unigram baseline {best['unigram_loss']:.3f}).",
        f"- Most learned per active parameter: **{per_param['run']}**, "
        f"{gain(per_param) / per_param['params_active'] * 1e6:.3f} nats/token below the unigram baseline per million "
        f"active parameters.",
        f"- Most learned per training FLOP: **{per_flop['run']}**, "
        f"{gain(per_flop) / per_flop['train_flops'] * 1e15:.3f} nats/token per PFLOP of training.",
    ]


def plots(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        lines += [f"### {r['run']}", "", f"![{r['run']} convergence](plots/{r['run']}_convergence.png)"]
        if r["moe"]:
            lines.append(f"![{r['run']} expert utilisation](plots/{r['run']}_utilisation.png)")
        lines.append("")
    return lines


def samples(results: list[dict[str, Any]], directory: Path) -> list[str]:
    """The first seed's continuation of every prompt, run by run (all samples: generations/<run>_generations.json)."""
    by_run = {
        r["run"]: json.loads((directory / f"{r['run']}_generations.json").read_text(encoding="utf-8")) for r in results
    }
    first = next(iter(by_run.values()))
    lines = [
        f"Seed {first['samples'][0]['seed']}; every sample of every seed is in `generations/<run>_generations.json`.",
        "",
    ]
    for prompt in dict.fromkeys(s["prompt"] for s in first["samples"]):
        lines += [f"**{prompt}** ...", ""]
        for run, generations in by_run.items():
            text = next(s["completion"] for s in generations["samples"] if s["prompt"] == prompt)
            lines.append(f"- {run}: {' '.join((prompt + text).split())}")  # one line: newlines become spaces
        lines.append("")
    return lines


def definitions() -> list[str]:
    return [
        "- FLOPs/token: training (forward + backward) FLOPs per token: 6 x the active parameters without the input "
        "lookup tables (a tied output projection included) + 6 x layers x context x heads x (query/key + value head "
        "widths), plus for collaborative experts their attentions over the E and K experts' answers (the formula is "
        "in `mistura/compare/counts.py`). Capacity dropping is not subtracted.",
        "- Peak memory: the peak resident set size of the process that trained the run, Python and PyTorch included "
        "(each run has its own process); on CUDA the peak memory allocated by tensors.",
        f"- tokens/s: median of the logged training throughput, leaving out the first {WARMUP_FRACTION:.0%} of the "
        "steps and the first record of each session.",
        "- learned: the unigram baseline's validation loss minus the run's, in nats/token.",
        f"- train loss: mean main training loss over the last {FINAL_FRACTION:.0%} of the steps; "
        "wall: training time, summed over sessions when a run was resumed.",
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def millions(n: float) -> str:
    return f"{n / 1e6:.2f} M"
