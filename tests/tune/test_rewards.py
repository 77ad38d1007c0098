import math

import numpy as np
import pytest
import torch

import mistura
from mistura.checkpoint import save_model
from mistura.config import ModelConfig
from mistura.errors import CheckpointError, ConfigError, DataError
from mistura.model import Transformer
from mistura.tune import rewards
from mistura.tune.batches import collate_pairs
from mistura.tune.config import RewardModelConfig
from mistura.tune.preference import RewardModelTrainer
from mistura.tune.reward_model import load_reward_model, reply_rewards, score_texts
from mistura.tune.rewards import CRITIC_QUESTION, CriticReward, FunctionReward, load_reward
from mistura.tune.template import tuning_template
from tests.tune.conftest import PAIRS


def scores(spec, completions, **columns):
    return load_reward(spec)(["?"] * len(completions), completions, **columns).tolist()


# ---- built-ins


def test_ends_sentence_reads_the_last_mark_past_quotes_brackets_and_spaces():
    replies = {
        "Capitu tinha olhos de cigana.": 1.0,
        "Quem é Capitu?": 1.0,
        "Bom dia!": 1.0,
        "E então…": 1.0,
        'Ele disse "adeus."': 1.0,
        "Ela disse «adeus.»": 1.0,
        "(Fim.)": 1.0,
        "Fim.  \n": 1.0,
        "Capitu tinha olh": 0.0,
        "Fim. E depois": 0.0,
        '"Fim"': 0.0,
        "": 0.0,
    }
    assert scores("ends_sentence", list(replies)) == list(replies.values())


def test_contains_matches_the_whole_word_in_any_case():
    replies = {
        "Capitu tinha olhos": 1.0,
        "e capitu!": 1.0,
        "(CAPITU)": 1.0,
        "Capitulo três": 0.0,
        "ACapitu": 0.0,
        "sem nome": 0.0,
    }
    assert scores("contains:Capitu", list(replies)) == list(replies.values())


def test_length_gives_one_inside_and_decays_outside():
    replies = ["um", "um dois", "um dois três", "um dois três quatro cinco", "1 2 3 4 5 6 7", ""]
    expected = [
        math.exp(-3 * 2 / 3),  # 2 words short of 3
        math.exp(-3 * 1 / 3),
        1.0,
        1.0,
        math.exp(-3 * 2 / 5),  # 2 words over 5
        math.exp(-3.0),  # 3 short of 3: the whole bound
    ]
    assert scores("length:3-5", replies) == pytest.approx([0.1353353, 0.3678794, 1, 1, 0.3011942, 0.0497871])
    assert scores("length: 3 - 5", replies) == pytest.approx(expected)
    assert scores("length:0-0", ["", "um"]) == pytest.approx([1.0, math.exp(-3.0)])  # a bound of 0 counts as 1


def test_no_repeat_is_the_share_of_distinct_words():
    replies = ["um dois três", "Capitu capitu", "o, o. o!", "a a b b", ""]
    assert scores("no_repeat", replies) == pytest.approx([1.0, 0.5, 1 / 3, 0.5, 0.0])


def test_a_reward_is_float32_of_one_value_per_reply():
    result = load_reward("ends_sentence")(["a", "b", "c"], ["Fim.", "fim", "Fim!"])
    assert result.dtype == torch.float32 and result.shape == (3,) and result.device.type == "cpu"
    assert load_reward("no_repeat")([], []).shape == (0,)


