"""A tiny random-weights checkpoint with the small corpus's tokenizer, and a Portuguese text to score."""

import pytest
import torch

from mistura.checkpoint import save_model
from mistura.config import ModelConfig
from mistura.model import Transformer

TEXT = "Capitu tinha os olhos de cigana oblíqua e dissimulada.\nEra 1857, e a casa da rua de Matacavalos ainda existia."


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig.from_name("llama-tiny", vocab_size=384, max_seq_len=16, n_layer=2, d_model=32, n_head=4)
    return save_model(tmp_path_factory.mktemp("eval") / "ckpt", Transformer(config), prepared / "tokenizer.json")
