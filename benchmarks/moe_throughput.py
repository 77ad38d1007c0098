"""MoE training throughput: mistura's experts against a per-expert loop, Hugging Face and a dense MLP.

For each expert setting (experts x top-k x expert width), the script builds a Hugging Face
`MixtralForCausalLM` from a config, saves it and loads the folder into mistura through the
production importer (mistura.convert.from_hf). Four contenders then run forward + backward in fp32:

- mistura: its MoE layer, sort-by-expert dispatch and one grouped matmul per projection;
- eager loop: Hugging Face with experts_implementation="eager", a loop over the experts that
  finds each expert's tokens, runs the expert on them and index_adds the result back;
- HF: Hugging Face's default experts implementation ("grouped_mm");
- dense: mistura with a dense SwiGLU MLP of width top_k x expert width, the same active
  parameters as the MoE (its own random weights).

Each is timed at two scopes. "layer" is the first block's MLP alone, on a fixed random
input (B, T, D) with a fixed random output gradient. "model" is the whole model, with
cross-entropy on all positions. The three MoE contenders share their weights: their layer
outputs and model losses must agree before timing. Timing interleaves the contenders:
after a warm-up, each round times --steps steps of each in turn, so that slow drifts of
the machine hit all alike. A figure is the median step time over all timed steps. The
output ends with a Markdown table and the targets met or missed.

Two more figures explain the tax. "matmul floor" times the experts' three projections
alone, as grouped matmuls over evenly split rows, against the dense MLP's three matmuls
of the same multiply-adds (forward + backward): the tax the matmul kernels impose before
any routing, on the layer and, in proportion to the dense MLPs' share of the step, on
the model. And by default the process keeps freed memory for reuse, as `mistura train`
does on the CPU (mistura.train.allocator); it applies to every contender alike.

    python benchmarks/moe_throughput.py                           # 8x2x512 and 64x8x128
    python benchmarks/moe_throughput.py --threads 1               # steadier on a busy CPU
    python benchmarks/moe_throughput.py --settings 16x4x256       # other experts x top-k x width
    python benchmarks/moe_throughput.py --profile                 # plus each contender's costliest ops
    python benchmarks/moe_throughput.py --malloc default          # glibc's own large-block policy
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

from mistura.config import ModelConfig
from mistura.convert import from_hf
from mistura.model import Transformer
from mistura.train.allocator import retain_freed_memory

Loss = Callable[[], torch.Tensor]  # one forward pass of a contender, down to a scalar
CONTENDERS = ("mistura", "eager loop", "HF", "dense")
MOE = ("mistura", "eager loop", "HF")  # the contenders that share weights
OUTPUT_TOLERANCE = 1e-5  # layers: max abs difference over the largest output
LOSS_TOLERANCE = 1e-4  # models: abs difference of the losses


@dataclass(frozen=True)
class Setting:
    n_experts: int
    top_k: int
    d_expert: int

    def __str__(self) -> str:
        return f"{self.n_experts}x{self.top_k}x{self.d_expert}"


def main() -> None:
    args = parse_args()
    rows = []
    for setting in args.settings:
        torch.manual_seed(args.seed)
        floor = matmul_floor(setting, args)
        models = build_models(setting, args)
        for scope, contenders in (("layer", layer_contenders(models, args)), ("model", model_contenders(models, args))):
            times = time_interleaved(contenders, args)
            rows.append(summarize(setting, scope, times, floor, args))
            if args.profile:
                for name, contender in contenders.items():
                    profile(f"{setting} {scope} {name}", contender)
    report(rows, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = parser.add_argument_group("model shape and batch")
    shape.add_argument(
        "--settings",
        type=parse_setting,
        nargs="+",
        default=[Setting(8, 2, 512), Setting(64, 8, 128)],
        help="experts x top-k x expert width, e.g. 8x2x512 (default: 8x2x512 64x8x128)",
    )
    shape.add_argument("--d-model", type=int, default=256)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--kv-heads", type=int, default=4)
    shape.add_argument("--vocab", type=int, default=1024, help="small, so that the head does not dominate")
    shape.add_argument("--seq", type=int, default=512)
    shape.add_argument("--batch", type=int, default=8)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, default=1, help="untimed steps per contender")
    timing.add_argument("--rounds", type=int, default=8)
    timing.add_argument("--steps", type=int, default=1, help="timed steps per contender per round")
    timing.add_argument("--profile", action="store_true", help="print each contender's costliest ops")
    timing.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument(
        "--malloc",
        choices=("retain", "default"),
        default="retain",
        help="retain: keep freed memory for reuse, as mistura train does on the CPU; default: glibc's policy",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "retain" and not retain_freed_memory():
        args.malloc = "default (not glibc)"
    return args


def parse_setting(text: str) -> Setting:
    try:
        n_experts, top_k, d_expert = (int(part) for part in text.split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected experts x top-k x width, e.g. 8x2x512, got {text!r}") from err
    return Setting(n_experts, top_k, d_expert)


def build_models(setting: Setting, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The four contenders' models, in training mode; the three MoE ones share their weights."""
    hf_config = transformers.MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=setting.d_expert,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=setting.n_experts,
        num_experts_per_tok=setting.top_k,
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    hf = transformers.MixtralForCausalLM(hf_config).train()
    eager = copy.deepcopy(hf)
    eager.set_experts_implementation("eager")
    with tempfile.TemporaryDirectory() as folder:  # a checkpoint as the Hub holds it: experts one by one
        hf.save_pretrained(folder)
        model = from_hf(folder).train()
    dense = Transformer(dense_config(model.config)).train()
    return {"mistura": model, "eager loop": eager, "HF": hf, "dense": dense}


