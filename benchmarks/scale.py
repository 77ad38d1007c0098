"""Scale-out on CPU processes: data parallelism (DDP, FSDP2) and expert parallelism over gloo, against one process.

Every configuration runs on its own freshly spawned processes, joined in a gloo process group, each process
with max(1, cores // processes) torch threads: on 2 cores, 2 processes split the cores and 4 oversubscribe
them. A broken collective fails after --collective-timeout seconds, and a configuration that does not finish
within --timeout seconds is killed, so the script cannot hang.

1. Data parallelism. A dense Llama-style model trains --steps timed steps (after --warmup) of AdamW on random
   tokens, at the same global batch in every configuration, each process on its contiguous rows of it:
   1 process; then at 2 and 4 processes "no sync" (each process trains its slice alone: the compute of the
   step with the same contention, the floor of the synchronised runs), DDP and FSDP2 (mistura's shard_model).
   The configurations run in turn, --rounds times over: a configuration's step is the slowest rank's median
   step in its fastest round, and tokens/s count the global batch over it. Per rank: the peak RSS, and the
   bytes this rank holds of the parameters, gradients and AdamW state (its shards under FSDP, counted by
   storage so that any padding counts), against the unsharded total / N; the activations the forward keeps
   for backward (saved-tensor hooks, parameters left out).
2. The planner (mistura.parallel.memory, `mistura plan --memory`) for the same model and layouts (fp32,
   ddp or fsdp, dp = N, micro-batch = the rank's rows), beside the measured bytes.
3. Expert parallelism. A MoE model with shard_experts_ at ep = 2 and 4 (ep = processes), each rank on its own
   batch: the payload bytes its all_to_alls send to other ranks in one forward + backward (the layers'
   counters), against the exact count from that step's routing (rows routed to experts on other ranks, and
   rows other ranks route here, whose outputs go back) and against the planner's formula
   4 n_moe (e - 1) / e B S top_k h w, which assumes even routing and no capacity drops. Then the step time
   of the split model against the unsplit one on the same per-rank batch, interleaved in rounds in the same
   processes (forward + backward only: no optimizer step, no all-reduce of the replicated parameters).

Every process keeps its freed memory for reuse, as `mistura train` does on the CPU (mistura.train.allocator), so
the step's large tensors (the logits) are not mapped and page-faulted anew on every step. Step times suffer when
other processes share the CPU: the tables give the load average after each configuration; trust a run where it
stays near the number of cores (the processes' own threads count in it).

The output ends with Markdown tables and the machine, to paste into BENCHMARKS.md.

    python benchmarks/scale.py                          # the default run, 3.5 minutes on 2 quiet cores
    python benchmarks/scale.py --steps 4 --worlds 1 2   # quicker
    python benchmarks/scale.py --layers 4 --moe-model deepseek-moe-tiny
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import platform
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from mistura.config import ModelConfig
from mistura.model import Transformer
from mistura.parallel.distributed import data_parallel_model
from mistura.parallel.expert import ExpertParallelMoE, comm_bytes, reset_comm_bytes, shard_experts_
from mistura.parallel.fsdp import shard_model
from mistura.parallel.memory import Layout, memory_plan
from mistura.train.allocator import retain_freed_memory

MIB = 2**20
CORES = len(os.sched_getaffinity(0))
FP32 = 4
MODES = ("no sync", "ddp", "fsdp")  # at 2 processes and more
MEMORY = ("peak_rss", "rss_before", "parameters", "gradients", "optimizer", "activations")  # bytes, per rank


def main() -> None:
    args = parse_args()
    print(machine())
    print(f"command: python {' '.join(sys.argv)}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}\n")
    dense = data_parallel(args)
    experts = expert_parallel(args)
    report(args, dense, experts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dense = parser.add_argument_group("data parallelism (dense model)")
    dense.add_argument("--model", default="llama-tiny", help="dense preset (default: llama-tiny, 8 layers)")
    dense.add_argument("--layers", type=int, default=8, help="the preset's n_layer, overridden")
    dense.add_argument("--batch", type=int, default=8, help="global batch, rows (divisible by every world size)")
    dense.add_argument("--seq", type=int, default=256)
    dense.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of processes")
    dense.add_argument("--warmup", type=int, default=2, help="untimed steps")
    dense.add_argument("--steps", type=int, default=6, help="timed steps")
    dense.add_argument("--rounds", type=int, default=2, help="passes over the configurations; the best counts")
    moe = parser.add_argument_group("expert parallelism (MoE model)")
    moe.add_argument("--moe-model", default="qwen-moe-8e-top2", help="MoE preset")
    moe.add_argument("--eps", type=int, nargs="+", default=[2, 4], help="expert-parallel sizes (= processes)")
    moe.add_argument("--moe-batch", type=int, default=4, help="rows per rank")
    moe.add_argument("--moe-seq", type=int, default=256)
    moe.add_argument("--moe-rounds", type=int, default=4, help="timing rounds of split and unsplit steps")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--timeout", type=float, default=300, help="seconds per configuration before its kill")
    limits.add_argument("--collective-timeout", type=float, default=60, help="seconds a collective may wait")
    args = parser.parse_args()
    if 1 not in args.worlds:
        parser.error("--worlds must include 1, the baseline")
    for world in args.worlds:
        if args.batch % world:
            parser.error(f"--batch {args.batch} is not divisible by {world} processes")
    return args


def machine() -> str:
    """CPU model, usable cores, Python and PyTorch versions, date."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    return (
        f"machine: {cpu}, {CORES} cores usable, Python {platform.python_version()}, PyTorch {torch.__version__}, "
        f"{datetime.date.today()}"
    )


