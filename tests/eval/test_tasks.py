"""mistura's own lm-evaluation-harness task, machado_cloze: questions drawn from the held-out works, found by
`mistura eval --tasks` with no include path, and answered visibly above chance by a model trained for seconds."""

import json
from collections import Counter

import pytest

from mistura.cli import main
from mistura.data.corpus import load_machado, split_documents
from mistura.data.prepare import prepare
from mistura.eval.tasks.machado import GAP_AT, WORD, band, make_questions
from mistura.train.config import RunConfig
from mistura.train.trainer import Trainer

TRAINING_CHARS = 1_500_000  # stories and novels of the training works: enough for a tiny model to learn some syntax


@pytest.fixture(scope="module")
def corpus():
    return split_documents(load_machado())


def test_questions_come_from_the_held_out_works(corpus):
    train, held_out = corpus
    texts = {doc.name: doc.text for doc in held_out}
    counts = Counter(word for text in texts.values() for word in WORD.findall(text))
    questions = make_questions(60, seed=5)
    assert len(questions) == 60 and questions == make_questions(60, seed=5)
    assert {q["obra"] for q in questions} <= set(texts) and not {q["obra"] for q in questions} & {d.name for d in train}
    for q in questions:
        options, answer = q["opcoes"], q["opcoes"][q["resposta"]]
        assert len(set(options)) == 4 and all(WORD.fullmatch(option) for option in options)
        assert any(p.startswith(q["contexto"] + " " + answer) for p in texts[q["obra"]].split("\n"))
        assert GAP_AT[0] <= len(q["contexto"]) + 1 < GAP_AT[1]  # the gap starts after the context and a space
        assert len({band(counts[option]) for option in options}) == 1  # as common as the answer: within a power of 2
    assert len({q["resposta"] for q in questions}) == 4  # the answer is not always in the same place


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 0.2M-parameter Llama trained for 800 steps (about half a minute) on 1.5 MB of the training works."""
    train, _ = corpus
    root = tmp_path_factory.mktemp("cloze")
    folder, total = root / "corpus", 0
    folder.mkdir()
    for i, doc in enumerate(d for d in train if d.genre in ("conto", "romance")):
        (folder / f"{i}.txt").write_text(doc.text, encoding="utf-8")
        total += len(doc.text)
        if total > TRAINING_CHARS:
            break
    prepare(str(folder), root / "data", vocab_size=2048, val_fraction=0.05, seed=0, log=lambda *a: None)
    model = {"preset": "llama-tiny", "n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "d_ff": 128}
    run = RunConfig.from_dict(
        {
            "model": {**model, "max_seq_len": 64},
            "data": {"source": "unused", "dir": str(root / "data"), "vocab_size": 2048},
            "train": {
                "batch_size": 16,
                "max_steps": 800,
                "warmup_steps": 10,
                "lr": 1e-2,
                "eval_interval": 800,
                "eval_batches": 2,
                "log_interval": 100,
                "checkpoint_interval": 800,
                "out_dir": str(root / "run"),
            },
        }
    )
    return Trainer(run).fit(progress=False)["checkpoint"]


def test_a_model_trained_for_seconds_scores_above_chance(trained, tmp_path, capsys):
    output = tmp_path / "cloze.json"
    args = ["eval", trained, "--tasks", "machado_cloze", "--limit", "200", "--output", str(output), "--no-progress"]
    assert main(args) == 0  # no --include-path: mistura's own tasks are always found
    result = json.loads(output.read_text())["results"]["machado_cloze"]
    assert "machado_cloze" in capsys.readouterr().out
    assert result["acc,none"] > 0.25 + 2 * result["acc_stderr,none"]  # chance is 0.25; this model reaches about 0.4
