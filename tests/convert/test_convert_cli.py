"""`mistura convert` end to end on a tiny Hugging Face Llama: FP8 both ways, model-parallel shards."""

from __future__ import annotations

import json

import pytest
import torch

import mistura
from mistura.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(folder)
    return folder


IDS = torch.tensor([[5, 17, 200, 3, 99, 42]])


def test_fp8_round_trip_through_the_cli(hf_llama, tmp_path, capsys):
    fp8, bf16 = tmp_path / "fp8", tmp_path / "bf16"
    assert main(["convert", "bf16-to-fp8", str(hf_llama), str(fp8), "--block", "32", "32", "--no-progress"]) == 0
    quant = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["weight_block_size"] == [32, 32]
    # An FP8 folder is not imported as it is: the error says what to run.
    assert main(["convert", "from-hf", str(fp8), str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "fp8-to-bf16" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    assert main(["convert", "fp8-to-bf16", str(fp8), str(bf16), "--no-progress"]) == 0
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    original, restored = mistura.load(hf_llama), mistura.load(bf16)
    for name, weight in original.state_dict().items():
        error = (restored.state_dict()[name] - weight).abs().max()
        assert error <= weight.abs().max() / 16, name  # e4m3 keeps 4 significant bits


def test_fp8_commands_refuse_the_wrong_source(hf_llama, tmp_path, capsys):
    assert main(["convert", "fp8-to-bf16", str(hf_llama), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "not an FP8 checkpoint" in capsys.readouterr().err


def test_model_parallel_conversion_loads_back_exactly(hf_llama, tmp_path):
    out = tmp_path / "mp"
    assert main(["convert", "from-hf", str(hf_llama), str(out), "--model-parallel", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    merged, direct = mistura.load(out), mistura.load(hf_llama)
    for name, tensor in direct.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    assert torch.equal(merged(IDS), direct(IDS))


def test_model_parallel_that_does_not_divide_is_refused(hf_llama, tmp_path, capsys):
    assert main(["convert", "from-hf", str(hf_llama), str(tmp_path / "mp"), "--model-parallel", "3"]) == 2
    err = capsys.readouterr().err
    assert "does not split evenly over 3" in err, err
    assert not (tmp_path / "mp").exists()
