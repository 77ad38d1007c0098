"""Adapter folders: saved alone, loaded onto their base (and refused on another), merged into a checkpoint, through
the library and the CLI; QLoRA on int8 and int4 bases."""

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mistura
from mistura.checkpoint import checkpoint_directory, save_model
from mistura.cli import main
from mistura.errors import CheckpointError, ConfigError
from mistura.lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    merge_lora,
    merged_model,
    save_adapter,
    trainable_share,
)
from mistura.quant import QuantConfig, quantize_checkpoint
from mistura.quant.linear import QuantLinear


@pytest.fixture
def adapter(saved, randomize, tmp_path):
    """(base checkpoint, adapter folder, the adapted model's logits on tokens) for a Qwen-style MoE."""

    def make(kind="qwen-moe", targets=("all",)):
        base = saved(kind)
        model = randomize(apply_lora(mistura.load(base), LoRAConfig(rank=4, alpha=8, targets=targets)))
        return base, save_adapter(model, tmp_path / "adapter", base=base), model

    return make


@torch.no_grad()
def test_an_adapter_is_small_and_loads_back_onto_its_base(adapter, tokens):
    base, folder, model = adapter()
    ids = tokens(model)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json", "manifest.json"]
    stored = load_file(folder / "adapter.safetensors")
    assert stored and all(".lora_" in name for name in stored)  # the adapters alone
    assert sum(t.numel() for t in stored.values()) == trainable_share(model).trainable
    loaded = load_adapter(mistura.load(base), folder)
    assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(mistura.load(folder)(ids), model(ids))  # the base the adapter names, adapted


@torch.no_grad()
def test_save_load_merge_round_trip_through_files(adapter, tokens, tmp_path):
    base, folder, model = adapter()
    ids = tokens(model)
    merged = save_model(tmp_path / "merged", merged_model(load_adapter(mistura.load(base), folder)))
    torch.testing.assert_close(mistura.load(merged)(ids), model(ids), atol=1e-5, rtol=0)
    assert json.loads((merged / "config.json").read_text()) == mistura.load(base).config.to_dict()


@torch.no_grad()
def test_lora_merge_through_the_cli(adapter, tokens, tmp_path, capsys):
    base, folder, model = adapter("llama", ("attention", "mlp"))
    ids = tokens(model)
    assert main(["lora", "merge", str(folder), str(tmp_path / "merged")]) == 0
    assert "merged checkpoint" in capsys.readouterr().out
    torch.testing.assert_close(mistura.load(tmp_path / "merged")(ids), model(ids), atol=1e-5, rtol=0)
    assert main(["lora", "merge", str(folder), str(tmp_path / "again"), "--base", str(base)]) == 0


@pytest.mark.parametrize(
    "change, says",
    [(dict(d_model=48), "d_model=32 (this base: 48)"), (dict(n_layer=3), "n_layer=2"), (dict(vocab_size=98), "vocab")],
)
def test_an_adapter_for_another_base_is_refused_by_field(adapter, build, change, says):
    _, folder, _ = adapter("llama", ("attention",))
    other = build("llama", **change)
    with pytest.raises(CheckpointError, match=f"made for another base.*{re.escape(says)}"):
        load_adapter(other, folder)
    assert not any(".lora_" in name for name in other.state_dict())


def test_training_only_fields_may_differ(adapter, build):
    _, folder, _ = adapter("llama", ("attention",))
    load_adapter(build("llama", init_std=0.01, attn_dropout=0.1), folder)


def test_a_truncated_adapter_file_is_caught_by_the_manifest(adapter):
    base, folder, _ = adapter()
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter.safetensors is truncated"):
        load_adapter(mistura.load(base), folder)


@pytest.mark.parametrize(
    "tensors_of, says",
    [(dict(targets=("q_proj",)), "missing tensor.*k_proj.lora_A"), (dict(rank=4), "lora_A' has shape \\(4, 32\\)")],
)
def test_tensors_that_do_not_fit_the_adapter_config_are_named(saved, tmp_path, tensors_of, says):
    base = saved("llama")
    config = LoRAConfig(rank=2, targets=("q_proj", "k_proj"))
    ours = save_adapter(apply_lora(mistura.load(base), config), tmp_path / "ours", base=base)
    other = LoRAConfig(**{**config.to_dict(), **tensors_of})
    theirs = save_adapter(apply_lora(mistura.load(base), other), tmp_path / "theirs", base=base)
    with checkpoint_directory(tmp_path / "mixed") as tmp:
        shutil.copy(ours / "adapter_config.json", tmp)
        shutil.copy(theirs / "adapter.safetensors", tmp)
    with pytest.raises(CheckpointError, match=says):
        load_adapter(mistura.load(base), tmp_path / "mixed")


def test_an_adapter_without_a_reachable_base_asks_for_one(adapter, tmp_path):
    _, folder, _ = adapter("llama", ("attention",))
    config = json.loads((folder / "adapter_config.json").read_text())
    with checkpoint_directory(tmp_path / "moved") as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config | {"base": config["base"] | {"path": None}}))
        (tmp / "adapter.safetensors").write_bytes((folder / "adapter.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="names no base.*--base"):
        mistura.load(tmp_path / "moved")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_qlora_trains_adapters_on_a_quantised_base_and_merges_to_full_precision(saved, tokens, tmp_path, fmt):
    quantised = quantize_checkpoint(saved("qwen-moe"), tmp_path / fmt, QuantConfig(fmt, 16 if fmt == "int4" else None))
    model = apply_lora(mistura.load(quantised), LoRAConfig(rank=4, alpha=8, targets=("all",))).train()
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    ids = tokens(model, batch=4, length=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(p.grad is None for name, p in model.named_parameters() if ".lora_" not in name)
    assert 0 < trainable_share(model).fraction < 0.5
    with pytest.raises(ConfigError, match="cannot merge LoRA into the quantised layer"):
        merge_lora(model)
    folder = save_adapter(model, tmp_path / "qlora", base=quantised)
    assert main(["lora", "merge", str(folder), str(tmp_path / "merged")]) == 0
    merged = mistura.load(tmp_path / "merged")
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    assert "quantization" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with torch.no_grad():
        expected = model.eval()(ids)
        torch.testing.assert_close(merged(ids), expected, atol=0.02 * expected.abs().max().item(), rtol=0)


def test_params_prints_the_share_lora_trains(capsys):
    assert main(["params", "llama-tiny", "--lora-rank", "8", "--lora-targets", "q_proj", "v_proj"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "LoRA" in line)
    # 4 layers of q_proj 256 -> 256 and v_proj 256 -> 128 (4 KV heads of 32): 4 * 8 * (512 + 384)
    assert "trainable with LoRA r=8" in line and "28,672 (0.56%)" in line


def test_generate_reads_an_adapter_folder_with_its_base_tokenizer(build, tmp_path, capsys):
    from mistura.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["Capitu tinha olhos de cigana oblíqua e dissimulada.\n" * 8], 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    base = save_model(
        tmp_path / "base", build("llama", vocab_size=tokenizer.get_vocab_size()), tmp_path / "tokenizer.json"
    )
    model = apply_lora(mistura.load(base), LoRAConfig(rank=2, targets=("attention",)))
    folder = save_adapter(model, tmp_path / "adapter", base=base)
    assert mistura.load_tokenizer(folder).get_vocab() == tokenizer.get_vocab()
    assert main(["generate", str(folder), "--prompt", "Capitu", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Capitu")