def dense_config(config: ModelConfig) -> ModelConfig:
    """The same model with a dense SwiGLU MLP as wide as the experts a token uses."""
    data = config.to_dict()
    del data["moe"]
    return ModelConfig.from_dict(data | {"layer_mlp": None, "d_ff": config.moe.top_k * config.moe.d_expert})


def matmul_floor(setting: Setting, args: argparse.Namespace) -> float:
    """Step time of the experts' projections as grouped matmuls over the dense MLP's matmuls.

    The rows are split evenly among the experts; both sides do the same multiply-adds."""
    tokens, width = args.batch * args.seq, setting.top_k * setting.d_expert
    per_expert = tokens * setting.top_k // setting.n_experts
    offsets = torch.arange(1, setting.n_experts + 1, dtype=torch.int32) * per_expert

    def projections(rows: int, experts: int | None, d_hidden: int) -> Contender:
        stack = () if experts is None else (experts,)
        x = torch.randn(rows, args.d_model, requires_grad=True)
        gate, up = (torch.randn(*stack, args.d_model, d_hidden, requires_grad=True) for _ in range(2))
        down = torch.randn(*stack, d_hidden, args.d_model, requires_grad=True)
        grad = torch.randn(rows, args.d_model)  # the gradient reaching the output
        mm = torch.matmul if experts is None else lambda a, b: torch._grouped_mm(a, b, offs=offsets)
        return Contender(lambda: (mm(mm(x, gate) * mm(x, up), down) * grad).sum(), [x, gate, up, down])

    times = time_interleaved(
        {
            "grouped": projections(per_expert * setting.n_experts, setting.n_experts, setting.d_expert),
            "dense": projections(tokens, None, width),
        },
        args,
    )
    return statistics.median(times["grouped"]) / statistics.median(times["dense"])


def layer_contenders(models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, Contender]:
    """Each contender's first MLP on one random input; its loss is <output, a fixed random gradient>."""
    mlps = {
        "mistura": models["mistura"].blocks[0].mlp,
        "eager loop": models["eager loop"].model.layers[0].mlp,
        "HF": models["HF"].model.layers[0].mlp,
        "dense": models["dense"].blocks[0].mlp,
    }
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)  # (B, T, D), unit scale like a norm's
    check_same_outputs({name: mlps[name] for name in MOE}, x)
    grad = torch.randn_like(x)  # the gradient reaching the output
    return {
        name: Contender(lambda mlp=mlp: (mlp_output(mlp, x) * grad).sum(), [*mlp.parameters(), x])
        for name, mlp in mlps.items()
    }


def mlp_output(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = mlp(x)
    return out[0] if isinstance(out, tuple) else out  # mistura's MoE layer also returns its MoEAux


def check_same_outputs(mlps: dict[str, torch.nn.Module], x: torch.Tensor) -> None:
    """Same weights and input must give the same output, up to float rounding."""
    with torch.no_grad():
        outputs = {name: mlp_output(mlp, x) for name, mlp in mlps.items()}
    reference = outputs.pop("mistura")
    errors = {name: ((out - reference).abs().max() / reference.abs().max()).item() for name, out in outputs.items()}
    if max(errors.values()) > OUTPUT_TOLERANCE:
        raise SystemExit(f"the MoE layers disagree before timing: max error relative to the output's {errors}")
    print("layer outputs, max error relative to mistura's largest: " + _listing(errors, ".1e"))


def model_contenders(models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, Contender]:
    """Each contender's cross-entropy on one random batch, all positions."""
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T) each: predict the next token
    logits = {
        "mistura": lambda: models["mistura"](inputs),
        "eager loop": lambda: models["eager loop"](input_ids=inputs, use_cache=False).logits,
        "HF": lambda: models["HF"](input_ids=inputs, use_cache=False).logits,
        "dense": lambda: models["dense"](inputs),
    }
    losses = {name: lambda f=f: F.cross_entropy(f().flatten(0, 1), targets.flatten()) for name, f in logits.items()}
    check_same_loss({name: losses[name] for name in MOE})
    return {name: Contender(loss, list(models[name].parameters())) for name, loss in losses.items()}


def check_same_loss(losses: dict[str, Loss]) -> None:
    """Same weights and batch must give the same loss, or the comparison is meaningless."""
    with torch.no_grad():
        values = {name: loss().item() for name, loss in losses.items()}
    if max(values.values()) - min(values.values()) > LOSS_TOLERANCE:
        raise SystemExit(f"the MoE models disagree before timing: losses {values}")
    print("model loss before timing: " + _listing(values, ".6f"))


