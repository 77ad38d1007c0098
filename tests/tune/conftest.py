"""A tiny base checkpoint (no chat template, so the Portuguese script) and JSONL writers for the fine-tuning tests."""

import json
from pathlib import Path

import pytest
import torch

from mistura.checkpoint import save_model
from mistura.config import ModelConfig
from mistura.data.corpus import load_machado
from mistura.data.tokenizer import train_tokenizer
from mistura.model import Transformer

TEXT = (
    "Capitu tinha olhos de cigana oblíqua e dissimulada. Usuário e Assistente conversam na varanda.\n"
    "Naquele tempo, a cidade do Rio de Janeiro era outra; o amor é uma planta que cresce devagar.\n"
    "Quem é Capitu? Bom dia. Dom Casmurro, Quincas Borba, Machado de Assis.\n"
)
# Which word a prompt names: the toy task a tiny model learns in a few steps.
TOY = [
    {"prompt": "Quem tinha olhos de cigana?", "completion": "Capitu"},
    {"prompt": "Quem escreveu Dom Casmurro?", "completion": "Machado"},
    {"messages": [{"role": "user", "content": "Olhos de cigana?"}, {"role": "assistant", "content": "Capitu"}]},
    {"messages": [{"role": "user", "content": "Quem escreveu?"}, {"role": "assistant", "content": "Machado"}]},
]

# The chosen replies are sentences, the rejected ones the same words reversed: what a tiny model tells apart.
PAIRS = [
    {"prompt": "Quem tinha olhos de cigana?", "chosen": "Capitu tinha olhos.", "rejected": "olhos tinha Capitu."},
    {"prompt": "Quem escreveu Dom Casmurro?", "chosen": "Machado de Assis.", "rejected": "Assis de Machado."},
    {"prompt": "Como era a cidade?", "chosen": "A cidade era outra.", "rejected": "outra era cidade A."},
    {"prompt": "E o amor?", "chosen": "O amor é uma planta.", "rejected": "planta uma é amor O."},
]


# A short run of a post-training loop on the toy data: 12 steps, evaluated and saved at 6 and 12.
QUICK_TRAIN = {
    "batch_size": 4,
    "max_steps": 12,
    "lr": 1e-2,
    "warmup_steps": 2,
    "eval_interval": 6,
    "eval_batches": 1,
    "log_interval": 1,
    "checkpoint_interval": 6,
}
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A tiny random Llama with a 64-token context and a real BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tune-base")
    tokenizer = train_tokenizer([TEXT * 4], 320)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = ModelConfig.from_name(
        "llama-tiny", vocab_size=tokenizer.get_vocab_size(), max_seq_len=64, n_layer=1, d_model=32, n_head=4, d_ff=64
    )
    torch.manual_seed(0)
    return save_model(folder / "ckpt", Transformer(config), folder / "tokenizer.json")


@pytest.fixture(scope="session")
def corpus() -> list:
    """The embedded corpus, loaded once."""
    return load_machado()


@pytest.fixture
def jsonl(tmp_path):
    """jsonl(name, records): a JSONL file in the test's folder, each record a line (a dict as JSON, a str as it is)."""

    def write(name: str, records: list) -> Path:
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write


@pytest.fixture
def toy(jsonl) -> Path:
    """The toy task (TOY) as a JSONL file, in both formats."""
    return jsonl("toy.jsonl", TOY)


@pytest.fixture
def pairs(jsonl) -> Path:
    """The preference pairs (PAIRS) as a JSONL file."""
    return jsonl("pairs.jsonl", PAIRS)