def test_prompts_and_replies_of_different_counts_are_refused():
    with pytest.raises(DataError, match="no_repeat got 1 prompts for 2 replies"):
        load_reward("no_repeat")(["a"], ["b", "c"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "bogus",
            r"unknown reward 'bogus': give a built-in \(ends_sentence, .*length:MIN-MAX, exact:COLUMN\), module:",
        ),
        ("contains:", "names no word: write contains:WORD"),
        ("contains:  ", "names no word"),
        ("contains", "needs a parameter: write contains:WORD"),
        ("length:9-3", "needs length:MIN-MAX, whole numbers with MIN <= MAX"),
        ("length:abc", "needs length:MIN-MAX"),
        ("length:3", "needs length:MIN-MAX"),
        ("length", "needs a parameter: write length:MIN-MAX"),
        ("ends_sentence:x", "'ends_sentence:x' takes no parameter: write ends_sentence"),
        ("no_repeat:", "takes no parameter: write no_repeat"),
        ("model:", "unknown reward 'model:'"),
        ("mistura_no_such_module:score", "cannot import mistura_no_such_module: ModuleNotFoundError"),
        ("math:no_such_function", "math has no function 'no_such_function'"),
        ("math:pi", "math has no function 'pi'"),  # there, but not callable
    ],
)
def test_malformed_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_reward(spec)


# ---- a user's function


SCORING = """
from dataclasses import dataclass


@dataclass
class Weights:
    prompt: float = 100.0


def score(*, prompts, completions, answer):
    return [Weights().prompt * len(p) + len(c) + a for p, c, a in zip(prompts, completions, answer)]
"""


def test_a_function_in_a_file_is_called_as_trl_calls_one(tmp_path):
    path = tmp_path / "scoring.py"
    path.write_text("from __future__ import annotations\n" + SCORING, encoding="utf-8")
    reward = load_reward(f"{path}:score")
    assert isinstance(reward, FunctionReward) and reward.name == f"{path}:score"
    assert reward(["ab", "c"], ["xyz", ""], answer=[0.5, 2]).tolist() == [203.5, 102.0]  # keywords only
    with pytest.raises(DataError, match=r"scoring.py:score raised TypeError: .*'answer'"):
        reward(["ab"], ["xyz"])  # a column the function needs is missing


def test_a_function_of_an_importable_module_is_found_by_its_dotted_name(tmp_path, monkeypatch):
    package = tmp_path / "mistura_test_rewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "scoring.py").write_text(SCORING, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("mistura_test_rewards_pkg.scoring:score")
    assert reward(["ab"], ["xyz"], answer=[1]).tolist() == [204.0]


def test_a_file_that_does_not_import_or_lacks_the_function_is_a_config_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def score(:\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cannot import .*broken.py: SyntaxError"):
        load_reward(f"{broken}:score")
    with pytest.raises(ConfigError, match=r"cannot import .*missing.py: FileNotFoundError"):
        load_reward(f"{tmp_path / 'missing.py'}:score")
    other = tmp_path / "other.py"
    other.write_text("def grade(prompts, completions):\n    return [1.0] * len(completions)\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"other.py has no function 'score'"):
        load_reward(f"{other}:score")


def returning(value):
    return FunctionReward("mine", lambda prompts, completions: value)


def fail(prompts, completions):
    raise ValueError("no answer column")


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (FunctionReward("mine", fail), "the reward mine raised ValueError: no answer column"),
        (returning([1.0, math.nan]), "gave nan for reply 1: rewards must be finite"),
        (returning([math.inf, 0.0]), "gave inf for reply 0"),
        (returning(np.array([0.0, -np.inf])), "gave -inf for reply 1"),
        (returning([0.0, 1e300]), "gave 1e[+]300 for reply 1"),  # finite in Python, inf in float32
        (returning([0.0, 10**400]), "gave inf for reply 1"),  # too large even for a Python float
        (returning([1.0]), "returned 1 values for 2 replies"),
        (returning([1.0, 2.0, 3.0]), "returned 3 values for 2 replies"),
        (returning("12"), "returned a str, not a sequence of numbers"),
        (returning(0.5), "returned a float, not a sequence of numbers"),
        (returning(x for x in [1.0, 2.0]), "returned a generator"),
        (returning(np.zeros((2, 1))), r"returned an array of shape \(2, 1\), not \(2,\)"),
        (returning(torch.tensor(1.0)), r"returned an array of shape \(\), not \(2,\)"),
        (returning([1.0, "0.5"]), "gave '0.5' for reply 1, not a real number"),
        (returning([None, 1.0]), "gave None for reply 0, not a real number"),
    ],
    ids=["raises", "nan", "inf", "-inf", "float32-inf", "huge-int", "short", "long", "str", "float", "generator"]
    + ["2-d", "0-d", "str-element", "none-element"],
)
def test_a_bad_result_is_a_data_error_naming_what_and_where(reward, message):
    with pytest.raises(DataError, match=message):
        reward(["p", "q"], ["a", "b"])