def threads(world: int) -> int:
    return max(1, CORES // world)


def spawn(fn: Callable[..., dict[str, Any]], world: int, args: argparse.Namespace, *extra: Any) -> list[dict]:
    """fn(rank, world, args, *extra) on `world` spawned processes in a gloo group; each rank's result, by rank.
    A failing rank raises here with its traceback; the processes are killed after args.timeout seconds."""
    queue = mp.get_context("spawn").SimpleQueue()
    port = free_port()
    context = mp.start_processes(
        _rank_main, args=(fn, world, port, queue, args, extra), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + args.timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world} processes did not finish within {args.timeout:g} s")
    results = [queue.get() for _ in range(world)]
    return sorted(results, key=lambda result: result["rank"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world: int, port: int, queue: Any, args: argparse.Namespace, extra: tuple):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads(world))
    retain_freed_memory()  # as `mistura train` does on the CPU: no page faults on every step's large tensors
    timeout = datetime.timedelta(seconds=args.collective_timeout)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        queue.put({"rank": rank, **fn(rank, world, args, *extra)})
    finally:
        dist.destroy_process_group()


def dense_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_name(args.model, n_layer=args.layers, max_seq_len=args.seq)


def data_parallel(args: argparse.Namespace) -> list[dict]:
    """One summary per configuration: 1 process, then no sync, DDP and FSDP at each larger world size. The
    configurations run in turn, --rounds times over, so that a busy spell of the machine hits one round."""
    runs = [(world, mode) for world in args.worlds for mode in (("single",) if world == 1 else MODES)]
    rounds: dict[tuple[int, str], list[dict]] = {run: [] for run in runs}
    for i in range(args.rounds):
        for world, mode in runs:
            print(f"dense, round {i + 1}: {world} process(es) x {threads(world)} thread(s), {mode} ...", flush=True)
            rounds[world, mode].append(summarise(world, mode, spawn(train_dense, world, args, mode)))
    return [best(passes) for passes in rounds.values()]


def train_dense(rank: int, world: int, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Train this rank's rows of the global batch; its step times and the memory it holds."""
    rss_before = current_rss()
    torch.manual_seed(0)  # the same initial model on every rank
    model = Transformer(dense_config(args)).train()
    forward: torch.nn.Module = model
    if mode == "ddp":
        forward = data_parallel_model(model, torch.device("cpu"))
    elif mode == "fsdp":
        shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = args.batch // world
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1))[rank * rows : (rank + 1) * rows]

    def step() -> float:
        start = time.perf_counter()
        logits = forward(ids[:, :-1])  # (rows, S, V)
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated, to count them
        return time.perf_counter() - start

    activations = saved_activation_bytes(step)  # the first warm-up step
    for _ in range(args.warmup - 1):
        step()
    times = [step() for _ in range(args.steps)]
    return {
        "times": times,
        "rss_before": rss_before,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "parameters": storage_bytes(model.parameters()),
        "gradients": storage_bytes(p.grad for p in model.parameters()),
        "optimizer": storage_bytes(t for state in optimizer.state.values() for t in state.values()),
        "activations": activations,
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


def saved_activation_bytes(step: Callable[[], float]) -> int:
    """Run one step; the bytes of the distinct storages its forward saves for backward, but for the parameters
    and their views (FSDP's gathered parameters too, which it frees after the forward)."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if not isinstance(base, torch.nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (a DTensor's local shard): what the process holds."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def summarise(world: int, mode: str, ranks: list[dict]) -> dict[str, Any]:
    """A configuration's figures in one round: the slowest rank's median step, the largest rank's memory."""
    largest = {key: max(r[key] for r in ranks) for key in MEMORY}
    return {
        "world": world,
        "mode": mode,
        "step": max(statistics.median(r["times"]) for r in ranks),
        "total_parameters": ranks[0]["total_parameters"],
        "load": os.getloadavg()[0],
        **largest,
    }


def best(passes: list[dict]) -> dict[str, Any]:
    """The round with the fastest step, the least disturbed, with every round's step beside it."""
    return {**min(passes, key=lambda s: s["step"]), "steps": [s["step"] for s in passes]}


def moe_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_name(args.moe_model, max_seq_len=args.moe_seq)


def expert_parallel(args: argparse.Namespace) -> list[dict]:
    """One summary per expert-parallel size: bytes sent per rank, measured, exact and planned, and step times."""
    summaries = []
    for ep in args.eps:
        print(f"experts: ep {ep}, {ep} processes x {threads(ep)} thread(s) ...", flush=True)
        ranks = spawn(train_experts, ep, args)
        summaries.append({"ep": ep, "ranks": ranks, "load": os.getloadavg()[0]})
    return summaries


def train_experts(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """This rank's bytes sent in one forward + backward of the split model, and the split and unsplit step times."""
    torch.manual_seed(0)  # the same full model on every rank
    unsplit = Transformer(moe_config(args)).train()
    split = shard_experts_(copy.deepcopy(unsplit), ep=world)
    routed = record_routed_counts(split)
    torch.manual_seed(1 + rank)  # each rank its own batch
    ids = torch.randint(0, unsplit.config.vocab_size, (args.moe_batch, args.moe_seq + 1))
    fwd_bwd(split, ids)  # warm-up, both
    fwd_bwd(unsplit, ids)
    routed.clear()
    reset_comm_bytes(split)
    fwd_bwd(split, ids)
    sent = comm_bytes(split)
    counts = torch.stack(routed)  # (n_moe, E): rows this rank sent per expert in each layer, after capacity
    everyone = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(everyone, counts)
    times: dict[str, list[float]] = {"split": [], "unsplit": []}
    for _ in range(args.moe_rounds):
        times["split"].append(fwd_bwd(split, ids))
        times["unsplit"].append(fwd_bwd(unsplit, ids))
    return {
        "forward": sent.forward,
        "backward": sent.backward,
        "exact": exact_bytes(torch.stack(everyone), rank, unsplit.config.d_model),
        "kept_rows": int(counts.sum()),
        "assignments": counts.shape[0] * ids[:, :-1].numel() * unsplit.config.moe.top_k,
        "parameters": storage_bytes(split.parameters()),
        "split": statistics.median(times["split"]),
        "unsplit": statistics.median(times["unsplit"]),
    }


def record_routed_counts(model: torch.nn.Module) -> list[torch.Tensor]:
    """A list that receives, at every forward of each expert-parallel layer, its rows per expert (E,), those
    the layer sends after routing and capacity: the layer's _run_experts is wrapped to copy its counts."""
    log: list[torch.Tensor] = []

    def run(original: Callable, rows: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        log.append(counts.detach().clone())
        return original(rows, counts, weights)

    for layer in model.modules():
        if isinstance(layer, ExpertParallelMoE):
            layer._run_experts = functools.partial(run, layer._run_experts)
    return log


def exact_bytes(counts: torch.Tensor, rank: int, width: int) -> int:
    """Bytes `rank` sends in a forward + backward, from every rank's rows per expert counts (ep, n_moe, E).
    Forward: its rows for other ranks' experts (dispatch), and the outputs of its experts for the rows other
    ranks sent it (combine); backward: the gradients of both, the same sizes."""
    ep = counts.shape[0]
    by_rank = counts.view(ep, counts.shape[1], ep, -1).sum(-1)  # (source, layer, destination)
    others = [r for r in range(ep) if r != rank]
    rows = by_rank[rank, :, others].sum() + by_rank[others, :, rank].sum()
    return 2 * int(rows) * width * FP32


def fwd_bwd(model: Transformer, ids: torch.Tensor) -> float:
    """Seconds of one forward + backward of cross-entropy and the experts' auxiliary loss."""
    start = time.perf_counter()
    logits, auxes = model(ids[:, :-1], return_aux=True)
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + sum(aux.loss for aux in auxes)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def report(args: argparse.Namespace, dense: list[dict], experts: list[dict]) -> None:
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}\n")
    print(machine())
    print(f"command: python {' '.join(sys.argv)}\n")
    throughput_table(args, dense)
    memory_table(args, dense)
    expert_table(args, experts)


def throughput_table(args: argparse.Namespace, dense: list[dict]) -> None:
    """Tokens/s of each configuration, and what synchronising costs over its no-sync floor."""
    config = dense_config(args)
    print(
        f"Dense: {args.model} with {config.n_layer} layers, {dense[0]['total_parameters']:,} parameters, fp32, "
        f"AdamW; global batch {args.batch} x {args.seq} tokens; a step: the slowest rank's median of {args.steps} "
        f"steps after {args.warmup}, in the best of {args.rounds} rounds."
    )
    base = next(s for s in dense if s["world"] == 1)["step"]
    floor = {s["world"]: s["step"] for s in dense if s["mode"] == "no sync"}
    tokens = args.batch * args.seq
    print(
        "\n| run | processes x threads | tokens/s | vs 1 process | step ms (each round) | sync ms (share of step) "
        "| planner: MiB sent / rank | peak RSS / rank | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in dense:
        steps = ", ".join(f"{1e3 * t:.0f}" for t in s["steps"])
        sync = sent = "-"
        if s["mode"] in ("ddp", "fsdp"):
            cost = s["step"] - floor[s["world"]]
            sync = f"{1e3 * cost:.0f} ({100 * cost / s['step']:.0f} %)"
            sent = f"{memory_plan(config, layout(args, s)).data_parallel / MIB:.1f}"
        print(
            f"| {s['mode']} | {s['world']} x {threads(s['world'])} | {tokens / s['step']:,.0f} "
            f"| {base / s['step']:.2f} | {1e3 * s['step']:.0f} ({steps}) | {sync} | {sent} "
            f"| {s['peak_rss'] / MIB:.0f} MiB ({(s['peak_rss'] - s['rss_before']) / MIB:+.0f}) | {s['load']:.1f} |"
        )
    print(
        "(sync: the step over the no-sync step at the same world size, i.e. the collectives and their waits; planner: "
        "the gradient all-reduce (ddp) or the all-gathers and reduce-scatter (fsdp) of one step, ring algorithms. "
        "Peak RSS: the largest rank's high-water mark, and in brackets its rise over the process before the model. "
        "Load: the machine's 1-minute load average after the best round.)"
    )


def memory_table(args: argparse.Namespace, dense: list[dict]) -> None:
    """Measured bytes per rank against total / N and the planner, MiB."""
    config, whole = dense_config(args), next(s for s in dense if s["world"] == 1)
    state = whole["parameters"] + whole["gradients"] + whole["optimizer"]
    print("\nMemory per rank, MiB: measured (largest rank) / planner (`mistura plan --memory`, fp32, dp = N).")
    print("\n| run | parameters | gradients | AdamW state | P+G+O | total / N | vs total / N | activations |")
    print("|---|---|---|---|---|---|---|---|")
    for s in dense:
        if s["mode"] == "no sync":
            continue
        plan = memory_plan(config, layout(args, s))
        held = s["parameters"] + s["gradients"] + s["optimizer"]
        share = state / s["world"]
        print(
            f"| {s['mode']}, {s['world']} | {s['parameters'] / MIB:.2f} / {plan.parameters / MIB:.2f} "
            f"| {s['gradients'] / MIB:.2f} / {plan.gradients / MIB:.2f} "
            f"| {s['optimizer'] / MIB:.2f} / {plan.optimizer / MIB:.2f} | {held / MIB:.2f} | {share / MIB:.2f} "
            f"| {100 * (held / share - 1):+.1f} % | {s['activations'] / MIB:.0f} / {plan.activations / MIB:.0f} |"
        )
    print(
        "(AdamW state counts its step counters too, one 4-byte scalar per parameter tensor on every rank. DDP's "
        "gradient buckets, another copy of the gradients, are in neither figure. Activations: the "
        "storages the forward saves for backward, measured, against the planner's estimate after Korthikanti et "
        "al., which leaves out what this eager step also keeps in a Llama-style layer: the SiLU output (d_ff "
        "values per token), each RMSNorm's normalised input beside its input and output (h), the attention "
        "output both before and after its transpose for o_proj (h), and counts dropout masks (h) that p = 0 "
        "does not make.)"
    )


def layout(args: argparse.Namespace, s: dict) -> Layout:
    mode = "fsdp" if s["mode"] == "fsdp" else "ddp"
    return Layout(
        gpus=s["world"], seq_len=args.seq, data_parallel=mode, dtype="fp32", micro_batch=args.batch // s["world"]
    )


def expert_table(args: argparse.Namespace, experts: list[dict]) -> None:
    config = moe_config(args)
    moe = config.moe
    n_moe = config.layer_mlp.count("moe")
    print(
        f"\nExperts: {args.moe_model}, {n_moe} MoE layers of {moe.n_experts} experts, top-{moe.top_k}, "
        f"d_model {config.d_model}, capacity factor {moe.capacity_factor}; {args.moe_batch} x {args.moe_seq} "
        f"tokens per rank, one forward + backward; step times: median of {args.moe_rounds} interleaved rounds."
    )
    print(
        "\n| ep | processes x threads | MiB sent / rank (min-max) | exact from routing | planner | measured / exact "
        "| measured / planner | rows kept | parameters / rank (MiB, planner) | split step ms | unsplit step ms "
        "| split / unsplit | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in experts:
        ep, ranks = e["ep"], e["ranks"]
        shape = {"seq_len": args.moe_seq, "micro_batch": args.moe_batch, "dtype": "fp32", "data_parallel": "ddp"}
        plan = memory_plan(config, Layout(gpus=ep, ep=ep, **shape))
        planned = plan.expert_parallel
        sent = [r["forward"] + r["backward"] for r in ranks]
        exact = [r["exact"] for r in ranks]
        worst = max(abs(s / x - 1) for s, x in zip(sent, exact))
        kept = sum(r["kept_rows"] for r in ranks) / sum(r["assignments"] for r in ranks)
        split = max(r["split"] for r in ranks)
        unsplit = max(r["unsplit"] for r in ranks)
        print(
            f"| {ep} | {ep} x {threads(ep)} | {statistics.mean(sent) / MIB:.2f} ({min(sent) / MIB:.2f}-"
            f"{max(sent) / MIB:.2f}) | {statistics.mean(exact) / MIB:.2f} | {planned / MIB:.2f} "
            f"| {statistics.mean(sent) / statistics.mean(exact):.4f} (worst rank off by {worst:.1e}) "
            f"| {statistics.mean(sent) / planned:.3f} | {100 * kept:.1f} % "
            f"| {max(r['parameters'] for r in ranks) / MIB:.2f} ({plan.parameters / MIB:.2f}) "
            f"| {1e3 * split:.0f} | {1e3 * unsplit:.0f} | {split / unsplit:.2f} | {e['load']:.1f} |"
        )
    print(
        "(planner: 4 n_moe (e - 1) / e B S top_k h w, even routing and no drops; rows kept: the share of the "
        "top-k assignments left after capacity, over all ranks)"
    )


if __name__ == "__main__":
    main()
