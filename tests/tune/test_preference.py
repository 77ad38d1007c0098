import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mistura
from mistura.errors import CheckpointError, ConfigError
from mistura.train.loggers import read_metrics
from mistura.tune.batches import collate_pairs
from mistura.tune.config import DPOConfig, RewardModelConfig
from mistura.tune.preference import DPOTrainer, RewardModelTrainer
from mistura.tune.reward_model import load_reward_model, reply_rewards, score_texts
from mistura.tune.template import tuning_template
from tests.tune.conftest import PAIRS, QUICK_TRAIN, QUIET


def run_config(kind, base, pairs, out_dir, section=None, method="full", **train):
    sections = {"dpo": section} if kind is DPOConfig else {"reward": section}
    return kind.from_dict(
        {
            "base": str(base),
            "method": method,
            "data": {"train": str(pairs), "val": str(pairs)},
            "lora": {"rank": 4, "alpha": 8},
            "train": {"out_dir": str(out_dir), **QUICK_TRAIN, **train},
            **{key: value for key, value in sections.items() if value is not None},
        }
    )


def reward_model(base, pairs, out_dir, resume=False, **options):
    trainer = RewardModelTrainer(run_config(RewardModelConfig, base, pairs, out_dir, **options), **QUIET)
    return trainer, trainer.fit(resume=resume, progress=False)


def dpo(base, pairs, out_dir, resume=False, section=None, **options):
    trainer = DPOTrainer(run_config(DPOConfig, base, pairs, out_dir, section, **options), **QUIET)
    return trainer, trainer.fit(resume=resume, progress=False)


def evaluations(out_dir, key):
    return [record[key] for record in read_metrics(out_dir) if key in record]


def records(out_dir):
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"} for r in read_metrics(out_dir)]


def test_a_reward_model_learns_to_rank_the_held_out_pairs(base, pairs, tmp_path):
    trainer, summary = reward_model(base, pairs, tmp_path / "rm", max_steps=24)
    accuracy = evaluations(trainer.out_dir, "val_accuracy")
    losses = evaluations(trainer.out_dir, "val_loss")
    assert accuracy[-1] == 1.0 and losses[-1] < losses[0] / 2
    train_records = [r for r in read_metrics(trainer.out_dir) if "loss" in r]
    assert {"accuracy", "margin", "mean_reward"} <= set(train_records[-1])
    assert summary["val_accuracy"] == 1.0 and "val_ppl" not in summary


def test_a_reward_model_checkpoint_scores_replies_as_training_did(base, pairs, tmp_path):
    trainer, _ = reward_model(base, pairs, tmp_path / "rm")
    checkpoint = trainer.out_dir / "checkpoints" / "step-0000012"
    assert (checkpoint / "reward_head.safetensors").is_file()
    loaded = load_reward_model(trainer.out_dir)
    template, tokenizer = tuning_template(checkpoint), mistura.load_tokenizer(checkpoint)
    scores = score_texts(loaded, tokenizer, template, [p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS])
    with torch.no_grad():
        expected = reply_rewards(trainer.model.eval(), *collate_pairs(trainer.val_pairs, shift=False))[:4]
    torch.testing.assert_close(scores, expected)
    assert isinstance(mistura.load(checkpoint), mistura.Transformer)  # the backbone alone, as a language model


def test_a_checkpoint_without_a_head_is_not_a_reward_model(base):
    with pytest.raises(CheckpointError, match="no reward_head.safetensors: not a reward model"):
        load_reward_model(base)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_resumed_reward_model_continues_the_uninterrupted_one(base, pairs, tmp_path, method):
    full, _ = reward_model(base, pairs, tmp_path / "full", method=method)
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000012")
    resumed, _ = reward_model(base, pairs, tmp_path / "cut", resume=True, method=method)
    assert records(resumed.out_dir) == records(full.out_dir)
    final = "checkpoints/step-0000012/reward_head.safetensors"
    a, b = load_file(full.out_dir / final), load_file(resumed.out_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_starts_at_log_2_and_raises_the_chosen_replies_margin(base, pairs, tmp_path):
    trainer, summary = dpo(base, pairs, tmp_path / "dpo", section={"beta": 0.5}, max_steps=24)
    first = read_metrics(trainer.out_dir)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference at step 0
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert summary["val_rewards/accuracies"] == 1.0 and summary["val_rewards/margins"] > 0.5
    assert summary["val_loss"] < math.log(2) / 2
    reference = mistura.load(base)
    x, _ = collate_pairs(trainer.val_pairs)
    with torch.no_grad():
        assert torch.equal(trainer.reference(x), reference(x))  # the reference never moved
        assert not torch.equal(mistura.load(trainer.out_dir)(x), reference(x))


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_the_dpo_variants_learn_the_pairs(base, pairs, tmp_path, loss):
    section = {"loss": loss, "beta": 2.0 if loss == "simpo" else 0.5}
    trainer, summary = dpo(base, pairs, tmp_path / loss, section=section, max_steps=24)
    assert (trainer.reference is None) == (loss == "simpo")
    assert summary["val_rewards/accuracies"] == 1.0
    losses = evaluations(trainer.out_dir, "val_loss")
    assert losses[-1] < losses[0]


def test_a_resumed_lora_dpo_continues_the_uninterrupted_one(base, pairs, tmp_path):
    full, _ = dpo(base, pairs, tmp_path / "full", method="lora")
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000012")
    resumed, _ = dpo(base, pairs, tmp_path / "cut", resume=True, method="lora")
    assert records(resumed.out_dir) == records(full.out_dir)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"beta": 0}, "dpo.beta must be > 0"),
        ({"label_smoothing": 0.5}, r"dpo.label_smoothing must be in \[0, 0.5\)"),
        ({"loss": "kto"}, "dpo.loss"),
        ({"betta": 0.1}, "did you mean 'beta'"),
    ],
)
def test_bad_dpo_settings_are_named(base, pairs, tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        run_config(DPOConfig, base, pairs, tmp_path, section)


def test_a_preference_run_without_data_or_base_says_what_to_give(base, tmp_path):
    with pytest.raises(ConfigError, match="no training data"):
        DPOConfig.from_dict({"base": str(base)})
    with pytest.raises(ConfigError, match=r"mistura reward-model CKPT"):
        RewardModelConfig.from_dict({"data": {"train": "x.jsonl"}})
    with pytest.raises(ConfigError, match="unknown section"):
        DPOConfig.from_dict({"base": str(base), "reward": {}})