@pytest.mark.parametrize(
    "value",
    [
        [0.5, -2],
        (0.5, -2),
        np.array([0.5, -2.0]),
        np.array([0.5, -2.0], dtype=np.float16),
        [np.float32(0.5), np.int64(-2)],
        torch.tensor([0.5, -2.0], dtype=torch.float64, requires_grad=True),
    ],
    ids=["list", "tuple", "array", "float16-array", "numpy-scalars", "tensor"],
)
def test_lists_arrays_and_tensors_of_numbers_are_accepted(value):
    result = returning(value)(["p", "q"], ["a", "b"])
    assert result.dtype == torch.float32 and result.shape == (2,)
    assert result.tolist() == [0.5, -2.0]


# ---- model:PATH


def test_a_reward_model_scores_pairs_as_its_training_did(base, pairs, tmp_path):
    train = {"batch_size": 4, "max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "eval_interval": 3}
    train |= {"eval_batches": 1, "log_interval": 1, "checkpoint_interval": 3, "out_dir": str(tmp_path / "rm")}
    config = RewardModelConfig.from_dict(
        {"base": str(base), "data": {"train": str(pairs), "val": str(pairs)}, "train": train}
    )
    trainer = RewardModelTrainer(config, log=lambda *a: None)
    trainer.fit(progress=False)
    reward = load_reward(f"model:{trainer.out_dir}")
    prompts = [p["prompt"] for p in PAIRS] * 2
    replies = [p["chosen"] for p in PAIRS] + [p["rejected"] for p in PAIRS]
    result = reward(prompts, replies)
    model, tokenizer = load_reward_model(trainer.out_dir), mistura.load_tokenizer(trainer.out_dir)
    torch.testing.assert_close(
        result, score_texts(model, tokenizer, tuning_template(trainer.out_dir), prompts, replies)
    )
    with torch.no_grad():  # the trained model in memory, on the pairs as training collated them
        expected = reply_rewards(trainer.model.eval(), *collate_pairs(trainer.val_pairs, shift=False))
    torch.testing.assert_close(result, expected.float())
    assert len(set(result.tolist())) == len(replies)


def test_a_checkpoint_without_a_head_is_not_a_reward_model(base):
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward(f"model:{base}")


# ---- critic:PATH

# The tiny base tokenizer writes none of the answers (" sim", " não", ...) as one token: a critic needs one.
# The tests ask it with answers that are single tokens of it, two spellings for no.
CRITIC_YES, CRITIC_NO = (" de",), (" o", " é")
ROWS = [
    ("Quem tinha olhos de cigana?", "Capitu."),
    ("Quem escreveu Dom Casmurro?", "Machado de Assis, no Rio de Janeiro."),
    ("Como era a cidade?", "outra"),
    ("E o amor?", "O amor é uma planta que cresce devagar."),
    ("Bom dia.", ""),
]


@pytest.fixture(scope="module")
def critic(base, tmp_path_factory):
    """A critic with base's tokenizer and a 256-token context, where no question of ROWS is cut: base's 64
    positions cut them all (the question about an empty reply to an empty prompt is 70 tokens of this tokenizer)."""
    vocab_size = mistura.load_tokenizer(base).get_vocab_size()
    config = ModelConfig.from_name(
        "llama-tiny", vocab_size=vocab_size, max_seq_len=256, n_layer=1, d_model=32, n_head=4, d_ff=64
    )
    torch.manual_seed(1)
    return save_model(tmp_path_factory.mktemp("critic") / "ckpt", Transformer(config), base / "tokenizer.json")


@pytest.fixture
def critic_answers(monkeypatch):
    monkeypatch.setattr(rewards, "YES", CRITIC_YES)
    monkeypatch.setattr(rewards, "NO", CRITIC_NO)


def critic_scores(path, batch_size, rows=ROWS):
    reward = CriticReward(f"critic:{path}", str(path), "cpu", batch_size=batch_size)
    return reward([prompt for prompt, _ in rows], [reply for _, reply in rows])


def question_ids(path, prompt, reply):
    """The tokens of the question the critic is asked, whole."""
    question = CRITIC_QUESTION.format(prompt=prompt, completion=reply)
    text = tuning_template(path).render([{"role": "user", "content": question}], add_generation_prompt=True)
    assert text.endswith("Responda sim ou não.\nAssistente:")
    return mistura.load_tokenizer(path).encode(text, add_special_tokens=False).ids


def by_hand(path, ids):
    """p(yes) / (p(yes) + p(no)) of the critic's softmax after `ids`, the answers' spellings summed."""
    tokenizer, model = mistura.load_tokenizer(path), mistura.load(path)
    with torch.no_grad():
        probabilities = model(torch.tensor([ids]))[0, -1].softmax(-1)
    answers = [
        [tokenizer.encode(s, add_special_tokens=False).ids for s in spellings] for spellings in (CRITIC_YES, CRITIC_NO)
    ]
    assert all(len(ids) == 1 for spellings in answers for ids in spellings)
    p_yes, p_no = (sum(probabilities[ids[0]] for ids in spellings).item() for spellings in answers)
    return p_yes / (p_yes + p_no)


def test_a_critic_needs_an_answer_that_is_one_token(base):
    with pytest.raises(ConfigError, match="none of the answers .* is a single token"):
        load_reward(f"critic:{base}")


def test_the_critic_reward_is_its_probability_of_yes_over_the_answers(critic, critic_answers):
    result = critic_scores(critic, batch_size=3)
    assert result.dtype == torch.float32 and result.shape == (len(ROWS),)
    assert ((result > 0) & (result < 1)).all() and len(set(result.tolist())) == len(ROWS)
    rows = [question_ids(critic, prompt, reply) for prompt, reply in ROWS]
    assert len({len(ids) for ids in rows}) == len(ROWS) and max(map(len, rows)) <= 256  # padded, none cut
    assert result.tolist() == pytest.approx([by_hand(critic, ids) for ids in rows], abs=1e-6)


@pytest.mark.parametrize("context", [64, 256])
def test_the_critic_reward_does_not_depend_on_the_batch_size(base, critic, critic_answers, context):
    path = base if context == 64 else critic
    one, three = critic_scores(path, batch_size=1), critic_scores(path, batch_size=3)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)
    assert critic_scores(path, batch_size=3, rows=[]).shape == (0,)


