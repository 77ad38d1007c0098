import io
import json
import shutil
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer

from mistura.chat_template import DEFAULT_STOP, load_chat_template
from mistura.checkpoint import save_model
from mistura.cli import main
from mistura.config import ModelConfig
from mistura.data.tokenizer import BOS_ID, EOS_ID, train_tokenizer
from mistura.errors import CheckpointError, DataError
from mistura.infer import engine
from mistura.infer.chat import Chat, open_chat, repl
from mistura.infer.sampling import Sampling
from mistura.loading import load
from mistura.model import Transformer

TEXT = (
    "Capitu tinha olhos de cigana oblíqua e dissimulada. Usuário e Assistente conversam na varanda.\n"
    "Naquele tempo, a cidade do Rio de Janeiro era outra; o amor é uma planta que cresce devagar.\n"
)
CHATML = (
    "{% for message in messages %}\n"
    "<|im_start|>{{ message.role }}\n{{ message.content }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LONG_REPLY = "Capitu tinha olhos de cigana oblíqua e dissimulada na varanda."
TOO_LONG = " ".join([TEXT.replace("\n", " ")] * 2)  # one line, over the 64-token context


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer([TEXT * 4], 320)


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A tiny random Llama with a 64-token context, saved with a real BPE tokenizer."""
    folder = tmp_path_factory.mktemp("chat")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = ModelConfig.from_name(
        "llama-tiny", vocab_size=tokenizer.get_vocab_size(), max_seq_len=64, n_layer=1, d_model=32, n_head=4, d_ff=64
    )
    torch.manual_seed(0)
    return save_model(folder / "ckpt", Transformer(config), folder / "tokenizer.json")


class Scripted:
    """Stands in for the engine: answers with `replies` in turn, streamed word by word, and records each call.

    A call whose index is in `interrupt` streams one word, then raises KeyboardInterrupt (Ctrl-C).
    """

    def __init__(self, tokenizer: Tokenizer, *replies: str, interrupt: tuple[int, ...] = ()):
        self.tokenizer, self.replies, self.interrupt = tokenizer, replies, interrupt
        self.calls = []

    def __call__(self, prompt, sampling, eos_id, on_text):
        self.calls.append(dict(prompt=prompt, text=self.tokenizer.decode(prompt, False), sampling=sampling, eos=eos_id))
        words = self.replies[(len(self.calls) - 1) % len(self.replies)].split(" ")
        for word in words:
            on_text(" " + word)
            if len(self.calls) - 1 in self.interrupt:
                raise KeyboardInterrupt
        return " " + " ".join(words)


def make_chat(tokenizer, generate, template, max_new_tokens=16, **options) -> Chat:
    """A chat over a 64-token context, greedy."""
    return Chat(tokenizer, template, generate, Sampling(max_new_tokens, temperature=0), 64, **options)


def with_files(checkpoint, tmp_path, **files: str):
    """A copy of the checkpoint with extra files (name=text), e.g. chat_template.jinja."""
    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def pipe(monkeypatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def test_default_template_is_a_script_after_one_bos(checkpoint, tokenizer):
    template = load_chat_template(checkpoint)
    chat = make_chat(tokenizer, Scripted(tokenizer, "Bom dia."), template, system="Seja breve.")
    chat.reply("Olá")
    assert chat.messages == [{"role": "user", "content": "Olá"}, {"role": "assistant", "content": "Bom dia."}]
    text = "<|bos|>Seja breve.\nUsuário: Olá\nAssistente: Bom dia.\nUsuário: Quem é Capitu?\nAssistente:"
    assert template.render([*chat.system, *chat.messages, {"role": "user", "content": "Quem é Capitu?"}]) == text
    ids = chat.encode([{"role": "user", "content": "Olá"}])
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|bos|>Seja breve.\nUsuário: Olá\nAssistente:"


def test_replies_stop_at_the_next_user_line_and_at_eos_each_with_its_own_seed(checkpoint, tokenizer):
    generate = Scripted(tokenizer, "Bom dia.")
    chat = make_chat(tokenizer, generate, load_chat_template(checkpoint))
    chat.reply("Olá")
    chat.reply("Capitu?")
    assert DEFAULT_STOP == ("\nUsuário:",)
    assert [call["sampling"].stop for call in generate.calls] == [DEFAULT_STOP] * 2
    assert [call["eos"] for call in generate.calls] == [EOS_ID] * 2
    assert [call["sampling"].seed for call in generate.calls] == [0, 1]


def test_the_engine_ends_a_reply_at_a_stop_string_or_at_the_templates_eos(checkpoint, tmp_path):
    """A random model's draws, the same up to wherever the reply ends."""
    sampling = Sampling(16, temperature=1.0, top_k=None)
    chat = open_chat(checkpoint, sampling)
    full = chat.reply("Olá")
    stop = full[len(full) // 2 :][:2]
    assert open_chat(checkpoint, replace(sampling, stop=(stop,))).reply("Olá") == full[: full.index(stop)].strip()
    ids = engine.generate(load(checkpoint), [chat.encode(chat.messages[:1])], sampling, eos_id=EOS_ID)[0]
    end = ids.index(ids[4])
    config = {"eos_token": chat.tokenizer.id_to_token(ids[end])}  # the template says this token ends a turn
    folder = with_files(checkpoint, tmp_path, **{"tokenizer_config.json": json.dumps(config)})
    first = open_chat(checkpoint, replace(sampling, max_new_tokens=end)).reply("Olá")
    assert open_chat(folder, sampling).reply("Olá") == first != full


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_checkpoint_template_is_rendered_with_its_special_tokens(checkpoint, tokenizer, tmp_path, where):
    """ChatML, ended by its own end-of-turn token; chat_template.jinja wins over tokenizer_config.json."""
    config = {"eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ raise_exception('not this one') }}"}
    files = {"tokenizer_config.json": json.dumps(config)}
    files[where] = json.dumps({**config, "chat_template": CHATML}) if where == "tokenizer_config.json" else CHATML
    template = load_chat_template(with_files(checkpoint, tmp_path, **files))
    chatml = Tokenizer.from_str(tokenizer.to_str())
    chatml.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    generate = Scripted(chatml, "Bom dia.")
    chat = make_chat(chatml, generate, template, system="Seja breve.")
    assert chat.reply("Olá") == "Bom dia."
    call = generate.calls[0]
    assert (
        call["text"]
        == "<|im_start|>system\nSeja breve.<|im_end|>\n<|im_start|>user\nOlá<|im_end|>\n<|im_start|>assistant\n"
    )
    assert call["eos"] == chatml.token_to_id("<|im_end|>") and call["sampling"].stop == ()


@pytest.mark.parametrize(
    "files, message",
    [
        ({"chat_template.jinja": "{% for m in messages %}{{ m.content }}"}, "chat_template.jinja: chat template error"),
        ({"tokenizer_config.json": '{"chat_template": ["a", "b"]}'}, "chat_template must be a string"),
        ({"tokenizer_config.json": "{not json"}, "tokenizer_config.json is not valid JSON"),
        ({"tokenizer_config.json": '{"eos_token": 2}'}, "eos_token must be a string"),
    ],
)
def test_a_broken_template_is_a_clear_error(checkpoint, tmp_path, capsys, files, message):
    folder = with_files(checkpoint, tmp_path, **files)
    with pytest.raises(CheckpointError, match=message):
        load_chat_template(folder)
    assert main(["chat", str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_a_template_refusing_the_conversation_is_reported_in_the_repl(
    checkpoint, tokenizer, tmp_path, monkeypatch, capsys
):
    refusing = "{{ raise_exception('roles must alternate') }}"
    template = load_chat_template(with_files(checkpoint, tmp_path, **{"chat_template.jinja": refusing}))
    with pytest.raises(CheckpointError, match="roles must alternate"):
        template.render([{"role": "user", "content": "Olá"}])
    pipe(monkeypatch, "Olá\n")
    repl(make_chat(tokenizer, Scripted(tokenizer, "Bom dia."), template))
    assert "error: " in capsys.readouterr().out


def test_old_turns_are_dropped_to_fit_the_context_with_a_notice(checkpoint, tokenizer):
    """Room for 64 - 12 tokens of conversation: two short turns fit, a long reply pushes out two turns at once."""
    notices = []
    generate = Scripted(tokenizer, "Sim.", "Sim.", LONG_REPLY, "Sim.", "Sim.")
    template = load_chat_template(checkpoint)
    chat = make_chat(tokenizer, generate, template, max_new_tokens=12, system="Seja breve.", notice=notices.append)
    dropped = []
    for question in ("Olá", "Capitu?", "E ele?", "Onde?", "Sim?"):
        before = len(notices)
        chat.reply(question)
        dropped.append(notices[before:])
        call = generate.calls[-1]
        assert len(call["prompt"]) <= 64 - 12
        assert call["text"].startswith("<|bos|>Seja breve.\nUsuário: ") and call["text"].endswith(
            f"{question}\nAssistente:"
        )
    notice = "[{} earlier messages dropped to fit the model's context of 64 tokens]"
    assert dropped == [[], [], [notice.format(2)], [notice.format(4)], []]
    assert [m["content"] for m in chat.messages] == ["Onde?", "Sim.", "Sim?", "Sim."]


def test_a_message_longer_than_the_context_is_an_error_and_keeps_the_history(checkpoint, tokenizer):
    chat = make_chat(tokenizer, Scripted(tokenizer, "Bom dia."), load_chat_template(checkpoint))
    chat.reply("Olá")
    before = list(chat.messages)
    with pytest.raises(DataError, match="the message is too long.*context of 64 tokens"):
        chat.reply(TOO_LONG)
    assert chat.messages == before


def test_the_repl_through_a_pipe_clears_and_ends_at_sair(checkpoint, tokenizer, monkeypatch, capsys):
    generate = Scripted(tokenizer, "Bom dia.", "Uma\nmoça.\n")
    pipe(monkeypatch, "Olá\n\n  \n/limpar\nCapitu\n/ajuda\n/xyz\n/sair\nnunca lido\n")
    repl(make_chat(tokenizer, generate, load_chat_template(checkpoint)))
    out = capsys.readouterr().out
    assert "> Bom dia.\n" in out and "> [conversation cleared]\n" in out and "> Uma\nmoça.\n>" in out
    assert "/sair, /exit" in out and "unknown command /xyz" in out
    assert len(generate.calls) == 2 and "Olá" not in generate.calls[1]["text"]


def test_ctrl_c_stops_a_reply_and_the_repl_goes_on(checkpoint, tokenizer, monkeypatch, capsys):
    generate = Scripted(tokenizer, "Bom dia.", "Uma moça.", interrupt=(0,))
    chat = make_chat(tokenizer, generate, load_chat_template(checkpoint))
    pipe(monkeypatch, f"Olá\n{TOO_LONG}\nCapitu\n")  # Ctrl-C, then a message too long, then EOF
    repl(chat)
    out = capsys.readouterr().out
    assert "> Bom\n[reply stopped]\n" in out and "error: the message is too long" in out
    assert [m["content"] for m in chat.messages] == ["Olá", "Bom", "Capitu", "Uma moça."]
    assert "Assistente: Bom\n" in generate.calls[1]["text"]


def test_mistura_chat_talks_through_a_pipe(checkpoint, monkeypatch, capsys):
    pipe(monkeypatch, "Olá\n/limpar\nCapitu\n/sair\n")
    args = ["chat", str(checkpoint), "--temperatura", "0", "--max-novos-tokens", "4", "--sistema", "Seja breve."]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("> ") and out.endswith("\n> ") and out.count("\n> ") == 3
    assert "\n> [conversation cleared]\n> " in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperatura", "-1"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--max-novos-tokens", "0"], "max_new_tokens must be >= 1"),
        ([], "max_new_tokens (64) leaves no room"),
    ],
)
def test_bad_flags_are_a_clear_error(checkpoint, capsys, flags, message):
    assert main(["chat", str(checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_a_missing_checkpoint_or_a_malformed_flag_exits_with_2(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["chat", str(tmp_path), "--temperatura", "quente"])
    assert exit.value.code == 2


@pytest.mark.parametrize("encoding", [None, "utf-8:strict"], ids=["locale", "strict-utf-8"])
def test_mistura_chat_reports_a_line_that_is_not_utf8_and_goes_on(checkpoint, tmp_path, encoding):
    """Binary bytes on stdin (kept as lone surrogates by Python, or a decoding error under a strict locale):
    the line is reported and skipped, the lines around it are answered, no traceback, exit status 0."""
    import os
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "PYTHONIOENCODING"}
    if encoding is not None:
        env["PYTHONIOENCODING"] = encoding
    command = [sys.executable, "-c", "import sys; from mistura.cli import main; sys.exit(main())", "chat"]
    flags = ["--temperatura", "0", "--max-novos-tokens", "4"]
    done = subprocess.run(
        [*command, str(checkpoint), *flags],
        input="Olá\n".encode() + b"\xff\xfe\x00\x80 bin\xe1rio\n" + b"Capitu\n/sair\n",
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    out, err = done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and done.returncode == 0, err
    assert "> error: line 2 is not valid UTF-8 text (byte 0xff at character 1); skipped\n> " in out
    assert out.count("\n> ") == 3  # Olá answered, line 2 reported, Capitu answered, then /sair
    assert list(tmp_path.iterdir()) == []
