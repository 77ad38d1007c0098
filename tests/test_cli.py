import io
import json

import pytest
import torch

import mistura
from mistura.checkpoint import save_model
from mistura.cli import main
from mistura.model import Transformer


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A run trained through `mistura train` on the small corpus."""
    out = tmp_path_factory.mktemp("cli") / "run"
    config = out.parent / "run.yaml"
    config.write_text(
        "model: {preset: llama-tiny, n_layer: 2, d_model: 32, n_head: 4, n_kv_head: 2, d_ff: 64, max_seq_len: 64}\n"
        f"data: {{dir: '{prepared}', vocab_size: 384}}\n"
        f"train: {{out_dir: '{out}', batch_size: 4, max_steps: 10, warmup_steps: 2, eval_interval: 5,"
        " eval_batches: 2, log_interval: 1}\n"
        "sample: {prompts: ['Capitu'], max_new_tokens: 8}\n"
    )
    assert main(["train", str(config), "--no-progress", "--set", "train.lr=0.01"]) == 0
    return out


def test_train_prints_losses_and_samples(trained, capsys):
    assert (trained / "checkpoints" / "step-0000010" / "tokenizer.json").is_file()
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 10 + 2


def test_generate_streams_a_continuation(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "Capitu", "--max-new-tokens", "12", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Capitu") and len(first) > len("Capitu\n")
    main(["generate", str(trained), "--prompt", "Capitu", "--max-new-tokens", "12", "--seed", "3"])
    assert capsys.readouterr().out == first


def test_generate_input_file_writes_jsonl(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("O amor é\nNaquele tempo\n", encoding="utf-8")
    assert main(["generate", str(trained), "--input-file", str(prompts), "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["O amor é", "Naquele tempo"]
    assert all(isinstance(r["completion"], str) for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "the prompt is empty"),
        (["--input-file", "missing.txt"], "prompts file not found"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        ([], "give either --prompt or --input-file"),
    ],
)
def test_generate_bad_input_is_a_clear_error(trained, capsys, args, message):
    assert main(["generate", str(trained), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_blank_line_in_prompts_file_names_the_line(trained, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("um\n\ndois\n", encoding="utf-8")
    assert main(["generate", str(trained), "--input-file", str(prompts)]) == 2
    assert "line 2: empty prompt" in capsys.readouterr().err


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "Oi"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_params_prints_counts(capsys):
    assert main(["params", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "36,864 bytes" in out
    assert main(["params", "llama-tiny", "--set", "n_kv_head=8", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["kv_cache_bytes_per_token_bf16"] == 2 * 4 * 2 * 8 * 32
    assert main(["params", "nonexistent"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_train_with_bad_config_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model: {preset: llama-tiny, n_head: 5}\n")
    assert main(["train", str(config)]) == 2
    assert "model.n_head: 5 heads do not divide" in capsys.readouterr().err


def test_convert_round_trip(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config = transformers.LlamaConfig(vocab_size=64, max_position_embeddings=32, **shape)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    convert = ["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--max-shard-size", "20KB"]
    assert main([*convert, "--dtype", "fp32"]) == 0
    assert "mistura checkpoint written to" in capsys.readouterr().out
    assert len(list((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))) > 1
    export = ["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--model-type", "mistral"]
    assert main([*export, "--no-progress"]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert isinstance(reloaded, transformers.MistralForCausalLM)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf_model(ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_convert_a_trained_run_for_transformers(trained, tmp_path):
    """The run's latest checkpoint and its BPE tokenizer, as transformers loads them."""
    transformers = pytest.importorskip("transformers")
    assert main(["convert", "to-hf", str(trained), str(tmp_path / "hf"), "--no-progress"]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Capitu olhou para mim"
    ids = hf_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == mistura.load_tokenizer(trained).encode(text).ids
    torch.testing.assert_close(hf_model(ids).logits, mistura.load(trained)(ids), atol=1e-4, rtol=1e-4)


def test_convert_bad_input_is_a_clear_error(tmp_path, tiny, capsys):
    moc = tiny("llama-tiny", layer_mlp=("moc", "moc"), moe=dict(n_experts=4, top_k=2, d_expert=32))
    save_model(tmp_path / "moc", Transformer(moc))
    cases = [
        (["from-hf", str(tmp_path / "nope"), str(tmp_path / "out")], "no such checkpoint folder"),
        (["from-hf", str(tmp_path / "moc"), str(tmp_path / "out")], "is a mistura checkpoint already"),
        (["to-hf", str(tmp_path / "moc"), str(tmp_path / "out")], "collaborative experts"),
        (["to-hf", str(tmp_path / "moc"), str(tmp_path / "out"), "--model-type", "bert"], "'bert' is not supported"),
        (["to-hf", str(tmp_path / "moc"), str(tmp_path / "out"), "--max-shard-size", "lots"], "max_shard_size"),
    ]
    for args, message in cases:
        assert main(["convert", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moc"]


def test_generate_with_a_draft_prints_the_targets_greedy_text(trained, capsys):
    greedy = ["generate", str(trained), "--prompt", "Capitu", "--max-new-tokens", "10", "--temperature", "0"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--draft", str(trained), "--gamma", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "draft tokens accepted (100%)" in out.err


def test_a_draft_with_a_prompts_file_is_refused(trained, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("um\n", encoding="utf-8")
    assert main(["generate", str(trained), "--input-file", str(prompts), "--draft", str(trained)]) == 2
    assert "--draft decodes one prompt at a time" in capsys.readouterr().err


def test_train_with_a_teacher_distils(trained, prepared, tmp_path):
    config = tmp_path / "student.yaml"
    config.write_text(
        "model: {preset: llama-tiny, n_layer: 1, d_model: 32, n_head: 4, n_kv_head: 2, d_ff: 64, max_seq_len: 64}\n"
        f"data: {{dir: '{prepared}', vocab_size: 384}}\n"
        f"train: {{out_dir: '{tmp_path / 'student'}', batch_size: 2, max_steps: 2, warmup_steps: 1, eval_interval: 2,"
        " eval_batches: 1, log_interval: 1}\n"
        "sample: {prompts: ['Capitu'], max_new_tokens: 4}\n"
    )
    assert main(["train", str(config), "--no-progress", "--teacher", str(trained)]) == 0
    assert (tmp_path / "student" / "checkpoints" / "step-0000002" / "model.safetensors").is_file()


def test_teacher_continuations_need_a_teacher(trained, capsys):
    assert main(["train", "missing.yaml", "--teacher-continuations", "8"]) == 2
    assert "--teacher-continuations needs --teacher" in capsys.readouterr().err


def test_compiled_generation_and_chat_give_the_eager_text(trained, capsys, monkeypatch):
    """--compile traces the model with dynamic shapes (each prompt, batch and cache length through one graph); the
    graph runs on dynamo's eager backend here, as inductor would compile for a minute."""
    traced, compile = [], torch.compile

    def compile_eagerly(model, **options):
        traced.append(options)
        return compile(model, backend="eager", **options)

    greedy = ["generate", str(trained), "--prompt", "Capitu", "--max-new-tokens", "10", "--temperature", "0"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    assert main([*greedy, "--compile"]) == 0 and capsys.readouterr().out == plain
    monkeypatch.setattr("sys.stdin", io.StringIO("Capitu\n/sair\n"))
    assert main(["chat", str(trained), "--temperature", "0", "--max-new-tokens", "6", "--compile"]) == 0
    assert traced == [{"dynamic": True}] * 2 and capsys.readouterr().out
