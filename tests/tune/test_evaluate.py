import pytest
import torch

import mistura
from mistura.cli import main
from mistura.data.tokenizer import EOS_ID
from mistura.errors import DataError
from mistura.infer import generate as text_generation
from mistura.infer.sampling import Sampling
from mistura.tune.config import FinetuneConfig
from mistura.tune.data import read_conversations
from mistura.tune.evaluate import score
from mistura.tune.sft import FineTuner
from mistura.tune.template import tuning_template


def scored(checkpoint, data):
    model, tokenizer = mistura.load(checkpoint), mistura.load_tokenizer(checkpoint)
    return score(model, tokenizer, tuning_template(checkpoint), read_conversations(data))


def test_fine_tuning_the_toy_task_takes_both_scores_to_one(base, toy, tmp_path, capsys):
    before = scored(base, toy)
    assert before.candidates == ("Capitu", "Machado") and before.chance == 0.5 and before.exact_match == 0.0
    train = {"out_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 40, "lr": 1e-2, "warmup_steps": 2}
    run = {"base": str(base), "data": {"train": str(toy), "val": str(toy)}, "train": train}
    FineTuner(FinetuneConfig.from_dict(run), log=lambda *a: None).fit(progress=False)
    after = scored(tmp_path / "run", toy)
    assert after.exact_match == after.ranking == 1.0  # "Capitu" and "Machado" end at different steps of a batch
    assert main(["finetune-eval", str(tmp_path / "run"), "--data", str(toy)]) == 0
    printed = capsys.readouterr().out
    assert "4 examples, 2 candidate answers: exact match 100.0%, ranking 100.0% (chance 50.0%)" in printed


def test_a_conversation_that_does_not_end_with_the_answer_cannot_be_scored(base, jsonl):
    messages = [{"role": "assistant", "content": "Oi"}, {"role": "user", "content": "E então?"}]
    data = jsonl("data.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match="line 1: the last message must be the assistant's answer"):
        scored(base, data)


def test_a_row_of_a_batch_that_ends_at_eos_takes_no_text_drawn_after_it(base, monkeypatch):
    tokenizer = mistura.load_tokenizer(base)
    short, long = tokenizer.encode(" Capitu").ids, tokenizer.encode(" Machado de Assis").ids
    rows = [short + [EOS_ID] + long, long + [EOS_ID]]  # the batch draws on for the first row after its eos

    def engine(model, prompts, sampling, eos_id, on_token):
        for step in range(max(map(len, rows))):
            on_token(torch.tensor([row[min(step, len(row) - 1)] for row in rows]))

    monkeypatch.setattr(text_generation, "generate", engine)
    texts = text_generation.generate_text(None, tokenizer, [[1], [1]], Sampling(temperature=0), eos_id=EOS_ID)
    assert texts == [" Capitu", " Machado de Assis"]
