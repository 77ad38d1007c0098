"""PEFT's format both ways: an exported adapter on the `to_hf` model gives mistura's logits (fp32, 1e-4), an
imported one gives PEFT's, and what mistura cannot run is refused by name."""

import json
import warnings

import pytest
import torch

import mistura
from mistura.checkpoint import save_model
from mistura.cli import main
from mistura.convert.hf import to_hf
from mistura.errors import CheckpointError
from mistura.lora import LoRAConfig, apply_lora, export_peft, import_peft, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MIXTRAL = dict(layer_mlp=["moe", "moe"], qkv_bias=False, moe=dict(n_experts=4, top_k=2, d_expert=16, norm_topk=True))
# (kind, overrides, LoRA options): what each case exports.
CASES = {
    "llama-all-linear": ("llama", {}, dict(targets=("all-linear",))),
    "gpt2-fused-c_attn": ("gpt2", {}, dict(targets=("q_proj", "v_proj", "mlp"))),  # k_proj's rows of c_attn zero
    "qwen2-moe-all-rslora": ("qwen-moe", {}, dict(targets=("all",), rslora=True, dropout=0.1)),
    "mixtral-experts": ("qwen-moe", MIXTRAL, dict(targets=("attention", "experts"))),
    "deepseek-v3-mla-moe": ("dragao", {}, dict(targets=("all",))),
}


@pytest.fixture
def exported(build, randomize, tmp_path):
    """exported(case): (mistura model with the adapter, Hugging Face base folder, PEFT folder)."""

    def make(case: str):
        kind, overrides, options = CASES[case]
        model = build(kind, **overrides)
        base = save_model(tmp_path / "base", model)
        randomize(apply_lora(model, LoRAConfig(rank=4, alpha=8, **options)), std=0.1)
        adapter = save_adapter(model, tmp_path / "adapter", base=base)
        return model.eval(), to_hf(base, tmp_path / "hf"), export_peft(adapter, tmp_path / "peft")

    return make


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_model(hf_folder, peft_folder):
    with warnings.catch_warnings():  # PEFT warns of rank_pattern keys for parameters, which it does apply
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(hf_model(hf_folder), peft_folder).eval()


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_an_exported_adapter_on_the_exported_base_gives_mistura_logits(exported, tokens, case):
    model, hf_folder, peft_folder = exported(case)
    ids = tokens(model)
    base = hf_model(hf_folder)(ids).logits
    theirs = peft_model(hf_folder, peft_folder)(ids).logits
    ours = model(ids)
    assert (base - ours).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gpt2-fused-c_attn", "qwen2-moe-all-rslora", "deepseek-v3-mla-moe"])
@torch.no_grad()
def test_an_exported_adapter_imports_back_to_the_same_logits(exported, tokens, tmp_path, case):
    model, _, peft_folder = exported(case)
    ids = tokens(model)
    back = import_peft(peft_folder, tmp_path / "back", mistura.load(tmp_path / "base"), base_path=tmp_path / "base")
    torch.testing.assert_close(mistura.load(back)(ids), model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case, options",
    [
        ("llama-all-linear", dict(target_modules=["q_proj", "v_proj"])),
        ("gpt2-fused-c_attn", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),  # dense B over q, k, v
        ("mixtral-experts", dict(target_modules=["o_proj"], target_parameters=["experts.gate_up_proj"])),
    ],
)
@torch.no_grad()
def test_a_peft_adapter_imports_to_the_logits_peft_gives(exported, tokens, tmp_path, capsys, case, options):
    model, hf_folder, _ = exported(case)
    torch.manual_seed(3)
    config = peft.LoraConfig(r=6, lora_alpha=12, init_lora_weights=False, **options)  # random A and B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(hf_folder), config).eval()
    theirs.save_pretrained(tmp_path / "native")
    ids = tokens(model)
    argv = ["lora", "import-peft", str(tmp_path / "native"), str(tmp_path / "ours"), "--base", str(tmp_path / "base")]
    assert main(argv) == 0
    assert "rank 6" in capsys.readouterr().out
    torch.testing.assert_close(mistura.load(tmp_path / "ours")(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_export_through_the_cli_names_the_base(exported, tmp_path):
    exported("llama-all-linear")
    argv = ["lora", "export-peft", str(tmp_path / "adapter"), str(tmp_path / "cli"), "--base-name", "hf/llama"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "hf/llama"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]


@pytest.mark.parametrize(
    "edit, says",
    [
        (dict(use_dora=True), "use_dora=True is not supported"),
        (dict(peft_type="IA3"), "only LORA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_what_mistura_cannot_run_is_refused(exported, tmp_path, edit, says):
    exported("llama-all-linear")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | edit))
    with pytest.raises(CheckpointError, match=says):
        import_peft(tmp_path / "peft", tmp_path / "back", mistura.load(tmp_path / "base"))
    assert not (tmp_path / "back").exists()


def test_an_adapter_of_the_lm_head_is_refused(exported, tmp_path):
    model, hf_folder, _ = exported("llama-all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(hf_folder), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    theirs.save_pretrained(tmp_path / "head")
    with pytest.raises(CheckpointError, match="adapters of .*base_model.model.lm_head.*which mistura cannot adapt"):
        import_peft(tmp_path / "head", tmp_path / "back", mistura.load(tmp_path / "base"))