def _listing(values: dict[str, float], spec: str) -> str:
    return ", ".join(f"{name} {value:{spec}}" for name, value in values.items())


@dataclass
class Contender:
    loss: Loss
    leaves: list[torch.Tensor]  # the tensors whose .grad the backward pass fills

    def step(self) -> float:
        """Seconds taken by one forward + backward pass."""
        start = time.perf_counter()
        self.loss().backward()
        elapsed = time.perf_counter() - start
        for leaf in self.leaves:
            leaf.grad = None
        return elapsed


def time_interleaved(contenders: dict[str, Contender], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of each timed step of each contender, in alternating rounds after a warm-up."""
    for contender in contenders.values():
        for _ in range(args.warmup):
            contender.step()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, contender in contenders.items():
            times[name] += [contender.step() for _ in range(args.steps)]
    return times


def summarize(
    setting: Setting, scope: str, times: dict[str, list[float]], floor: float, args: argparse.Namespace
) -> Row:
    """Print each contender's median and spread; return the row of the final table."""
    tokens = args.batch * args.seq
    load = os.getloadavg()[0]  # other processes on the CPU slow the MoE contenders most
    print(f"{setting} {scope} (load average {load:.1f}):")
    for name, steps in times.items():
        low, median, high = (1e3 * t for t in (min(steps), statistics.median(steps), max(steps)))
        print(
            f"  {name:10s} {median:8.1f} ms/step (min {low:.1f}, max {high:.1f}) {tokens / median * 1e3:9.0f} tokens/s"
        )
    median = {name: statistics.median(steps) for name, steps in times.items()}
    return Row(setting, scope, {name: tokens / t for name, t in median.items()}, floor, _peak_rss_mib(), load)


def report(rows: list[Row], args: argparse.Namespace) -> None:
    """The Markdown table of every figure and ratio, then the targets met or missed."""
    device = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(
        f"\nd{args.d_model} L{args.layers} H{args.heads}/{args.kv_heads} V{args.vocab}, "
        f"batch {args.batch} x seq {args.seq}, fwd+bwd fp32, {device}, malloc {args.malloc}; "
        "setting = experts x top-k x expert width; tax = mistura step time / dense step time; "
        "matmul floor = grouped / dense projections alone; load = 1-minute load average after timing\n"
    )
    print(
        "| setting | scope | mistura tok/s | eager loop tok/s | HF tok/s | dense tok/s "
        "| mistura/eager | mistura/HF | MoE tax | matmul floor | peak RSS | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        rates = " | ".join(f"{row.rate[name]:.0f}" for name in CONTENDERS)
        print(
            f"| {row.setting} | {row.scope} | {rates} | {row.ratio('eager loop'):.2f} "
            f"| {row.ratio('HF'):.3f} | {row.tax:.3f} | {row.floor:.3f} | {row.peak_rss_mib:.0f} MiB | {row.load:.1f} |"
        )
    print()
    for row in rows:
        for target, met in row.targets():
            print(f"{row.setting} {row.scope}: {target}: {'met' if met else 'MISSED'}")
    layers = {row.setting: row for row in rows if row.scope == "layer"}
    for row in rows:
        if row.scope == "model":
            share = args.layers * row.rate["dense"] / layers[row.setting].rate["dense"]
            print(
                f"{row.setting} model: the dense MLPs take {share:.0%} of the dense step, so the matmul floor "
                f"alone sets the model's tax at {1 + share * (row.floor - 1):.3f} or more"
            )


@dataclass
class Row:
    setting: Setting
    scope: str
    rate: dict[str, float]  # tokens/s of each contender
    floor: float  # the experts' grouped matmuls alone over the dense MLP's (see matmul_floor)
    peak_rss_mib: float  # of the whole process so far
    load: float  # 1-minute load average of the machine after timing

    def ratio(self, peer: str) -> float:
        """How many times faster mistura is than the peer."""
        return self.rate["mistura"] / self.rate[peer]

    @property
    def tax(self) -> float:
        """mistura's step time over the equal-active dense model's."""
        return self.rate["dense"] / self.rate["mistura"]

    def targets(self) -> list[tuple[str, bool]]:
        """The targets that apply to this row, each with whether it is met."""
        if self.scope == "model":
            return [
                (f"mistura/HF {self.ratio('HF'):.3f} >= 1.0", self.ratio("HF") >= 1.0),
                (f"MoE tax {self.tax:.3f} <= 1.15", self.tax <= 1.15),
            ]
        if self.setting.n_experts >= 64:
            return [(f"mistura/eager loop {self.ratio('eager loop'):.2f} >= 3", self.ratio("eager loop") >= 3)]
        return []


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def profile(title: str, contender: Contender) -> None:
    """The ops of one step that take the most CPU time, themselves (not children)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        contender.step()
    print(f"\n== {title}: one step, ops by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