def test_a_question_longer_than_the_critic_context_loses_its_start(base, critic_answers):
    end = " Capitu tinha olhos de cigana." * 20
    rows = [("Bom dia." * 40 + end, "Capitu."), ("Quem escreveu?" * 40 + end, "Capitu.")]
    ids = question_ids(base, *rows[0])
    assert len(ids) > 3 * 64  # three times what the model accepts
    result = critic_scores(base, batch_size=2, rows=rows)
    assert result[0] == result[1]  # what the context holds, the end, is the same
    assert result[0].item() == pytest.approx(by_hand(base, ids[-64:]), abs=1e-6)


def test_exact_compares_each_reply_with_its_prompts_column():
    reward = load_reward("exact:answer")
    replies = [" Dom  Casmurro\n", "dom casmurro", "Dom Casmurro!", "Quincas Borba"]
    scores = reward(["p"] * 4, replies, answer=["Dom Casmurro"] * 3 + ["Dom Casmurro"])
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("columns", "message"),
    [({}, "needs a 'answer' key on the lines"), ({"answer": ["x", None]}, "reply 1 has no 'answer' string")],
)
def test_exact_without_its_column_names_it(columns, message):
    with pytest.raises(DataError, match=message):
        load_reward("exact:answer")(["p", "q"], ["x", "y"], **columns)


def test_exact_needs_a_column():
    with pytest.raises(ConfigError, match="names no column: write exact:COLUMN"):
        load_reward("exact: ")
