"""Malformed input through the real `mistura` entry point: `error: ...` on stderr, exit status 2, no traceback,
and nothing left where the command would have written (its output, a run dir, a `.tmp` sibling).

Each row of ROWS is `Row(name, argv, says, files, stdin)`: the error must contain `says` (the culprit's name).
In argv and in the names of `files`, `{tmp}` is the row's own empty folder (the command runs there, so default
outputs land in it too) and `{ckpt}` the module's tiny checkpoint, which no row may change. `files` is created in
order before the command runs; a value is
- text (str) or bytes: the file's content;
- CKPT: a copy of the tiny checkpoint (a folder), for the entries after it to break;
- a function of the bytes there: an edit of a copied file; None deletes it;
- REHASH: the folder's manifest.json rewritten to match its files, so that the loader reads what was edited.
Rows with stdin run `mistura` in a subprocess; the others call `mistura.cli.main` in-process (same code, faster).

A new command that takes input adds one row per malformed input it must refuse; `checkpoint_rows` gives a
command that reads a checkpoint the broken-checkpoint rows in one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mistura.checkpoint import save_model
from mistura.cli import main
from mistura.config import ModelConfig
from mistura.data.tokenizer import train_tokenizer
from mistura.model import Transformer

CKPT = object()
REHASH = object()
Value = str | bytes | object | Callable[[bytes], bytes] | None
ENTRY = "import sys; from mistura.cli import main; sys.exit(main())"
TRAIN = "model:\n  preset: llama-tiny\ndata:\n  vocab_size: 97\ntrain:\n  max_steps: 2\n  warmup_steps: 1\n"
# A Hugging Face Llama config.json, for a folder whose weights are pickled.
HF_LLAMA = json.dumps(
    dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
)

# A LoRA adapter folder's config for a base wider than the tiny checkpoint (d_model 48, not 32), naming no base path.
OTHER_ADAPTER = json.dumps(
    dict(
        format="mistura-lora",
        lora={"rank": 2},
        layers=[],
        base=dict(path=None, config=ModelConfig.from_name("llama-tiny", d_model=48, n_head=4).to_dict()),
    )
)
ADAPTER_FOR_ANOTHER_BASE = {
    "a/adapter_config.json": OTHER_ADAPTER,
    "a/adapter.safetensors": b"",
    "a/manifest.json": REHASH,
}


@dataclass
class Row:
    name: str
    argv: list[str]
    says: str  # what the error message must name
    files: dict[str, Value] = field(default_factory=dict)
    stdin: bytes | None = None


def json_edit(**changes: object) -> Callable[[bytes], bytes]:
    """An edit of a JSON object file: keys set to values."""
    return lambda data: json.dumps(json.loads(data) | changes).encode()


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def checkpoint_rows(command: str, argv: list[str], inputs: dict[str, Value] | None = None) -> list[Row]:
    """The broken checkpoints a command that reads one must refuse; "{bad}" in argv is the checkpoint, and
    `inputs` the other files the command reads."""

    def row(name: str, says: str, folder: str = "{tmp}/bad", **files: Value) -> Row:
        broken = {"bad/": CKPT} | {f"bad/{key.replace('_', '.')}": value for key, value in files.items()}
        argv_here = [arg.replace("{bad}", folder) for arg in argv]
        return Row(f"{command}: {name}", argv_here, says, (inputs or {}) | (broken if files else {}))

    return [
        row("missing checkpoint dir", "checkpoint not found", "{tmp}/nowhere"),
        row("not a checkpoint", "neither a checkpoint", "{tmp}"),
        row("truncated model.safetensors", "model.safetensors is truncated", model_safetensors=truncate),
        row(
            "truncated model.safetensors, manifest rewritten",
            "model.safetensors: cannot read",
            model_safetensors=truncate,
            manifest_json=REHASH,
        ),
        row("corrupt manifest.json", "manifest.json is corrupt", manifest_json="{oops"),
        row("binary manifest.json", "manifest.json", manifest_json=b"\xff\xfe\x00garbage"),
        row("manifest.json a list", "manifest.json", manifest_json="[1, 2]"),
        row(
            "config.json unknown key", "unknown key 'n_embdd'", config_json=json_edit(n_embdd=32), manifest_json=REHASH
        ),
        row("config.json not an object", "config.json", config_json="[1, 2]", manifest_json=REHASH),
        row("binary config.json", "config.json", config_json=b"\xff\xfe{}", manifest_json=REHASH),
        row("tensors do not match the config", "has shape", config_json=json_edit(d_ff=96), manifest_json=REHASH),
    ]


GENERATE = ["generate", "{ckpt}", "--max-new-tokens", "2"]
PROMPT = [*GENERATE, "--prompt", "Capitu"]
PROMPTS = [*GENERATE, "--input-file", "{tmp}/prompts.txt", "--output", "{tmp}/out.jsonl"]
TRAIN_RUN = ["train", "{tmp}/run.yaml"]
QUANTIZE = ["quantize", "{ckpt}", "{tmp}/q", "--format"]
FROM_HF = ["convert", "from-hf", "{tmp}/hf", "{tmp}/out"]


def train(name: str, says: str, yaml: str | bytes, *flags: str) -> Row:
    return Row(f"train: {name}", [*TRAIN_RUN, *flags], says, {"run.yaml": yaml})


FINETUNE = ["finetune", "{ckpt}", "--data", "{tmp}/d.jsonl", "--val", "{tmp}/d.jsonl", "--out", "{tmp}/run"]
CHAT = '{"messages": [{"role": "user", "content": "Olá"}, {"role": "assistant", "content": "Bom dia."}]}\n'
SYSTEM_CHAT = CHAT.replace('[{"role": "user"', '[{"role": "system", "content": "Seja breve."}, {"role": "user"')
USER_ONLY = '{"messages": [{"role": "user", "content": "Olá"}]}\n'
USER_LAST = CHAT.replace("}]}", '}, {"role": "user", "content": "E então?"}]}')
NO_SYSTEM = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ messages }}"
FINETUNE_EVAL = ["finetune-eval", "{ckpt}", "--data", "{tmp}/d.jsonl"]


def finetune(name: str, says: str, data: str | bytes, *flags: str, files: dict[str, Value] | None = None) -> Row:
    """A `mistura finetune` row on the data file {tmp}/d.jsonl (train and validation), run dir {tmp}/run."""
    return Row(f"finetune: {name}", [*FINETUNE, *flags], says, {"d.jsonl": data, **(files or {})})


PAIR = '{"prompt": "Olá", "chosen": "Bom dia.", "rejected": "dia Bom."}\n'
PAIRS_RUN = ["--data", "{tmp}/p.jsonl", "--val", "{tmp}/p.jsonl", "--out", "{tmp}/run"]
RL = [
    "rl",
    "{ckpt}",
    *PAIRS_RUN,
    "--set",
    "rl.max_new_tokens=4",
    "--set",
    "train.max_steps=2",
    "--set",
    "train.warmup_steps=0",
    "--reward",
]
RAISES = "def f(prompts, completions, **columns):\n    return [1 / 0 for _ in completions]\n"
NAN = "def f(prompts, completions, **columns):\n    return [float('nan') for _ in completions]\n"


def pairs(command: str, name: str, says: str, data: str | bytes, *flags: str) -> Row:
    """A `mistura reward-model` or `mistura dpo` row on the pairs file {tmp}/p.jsonl, run dir {tmp}/run."""
    return Row(f"{command}: {name}", [command, "{ckpt}", *PAIRS_RUN, *flags], says, {"p.jsonl": data})


def rl(name: str, says: str, reward: str, data: str | bytes = PAIR, **files: Value) -> Row:
    """A `mistura rl` row with the prompts {tmp}/p.jsonl and the reward spec `reward`, run dir {tmp}/run."""
    return Row(f"rl: {name}", [*RL, reward], says, {"p.jsonl": data, **files})


ROWS = [
    # configs
    train("unknown top-level key", "unknown section(s) ['modle']", TRAIN + "modle:\n  n_layer: 2\n"),
    train("unknown nested key", "unknown key 'n_embdd'", TRAIN.replace("  preset:", "  n_embdd: 32\n  preset:")),
    train("unknown key in a section", "unknown key 'max_stepz'", TRAIN + "  max_stepz: 3\n"),
    train("value of the wrong type", "train.max_steps: expected int", TRAIN.replace("max_steps: 2", "max_steps: two")),
    train("a list for a number", "train.max_steps: expected int", TRAIN.replace("max_steps: 2", "max_steps: [2]")),
    train(
        "n_head does not divide d_model", "do not divide d_model=30", TRAIN.replace("preset: llama-tiny", "d_model: 30")
    ),
    train(
        "a preset's n_head does not divide d_model",
        "8 heads do not divide d_model=100",
        TRAIN.replace("preset: llama-tiny", "preset: llama-tiny\n  d_model: 100"),
    ),
    train("unknown preset", "unknown preset 'llama-tinyy'", TRAIN.replace("llama-tiny", "llama-tinyy")),
    train("not YAML", "is not valid YAML", "model: [unclosed\n  : {"),
    train("YAML, not a mapping", "at the top level", "- model\n- train\n"),
    train("a section that is not a mapping", "model", "model: 3\n"),
    train("a section that is a list", "train: expected a mapping", "train: [1, 2]\n"),
    train("config not UTF-8", "run.yaml is not UTF-8", b"model:\n  name: \xff\xfe\n"),
    train("unknown data_parallel", "parallel.data_parallel", TRAIN + "parallel:\n  data_parallel: zero3\n"),
    train(
        "expert_parallel without ddp", "beside parallel.data_parallel: ddp", TRAIN + "parallel:\n  expert_parallel: 2\n"
    ),
    train(
        "tensor_parallel in one process",
        "tensor_parallel is 2 and there are 1",
        TRAIN + "parallel:\n  tensor_parallel: 2\n",
    ),
    train("cpu_offload without fsdp", "are FSDP's", TRAIN + "parallel:\n  cpu_offload: true\n"),
    Row("train: missing config file", ["train", "{tmp}/nowhere.yaml"], "config file not found"),
    train("--set without =", "--set expects key=value", TRAIN, "--set", "train.max_steps"),
    train("--set of an unknown field", "unknown key 'max_stepz'", TRAIN, "--set", "train.max_stepz=3"),
    train("--set of a wrong type", "model.n_layer: expected int", TRAIN, "--set", "model.n_layer=many"),
    train("--set of a value that is not YAML", "--set train.lr", TRAIN, "--set", "train.lr=[1"),
    train("--teacher-continuations without --teacher", "needs --teacher", TRAIN, "--teacher-continuations", "2"),
    Row("params: unknown preset", ["params", "gpt5-huge"], "'gpt5-huge' is neither a preset"),
    Row("params: --set of an unknown field", ["params", "llama-tiny", "--set", "n_embdd=32"], "unknown key 'n_embdd'"),
    Row("params: --set that does not divide", ["params", "llama-tiny", "--set", "d_model=100"], "do not divide"),
    Row("params: bad config file", ["params", "{tmp}/run.yaml"], "max_stepz", {"run.yaml": TRAIN + "  max_stepz: 3\n"}),
    Row("compare: missing config file", ["compare", "{tmp}/nowhere.yaml", "--out", "{tmp}/results"], "not found"),
    Row("prepare: missing corpus", ["prepare", "--source", "{tmp}/nowhere", "--out", "{tmp}/data"], "nowhere"),
    Row("prepare: empty corpus", ["prepare", "--source", "{tmp}/c", "--out", "{tmp}/data"], "no .txt", {"c/": ""}),
    # checkpoints
    *checkpoint_rows("generate", ["generate", "{bad}", "--prompt", "Capitu", "--max-new-tokens", "2"]),
    *checkpoint_rows("chat", ["chat", "{bad}", "--max-new-tokens", "4"]),
    *checkpoint_rows("quantize", ["quantize", "{bad}", "{tmp}/q", "--format", "int8"]),
    *checkpoint_rows("convert to-hf", ["convert", "to-hf", "{bad}", "{tmp}/hf"]),
    Row(
        "generate: corrupt tokenizer.json",
        ["generate", "{tmp}/t", "--prompt", "Capitu"],
        "tokenizer.json is not a tokenizer file",
        {"t/": CKPT, "t/tokenizer.json": "{", "t/manifest.json": REHASH},
    ),
    Row(
        "generate: no tokenizer.json",
        ["generate", "{tmp}/t", "--prompt", "Capitu"],
        "tokenizer.json does not exist",
        {"t/": CKPT, "t/tokenizer.json": None, "t/manifest.json": REHASH},
    ),
    Row(
        "generate: Hugging Face folder, binary config.json",
        [*PROMPT[:1], "{tmp}/hf", *PROMPT[2:]],
        "not a complete mistura checkpoint",
        {"hf/config.json": b"\xff"},
    ),
    Row("convert to-hf: output not empty", ["convert", "to-hf", "{ckpt}", "{tmp}/hf"], "not an empty", {"hf/x": "x"}),
    # prompt files
    Row("generate: missing prompts file", PROMPTS, "prompts file not found"),
    Row("generate: empty prompts file", PROMPTS, "line 1: empty prompt", {"prompts.txt": ""}),
    Row("generate: blank line in the prompts file", PROMPTS, "line 2: empty prompt", {"prompts.txt": "Capitu\n\nO\n"}),
    Row("generate: whitespace line in the prompts file", PROMPTS, "line 2: empty", {"prompts.txt": "Capitu\n \t\n"}),
    Row("generate: prompts file not UTF-8", PROMPTS, "is not UTF-8", {"prompts.txt": b"Capitu\n\xff\xfe\n"}),
    Row("generate: a folder as the prompts file", PROMPTS, "prompts file not found", {"prompts.txt/": ""}),
    Row("generate: batch size 0", [*PROMPTS, "--batch-size", "0"], "batch size", {"prompts.txt": "Capitu\n"}),
    Row("generate: --prompt and --input-file", [*PROMPTS, "--prompt", "C"], "either", {"prompts.txt": "Capitu\n"}),
    Row("generate: neither --prompt nor --input-file", GENERATE, "give either --prompt or --input-file"),
    # prompts and sampling options
    Row("generate: empty --prompt", [*GENERATE, "--prompt", ""], "the prompt is empty"),
    Row("generate: blank --prompt", [*GENERATE, "--prompt", "  "], "the prompt is empty"),
    Row("generate: --prompt not UTF-8", [*GENERATE, "--prompt", "Capitu \udcff"], "not valid UTF-8 text (byte 0xff"),
    Row("generate: negative temperature", [*PROMPT, "--temperature", "-0.5"], "temperature must be >= 0"),
    Row("generate: temperature nan", [*PROMPT, "--temperature", "nan"], "temperature must be >= 0"),
    Row("generate: top-p 0", [*PROMPT, "--top-p", "0"], "top_p must be in (0, 1]"),
    Row("generate: top-p above 1", [*PROMPT, "--top-p", "1.5"], "top_p must be in (0, 1]"),
    Row("generate: top-k negative", [*PROMPT, "--top-k", "-3"], "top_k must be >= 1"),
    Row("generate: min-p above 1", [*PROMPT, "--min-p", "2"], "min_p must be in [0, 1]"),
    Row("generate: max-new-tokens 0", [*PROMPT, "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    Row("generate: max-new-tokens negative", [*PROMPT, "--max-new-tokens", "-4"], "max_new_tokens must be >= 1"),
    Row("generate: empty --stop", [*PROMPT, "--stop", ""], "stop strings must not be empty"),
    Row("generate: repetition-penalty 0", [*PROMPT, "--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    Row("generate: gamma 0", [*PROMPT, "--draft", "{ckpt}", "--gamma", "0"], "gamma"),
    Row("generate: missing draft", [*PROMPT, "--draft", "{tmp}/nowhere"], "checkpoint not found"),
    Row("generate: bad sampling, prompts file", [*PROMPTS, "--top-p", "0"], "top_p", {"prompts.txt": "Capitu\n"}),
    Row("chat: negative temperature", ["chat", "{ckpt}", "--temperature", "-1"], "temperature must be >= 0"),
    Row("chat: no room for the conversation", ["chat", "{ckpt}", "--max-new-tokens", "64"], "leaves no room"),
    Row(
        "chat: --system not UTF-8",
        ["chat", "{ckpt}", "--max-new-tokens", "4", "--system", "S\udcff"],
        "the system prompt is not valid UTF-8",
        stdin=b"Capitu\n",
    ),
    # quantize and convert
    Row("quantize: unknown --format", [*QUANTIZE, "int3"], "unknown quantization format 'int3'"),
    Row("quantize: group size that does not divide", [*QUANTIZE, "int4", "--group-size", "12"], "12 does not divide"),
    Row("quantize: odd int4 group size", [*QUANTIZE, "int4", "--group-size", "7"], "must be even"),
    Row("quantize: group size 0", [*QUANTIZE, "int8", "--group-size", "0"], "group size"),
    Row("quantize: group size for fp8", [*QUANTIZE, "fp8", "--group-size", "64"], "fp8"),
    Row("quantize: into itself", ["quantize", "{tmp}/c", "{tmp}/c", "--format", "int8"], "another", {"c/": CKPT}),
    Row(
        "quantize: a quantised checkpoint",
        ["quantize", "{tmp}/q", "{tmp}/q2", "--format", "int8"],
        "already quantised",
        {"q/": CKPT, "q/config.json": json_edit(quantization={"format": "int8"}), "q/manifest.json": REHASH},
    ),
    Row(
        "convert from-hf: pickled pytorch_model.bin only",
        FROM_HF,
        "pickled *.bin weights are refused",
        {"hf/config.json": HF_LLAMA, "hf/pytorch_model.bin": b"\x80\x02}q\x00.", "hf/tokenizer.json": "{}"},
    ),
    Row("convert from-hf: missing folder", FROM_HF, "no such checkpoint folder"),
    Row("convert from-hf: unknown model_type", FROM_HF, "'gpt-17'", {"hf/config.json": '{"model_type": "gpt-17"}'}),
    Row("convert from-hf: binary config.json", FROM_HF, "config.json", {"hf/config.json": b"\xff\xfe"}),
    Row("convert from-hf: a mistura checkpoint", ["convert", "from-hf", "{ckpt}", "{tmp}/out"], "already"),
    Row(
        "convert from-distributed: a whole checkpoint",
        ["convert", "from-distributed", "{ckpt}", "{tmp}/out"],
        "not a distributed checkpoint",
    ),
    Row("convert from-distributed: missing", ["convert", "from-distributed", "{tmp}/no", "{tmp}/o"], "not found"),
    Row("convert from-hf: bad --max-shard-size", [*FROM_HF, "--max-shard-size", "lots"], "max_shard_size"),
    Row("convert from-hf: bad --dtype", [*FROM_HF, "--dtype", "int7"], "dtype"),
    Row(
        "convert to-hf: unknown --model-type",
        ["convert", "to-hf", "{ckpt}", "{tmp}/hf", "--model-type", "gpt-17"],
        "gpt-17",
    ),
    # LoRA adapters
    Row("lora merge: missing adapter", ["lora", "merge", "{tmp}/none", "{tmp}/out", "--base", "{ckpt}"], "not found"),
    Row(
        "lora merge: adapter for another base",
        ["lora", "merge", "{tmp}/a", "{tmp}/out", "--base", "{ckpt}"],
        "d_model=48 (this base: 32)",
        ADAPTER_FOR_ANOTHER_BASE,
    ),
    Row("lora merge: no base", ["lora", "merge", "{tmp}/a", "{tmp}/out"], "names no base", ADAPTER_FOR_ANOTHER_BASE),
    Row("lora merge: into its base", ["lora", "merge", "{tmp}/a", "{ckpt}", "--base", "{ckpt}"], "another folder"),
    Row(
        "lora import-peft: not a PEFT folder",
        ["lora", "import-peft", "{tmp}", "{tmp}/out", "--base", "{ckpt}"],
        "not a PEFT adapter folder",
    ),
    Row("convert fp8-to-bf16: missing folder", ["convert", "fp8-to-bf16", "{tmp}/nowhere", "{tmp}/out"], "nowhere"),
    # fine-tuning
    finetune("malformed JSONL line", "d.jsonl, line 2: not valid JSON", CHAT + '{"messages": [\n'),
    finetune("not an object", "line 1: expected a JSON object", "[1, 2]\n"),
    finetune("empty messages", "line 1: 'messages' is empty", '{"messages": []}\n'),
    finetune("no assistant turn", "line 1: no assistant message", USER_ONLY),
    finetune("unknown role", "message 2 has role 'bot'", CHAT.replace('"assistant"', '"bot"')),
    finetune("empty content", "message 2 (assistant) has no content", CHAT.replace("Bom dia.", "")),
    finetune("prompt without completion", "'completion' must be a string", '{"prompt": "Olá"}\n'),
    finetune(
        "a prompt longer than the context",
        "line 1: the formatted conversation takes",
        json.dumps({"prompt": "Capitu tinha olhos de cigana. " * 20, "completion": "Sim."}) + "\n",
    ),
    finetune("empty data file", "holds no examples", ""),
    finetune("data file not UTF-8", "d.jsonl is not UTF-8", b"\xff\xfe\n"),
    Row("finetune: missing data file", FINETUNE, "data file not found"),
    Row("finetune: no --data", ["finetune", "{ckpt}", "--out", "{tmp}/run"], "no training data"),
    Row("finetune: no checkpoint", FINETUNE[:1] + FINETUNE[2:], "no base checkpoint", {"d.jsonl": CHAT}),
    Row("finetune: missing checkpoint", ["finetune", "{tmp}/nowhere", *FINETUNE[2:]], "not found", {"d.jsonl": CHAT}),
    finetune("unknown method", "method: must be one of 'full', 'lora', got 'qlora'", CHAT, "--method", "qlora"),
    finetune("single example, no --val", "a single example cannot be split", CHAT, "--set", "data.val=null"),
    finetune("--set of an unknown field", "unknown key 'max_stepz'", CHAT, "--set", "train.max_stepz=3"),
    finetune("unknown config section", "['modle']", CHAT, "--config", "{tmp}/ft.yaml", files={"ft.yaml": "modle: 2\n"}),
    finetune("LoRA target of no layer", "matches no layer", CHAT, "--method", "lora", "--set", "lora.targets=[q]"),
    finetune("run exists, no --resume", "already holds a run", CHAT, files={"run/metrics.jsonl": ""}),
    Row(
        "finetune: a template that cannot format the data",
        ["finetune", "{tmp}/t", *FINETUNE[2:]],
        "line 1: the chat template cannot format this conversation",
        {"d.jsonl": SYSTEM_CHAT, "t/": CKPT, "t/chat_template.jinja": NO_SYSTEM, "t/manifest.json": REHASH},
    ),
    Row("finetune-eval: missing data file", FINETUNE_EVAL, "data file not found"),
    Row("finetune-eval: answer not last", FINETUNE_EVAL, "must be the assistant's answer", {"d.jsonl": USER_LAST}),
    Row("finetune-eval: batch size 0", [*FINETUNE_EVAL, "--batch-size", "0"], "batch size", {"d.jsonl": CHAT}),
    Row("finetune-data: unknown task", ["finetune-data", "machado-autores", "{tmp}/o"], "unknown task"),
    Row("finetune-data: folder not empty", ["finetune-data", "machado-obras", "{tmp}/o"], "already", {"o/x": "x"}),
    # preferences and RL
    pairs(
        "reward-model",
        "equal replies",
        "line 1: 'chosen' and 'rejected' are the same reply",
        PAIR.replace("dia Bom", "Bom dia"),
    ),
    pairs(
        "reward-model",
        "missing field",
        "line 1: 'rejected' must be a non-empty string",
        '{"prompt": "a", "chosen": "b"}\n',
    ),
    pairs("reward-model", "malformed line", "p.jsonl, line 2: not valid JSON", PAIR + "{oops\n"),
    pairs("reward-model", "pairs not UTF-8", "p.jsonl is not UTF-8", b"\xff\xfe\n"),
    pairs("dpo", "negative beta", "dpo.beta must be > 0", PAIR, "--beta", "-1"),
    pairs("dpo", "unknown loss", "dpo.loss", PAIR, "--set", "dpo.loss=kto"),
    pairs("dpo", "pair longer than the context", "more than the model's context", PAIR.replace("Olá", "Olá " * 80)),
    Row("rl: no reward", RL[:-1], "no reward: give --reward SPEC", {"p.jsonl": PAIR}),
    rl("unknown reward", "unknown reward 'bogus'", "bogus"),
    rl("line without a prompt", "p.jsonl, line 1: 'prompt' must be a non-empty string", "ends_sentence", '{"q": 1}\n'),
    rl("prompts not UTF-8", "p.jsonl is not UTF-8", "ends_sentence", b"\xff\xfe\n"),
    rl(
        "prompt longer than the context",
        "the formatted prompt takes",
        "ends_sentence",
        PAIR.replace("Olá", "Olá " * 80),
    ),
    rl("reward file missing", "cannot import", "{tmp}/nowhere.py:f"),
    rl("reward that raises", "raised ZeroDivisionError: division by zero", "{tmp}/r.py:f", **{"r.py": RAISES}),
    rl("reward that returns NaN", "rewards must be finite", "{tmp}/r.py:f", **{"r.py": NAN}),
    rl("reward model not found", "not found", "model:{tmp}/nowhere"),
    rl("reward model without a head", "no reward_head.safetensors: not a reward model", "model:{ckpt}"),
    *checkpoint_rows("rl", ["rl", "{bad}", *RL[2:], "ends_sentence"], {"p.jsonl": PAIR}),
    Row("rl: mini-batches", [*RL, "ends_sentence", "--set", "rl.mini_batches=3"], "must divide", {"p.jsonl": PAIR}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random Llama (d_model 32, d_ff 64) with a BPE tokenizer."""
    folder = tmp_path_factory.mktemp("bad-input")
    tokenizer = train_tokenizer(["Capitu tinha olhos de cigana oblíqua e dissimulada.\n" * 8], 300)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = ModelConfig.from_name(
        "llama-tiny", vocab_size=tokenizer.get_vocab_size(), max_seq_len=64, n_layer=1, d_model=32, n_head=4, d_ff=64
    )
    torch.manual_seed(0)
    return save_model(folder / "ckpt", Transformer(config), folder / "tokenizer.json")


