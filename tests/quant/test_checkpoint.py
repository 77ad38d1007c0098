"""Quantised checkpoints: written atomically with their recipe, loaded by mistura.load, bad ones refused."""

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

import mistura
from mistura.checkpoint import checkpoint_directory, save_model, write_model
from mistura.cli import main
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer
from mistura.quant import QuantConfig, quantize_checkpoint, quantize_model, save_quantized
from mistura.quant.int4 import Int4Linear
from mistura.quant.int8 import Int8Linear

RECIPES = [QuantConfig("fp8"), QuantConfig("int8"), QuantConfig("int8", 16), QuantConfig("int4", 32)]


@pytest.fixture
def checkpoint(tiny, tmp_path):
    """A tiny dragao (MLA, routed and shared experts) saved with a tokenizer."""
    torch.manual_seed(0)
    tokenizer = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "oi": 3}, unk_token="<|pad|>")).save(str(tokenizer))
    return save_model(tmp_path / "model", Transformer(tiny("dragao-tiny", n_layer=2)), tokenizer)


@pytest.mark.parametrize("quant", RECIPES, ids=lambda q: f"{q.format}-{q.group_size}")
@torch.no_grad()
def test_loaded_model_equals_the_quantised_one(checkpoint, tmp_path, quant):
    out = quantize_checkpoint(checkpoint, tmp_path / "quantised", quant)
    idx = torch.randint(0, 97, (2, 12))
    expected = quantize_model(mistura.load(checkpoint), quant)(idx)
    loaded = mistura.load(out)
    assert torch.equal(loaded(idx), expected)
    assert not loaded.training
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"format": quant.format, "group_size": quant.group_size}
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert "model.safetensors" in json.loads((out / "manifest.json").read_text())


def test_quantised_weights_take_less_room(checkpoint, tmp_path):
    full = (checkpoint / "model.safetensors").stat().st_size
    sizes = {}
    for quant in (QuantConfig("fp8"), QuantConfig("int8"), QuantConfig("int4", 32)):
        out = quantize_checkpoint(checkpoint, tmp_path / quant.format, quant)
        sizes[quant.format] = (out / "model.safetensors").stat().st_size
    assert sizes["int4"] < sizes["int8"] < full and sizes["fp8"] < full


@torch.no_grad()
def test_dtype_applies_to_the_full_precision_layers(checkpoint, tmp_path):
    out = quantize_checkpoint(checkpoint, tmp_path / "fp8", QuantConfig("fp8"))
    model = mistura.load(out, dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.o_proj.weight.dtype == torch.float8_e4m3fn
    logits = model(torch.randint(0, 97, (1, 4)))
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def test_a_quantised_checkpoint_is_not_quantised_again(checkpoint, tmp_path):
    out = quantize_checkpoint(checkpoint, tmp_path / "int8", QuantConfig("int8"))
    with pytest.raises(CheckpointError, match="already quantised"):
        quantize_checkpoint(out, tmp_path / "again", QuantConfig("int4", 32))


def test_quantising_refuses_its_own_input_as_output(checkpoint):
    with pytest.raises(CheckpointError, match="another directory"):
        quantize_checkpoint(checkpoint, checkpoint, QuantConfig("int8"))
    assert mistura.load(checkpoint) is not None


def test_missing_checkpoint_and_bad_group_size(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        quantize_checkpoint(tmp_path / "nowhere", tmp_path / "out", QuantConfig("int8"))
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_checkpoint(checkpoint, tmp_path / "out", QuantConfig("int4", 128))
    assert not (tmp_path / "out").exists()


def test_tensors_that_do_not_fit_the_recipe_are_named(checkpoint, tmp_path):
    model = quantize_model(mistura.load(checkpoint), QuantConfig("int4", 32))
    out = save_quantized(tmp_path / "lying", model, QuantConfig("int4", 16))  # config.json says groups of 16
    with pytest.raises(CheckpointError, match="weight_scale' has shape .* the config expects"):
        mistura.load(out)


def test_codes_of_the_wrong_dtype_are_refused(checkpoint, tmp_path):
    model = quantize_model(mistura.load(checkpoint), QuantConfig("int8"))
    layer = model.blocks[0].attn.o_proj
    assert isinstance(layer, Int8Linear)
    layer.weight = layer.weight.float()
    out = save_quantized(tmp_path / "float-codes", model, QuantConfig("int8"))
    with pytest.raises(
        CheckpointError, match="blocks.0.attn.o_proj.weight' is torch.float32, the layer stores torch.int8"
    ):
        mistura.load(out)


def test_a_truncated_file_is_reported(checkpoint, tmp_path):
    out = quantize_checkpoint(checkpoint, tmp_path / "int4", QuantConfig("int4", 32))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        mistura.load(out)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"format": "int3", "group_size": 32}, "unknown quantization format 'int3'"),
        ({"format": "int4", "group_size": 32, "bits": 4}, "unknown key 'bits'"),
        ({"format": "int4", "group_size": 128}, "group size 128 does not divide"),
    ],
)
def test_a_bad_recipe_in_config_json_is_reported(checkpoint, tmp_path, section, message):
    model = quantize_model(mistura.load(checkpoint), QuantConfig("int4", 32))
    with checkpoint_directory(tmp_path / "bad") as tmp:
        write_model(tmp, model)
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(config | {"quantization": section}))
    with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
        mistura.load(tmp_path / "bad")


def test_cli_quantizes_and_reports_bad_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["quantize", str(checkpoint), str(out), "--format", "int4", "--group-size", "32"]) == 0
    assert "int4 checkpoint written to" in capsys.readouterr().out
    assert isinstance(mistura.load(out).blocks[0].attn.o_proj, Int4Linear)
    cases = [
        (["--format", "int3"], "unknown quantization format 'int3'"),
        (["--format", "int4"], "group size 128 does not divide"),
        (["--format", "fp8", "--group-size", "64"], "fixed 128 x 128"),
    ]
    for flags, message in cases:
        assert main(["quantize", str(checkpoint), str(tmp_path / "bad"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["quantize", str(out), str(tmp_path / "again"), "--format", "int8"]) == 2
    assert "already quantised" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--format", "int8"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
