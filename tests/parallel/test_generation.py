"""`mistura generate` and `mistura chat` under torchrun: two processes split the model and print what one prints.

Every torchrun run starts three Pythons (several seconds on 2 cores), so each run checks as
much as it can; the single-process references run in this process through `main`. The models
are random (tests.convert.test_parallel's `random_model`), so that their logits are far
apart and one process and two choose the same tokens.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from mistura.checkpoint import save_model, weights_of
from mistura.cli import main
from mistura.convert.parallel import write_model_parallel
from mistura.data.tokenizer import train_tokenizer
from tests.convert.test_parallel import CONFIGS, random_model
from tests.infer.test_chat import TEXT
from tests.parallel.spawn import free_port, torchrun_launcher
from tests.parallel.test_ddp import no_traceback_of_ours, worker

PROMPT = "Capitu tinha olhos"
GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]
CHAT_LINES = "Olá\n/limpar\nCapitu\n/sair\n"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each tiny model whole, and split into `--model-parallel` folders, with one BPE tokenizer:

    gqa, gqa-mp2             Llama with grouped-query attention
    mla, mla-mp2, mla-mp4    DragaoLT: latent attention, shared and routed experts
    bad                      Llama with one kv head, which two ranks cannot split
    """
    root = tmp_path_factory.mktemp("generation")
    tokenizer = train_tokenizer([TEXT * 4], 320)
    tokenizer.save(str(root / "tokenizer.json"))
    vocab = dict(vocab_size=tokenizer.get_vocab_size(), max_seq_len=64)
    for name, config, splits in [
        ("gqa", CONFIGS["llama-tiny"](), (2,)),
        ("mla", CONFIGS["dragao-tiny-mla"](), (2, 4)),
        ("bad", dataclasses.replace(CONFIGS["llama-tiny"](), n_kv_head=1), ()),
    ]:
        model = random_model(dataclasses.replace(config, **vocab))
        save_model(root / name, model, root / "tokenizer.json")
        state = weights_of(model)
        for n in splits:
            write_model_parallel(
                root / f"{name}-mp{n}", model.config, state.__getitem__, list(state), n, root / "tokenizer.json", False
            )
    return root


def torchrun_command(port: int, *args: str) -> list[str]:
    """`python -m mistura.cli ARGS` on two processes under torchrun, which meet on `port`."""
    return [*torchrun_launcher(2, port), "-m", "mistura.cli", *args]


def torchrun(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = torchrun_command(free_port(), *args)
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, env=ONE_THREAD)


def alone(capsys, *args: str) -> str:
    """What `mistura ARGS` prints on stdout in a single process."""
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_greedy_generation_over_gqa_rank_files_drafted_by_mla_equals_one_process(models, capsys):
    """A target and a draft, each from its own rank file: the greedy text is the target's alone."""
    expected = alone(capsys, "generate", str(models / "gqa"), "--prompt", PROMPT, *GREEDY)
    assert len(expected) > len(PROMPT) + 1
    draft = ["--draft", str(models / "mla-mp2")]
    result = torchrun("generate", str(models / "gqa-mp2"), "--prompt", PROMPT, *GREEDY, *draft)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected  # rank 0 alone prints
    assert result.stderr.count("draft tokens accepted") == 1


def test_greedy_generation_over_mla_and_moe_rank_files_equals_one_process(models, capsys):
    expected = alone(capsys, "generate", str(models / "mla"), "--prompt", PROMPT, *GREEDY)
    result = torchrun("generate", str(models / "mla-mp2"), "--prompt", PROMPT, *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_sampled_prompts_file_over_a_whole_checkpoint_equals_one_process(models, tmp_path, capsys):
    """A checkpoint split as it loads; rank 0 reads the prompts file, and writes the JSONL alone."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("O amor é\nNaquele tempo a cidade do Rio\nCapitu\n", encoding="utf-8")
    sampled = ["--input-file", str(prompts), "--batch-size", "2", "--temperature", "1", "--top-p", "0.9", "--seed", "7"]
    alone(capsys, "generate", str(models / "gqa"), *sampled, "--output", str(tmp_path / "one.jsonl"))
    result = torchrun("generate", str(models / "gqa"), *sampled, "--output", str(tmp_path / "two.jsonl"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"3 completions written to {tmp_path / 'two.jsonl'}\n"
    one, two = ((tmp_path / f"{name}.jsonl").read_text(encoding="utf-8") for name in ("one", "two"))
    assert two == one and len({json.loads(line)["completion"] for line in two.splitlines()}) == 3


def test_chat_over_rank_files_for_four_ranks_on_two_equals_one_process(models, capsys, monkeypatch):
    """Rank 0 reads the lines and every rank follows, /limpar and /sair included; replies are sampled."""
    short = ["--max-new-tokens", "16"]
    monkeypatch.setattr("sys.stdin", io.StringIO(CHAT_LINES))
    expected = alone(capsys, "chat", str(models / "mla"), *short)
    assert expected.count("[conversation cleared]") == 1
    result = torchrun("chat", str(models / "mla-mp4"), *short, stdin=CHAT_LINES)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_a_model_the_processes_cannot_split_is_an_error_on_every_rank(models):
    result = torchrun("generate", str(models / "bad"), "--prompt", PROMPT)
    assert result.returncode != 0
    line = "error: model.n_kv_head: 1 does not split evenly over 2 model-parallel ranks"
    assert result.stderr.count(line) == 2, result.stderr
    assert no_traceback_of_ours(result.stderr), result.stderr


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_rank_0_that_dies_ends_the_chat_with_a_clear_error(models):
    """Rank 1 waits for rank 0's next line as long as it takes, but not for a rank 0 that died."""
    port = free_port()
    command = torchrun_command(port, "chat", str(models / "mla-mp2"), "--max-new-tokens", "16")
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chat = subprocess.Popen(command, **pipes, env=ONE_THREAD)
    try:
        assert chat.stdout.read(2) == b"> "  # rank 0 asks for a line: every rank has its part of the model
        os.kill(worker(port, 0), signal.SIGKILL)
        _, stderr = chat.communicate(timeout=60)
    finally:
        chat.kill()
    stderr = stderr.decode()
    assert chat.returncode != 0
    assert "error: rank 1: the process group failed (" in stderr and "by peer" in stderr, stderr
    assert "another process crashed, hangs or quit" in stderr and no_traceback_of_ours(stderr), stderr