def rehash(folder: Path) -> None:
    """Rewrite a checkpoint's manifest.json for the files it holds now (size and sha256 of each)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def create(tmp: Path, ckpt: Path, files: dict[str, Value]) -> None:
    for name, value in files.items():
        path = tmp / name
        if value is CKPT:
            shutil.copytree(ckpt, path)
        elif value is REHASH:
            rehash(path.parent)
        elif value is None:
            path.unlink()
        elif name.endswith("/"):
            path.mkdir(parents=True)
        elif callable(value):
            path.write_bytes(value(path.read_bytes()))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(value.encode() if isinstance(value, str) else value)


def tree(folder: Path) -> dict[str, str]:
    """Every path under folder (hidden ones too), with a hash of each file's bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def run(argv: list[str], stdin: bytes | None, cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    """Exit status and stderr of `mistura argv`: in a subprocess when it reads stdin, else in-process."""
    if stdin is not None:
        args = [sys.executable, "-c", ENTRY, *(arg.encode("utf-8", "surrogateescape") for arg in argv)]
        done = subprocess.run(args, input=stdin, capture_output=True, cwd=cwd, timeout=120)
        return done.returncode, done.stderr.decode("utf-8", "replace")
    monkeypatch.chdir(cwd)
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    except Exception:  # what a user would see as a traceback
        return 1, capsys.readouterr().err + traceback.format_exc()
    return code, capsys.readouterr().err


def params() -> list:
    names = [row.name for row in ROWS]
    assert len(set(names)) == len(names), "row names must be unique"
    return [pytest.param(row, id=row.name) for row in ROWS]


@pytest.mark.parametrize("row", params())
def test_malformed_input_is_a_clear_error_that_writes_nothing(row: Row, ckpt, tmp_path, capsys, monkeypatch):
    tmp = tmp_path / "work"
    tmp.mkdir()
    create(tmp, ckpt, {name.replace("{tmp}", str(tmp)): value for name, value in row.files.items()})
    argv = [arg.replace("{tmp}", str(tmp)).replace("{ckpt}", str(ckpt)) for arg in row.argv]
    before, ckpt_before = tree(tmp), tree(ckpt)
    code, err = run(argv, row.stdin, tmp, capsys, monkeypatch)
    assert "Traceback" not in err, err
    assert "error:" in err and code == 2, f"exit status {code}, stderr:\n{err}"
    assert "usage:" not in err, f"argparse refused the row's argv (a typo in the row?):\n{err}"
    assert row.says in err
    assert tree(tmp) == before, f"left behind: {sorted(set(tree(tmp)) - set(before))}"
    assert tree(ckpt) == ckpt_before
