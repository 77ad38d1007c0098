import json

import pytest
import torch

import mistura
from mistura.checkpoint import checkpoint_directory, save_model, weights_of, write_config
from mistura.errors import CheckpointError, DataError
from mistura.model import Transformer
from mistura.shards import write_weights


@pytest.fixture
def saved(tmp_path, tiny):
    torch.manual_seed(0)
    model = Transformer(tiny("llama-tiny"))
    return model, save_model(tmp_path / "ckpt", model)


def test_save_and_load_round_trip(saved):
    model, directory = saved
    loaded = mistura.load(directory)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    x = torch.randint(0, 97, (2, 8))
    assert torch.equal(model(x), loaded(x))
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors", "manifest.json"}


def test_load_casts_dtype(saved):
    _, directory = saved
    assert mistura.load(directory, dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


def test_truncated_weights_are_named(saved):
    _, directory = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated"):
        mistura.load(directory)


def test_mismatched_config_is_named(saved):
    _, directory = saved
    config = json.loads((directory / "config.json").read_text())
    config["d_ff"] = 128
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        mistura.load(directory)


def test_shape_mismatch_names_the_tensor(saved, tiny, tmp_path):
    _, directory = saved  # weights with d_ff=64, config below with d_ff=128
    other = save_model(tmp_path / "other", Transformer(tiny("llama-tiny", d_ff=128)))
    with checkpoint_directory(tmp_path / "mixed") as tmp:
        (tmp / "config.json").write_bytes((other / "config.json").read_bytes())
        (tmp / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.mlp\.\w+_proj\.weight' has shape .* expects"):
        mistura.load(tmp_path / "mixed")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        mistura.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        mistura.load(tmp_path / "empty")


def test_checkpoint_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with checkpoint_directory(tmp_path / "ckpt") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_directory_replaces_an_existing_one(tmp_path):
    for content in (b"old", b"new"):
        with checkpoint_directory(tmp_path / "ckpt") as tmp:
            (tmp / "f.bin").write_bytes(content)
    assert (tmp_path / "ckpt" / "f.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_tokenizer_travels_with_the_checkpoint(tmp_path, tiny):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tokenizer_file = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "oi": 3}, unk_token="<|pad|>")).save(
        str(tokenizer_file)
    )
    directory = save_model(tmp_path / "ckpt", Transformer(tiny("llama-tiny")), tokenizer_file)
    assert mistura.load_tokenizer(directory).token_to_id("oi") == 3
    (directory / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer"):
        mistura.load_tokenizer(directory)


@pytest.fixture
def sharded(tmp_path, tiny):
    """A checkpoint whose weights are split in shards of at most 8 KB, as conversions write them."""
    torch.manual_seed(0)
    model = Transformer(tiny("llama-tiny"))
    weights = weights_of(model)
    with checkpoint_directory(tmp_path / "sharded") as tmp:
        write_config(tmp, model.config)
        write_weights(tmp, {name: t.nbytes for name, t in weights.items()}, weights.__getitem__, max_shard_size="8KB")
    return model, tmp_path / "sharded"


def test_sharded_weights_load(sharded):
    model, directory = sharded
    shards = sorted(p.name for p in directory.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (directory / "model.safetensors").exists()
    assert set(json.loads((directory / "manifest.json").read_text())) == {
        "config.json",
        "model.safetensors.index.json",
        *shards,
    }
    loaded = mistura.load(directory)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    x = torch.randint(0, 97, (2, 8))
    assert torch.equal(model(x), loaded(x))


def test_missing_shard_is_named(sharded):
    _, directory = sharded
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        mistura.load(directory)


def test_shard_mismatch_is_named_before_loading(sharded):
    """A shard that passes the manifest but holds other shapes than the config (a hand-edited checkpoint)."""
    _, directory = sharded
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"d_ff": 128}))
    (directory / "manifest.json").unlink()
    with checkpoint_directory(directory.parent / "edited") as tmp:
        for path in directory.iterdir():
            (tmp / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.mlp\.\w+_proj\.weight' has shape .* expects"):
        mistura.load(directory.parent / "edited")
