import json

import pytest

from mistura.cli import main


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
