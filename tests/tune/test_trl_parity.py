"""The losses against TRL's own code on the same log-probabilities, where TRL is installed.

TRL computes its losses inside trainer methods; each is called unbound on a stand-in for the trainer
that holds only the attributes the method reads, with a stand-in model that returns the given
log-probs. A TRL whose methods moved skips with the error it raised.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mistura.tune.advantages import group_advantages
from mistura.tune.logprobs import token_entropy, token_logprobs
from mistura.tune.losses import dpo_loss, reward_model_loss, simpo_loss
from mistura.tune.policy import grpo_loss

trl = pytest.importorskip("trl", reason="trl is not installed: no parity check against TRL's losses")
utils = pytest.importorskip("trl.trainer.utils")


class Accelerator:
    """A single process: gathers and reductions are the identity."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trainer(**attributes) -> SimpleNamespace:
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    base = dict(model=SimpleNamespace(training=True), accelerator=Accelerator(), _metrics=metrics)
    return SimpleNamespace(**base, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1, **attributes)


def call(method, *args, **kwargs):
    try:
        return method(*args, **kwargs)
    except (AttributeError, TypeError, KeyError) as error:
        pytest.skip(f"TRL {trl.__version__} moved what this test calls: {error!r}")


def logged(fake: SimpleNamespace) -> dict[str, float]:
    return {name: values[-1] for name, values in fake._metrics["train"].items()}


def random(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_token_logprobs_and_entropy_match_trl():
    logits, labels = random(2, 5, 11), torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5)
    torch.testing.assert_close(token_logprobs(logits, labels, mask), utils.selective_log_softmax(logits, labels))
    torch.testing.assert_close(token_entropy(logits, mask), utils.entropy_from_logits(logits))


def test_reward_model_loss_matches_trl_reward_trainer():
    chosen, rejected, margin = random(4, seed=2), random(4, seed=3), random(4, seed=4).abs()
    fake = trainer(args=SimpleNamespace(center_rewards_coefficient=0.01))
    inputs = {"attention_mask": torch.ones(8, 3, dtype=torch.long), "margin": margin}

    def model(**kwargs):
        return SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # (2B, 1)

    expected = call(trl.RewardTrainer.compute_loss, fake, model, inputs)
    loss, metrics = reward_model_loss(chosen, rejected, margin=margin, center_coef=0.01)
    torch.testing.assert_close(loss, expected)
    for name, value in logged(fake).items():
        if name != "num_tokens":
            assert metrics[name].item() == pytest.approx(value), name


def dpo_batch(pairs=3, length=7):
    """Per-token policy log-probs (2 pairs, length - 1) on the completions, and the reference's sums."""
    completion = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row, start, end in [(0, 2, 7), (1, 3, 5), (2, 1, 4), (3, 2, 4), (4, 3, 7), (5, 1, 2)]:
        completion[row, start:end] = 1
    logprobs = -random(2 * pairs, length - 1, seed=5).abs() * completion[:, 1:]
    return logprobs, -random(2 * pairs, seed=6).abs() * 4, completion


def trl_dpo(loss_type: str, beta: float):
    logprobs, ref, completion = dpo_batch()
    outputs = SimpleNamespace(
        log_probs=logprobs,
        entropy=torch.zeros_like(logprobs),
        mean_logits=torch.zeros_like(logprobs),
        is_top1=torch.zeros_like(logprobs, dtype=torch.bool),
    )
    fake = trainer(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        args=SimpleNamespace(),
    )
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {
        "input_ids": torch.zeros_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = call(trl.DPOTrainer._compute_loss, fake, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, logged(fake)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl_dpo_trainer(loss_type):
    expected, trl_metrics = trl_dpo(loss_type, beta=0.2)
    logprobs, ref, completion = dpo_batch()
    policy_chosen, policy_rejected = logprobs.sum(-1).chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    chosen_count, rejected_count = completion.sum(-1).float().chunk(2)
    loss, metrics = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.2, loss_type, 0.0, chosen_count, rejected_count
    )
    torch.testing.assert_close(loss, expected)
    for name, value in metrics.items():
        assert value.item() == pytest.approx(trl_metrics[name]), name


def cpo(loss_type: str, beta: float, label_smoothing: float, gamma: float = 0.0):
    """TRL's CPOTrainer.cpo_loss: a reference-free sigmoid loss on whatever log-probs it is given."""
    cpo_trainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
    fake = trainer(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=gamma)
    return lambda chosen, rejected: call(cpo_trainer.cpo_loss, fake, chosen, rejected)


def test_cdpo_matches_trl_label_smoothed_sigmoid():
    # CPO's sigmoid loss on the log-ratios pi - ref is cDPO; TRL's DPOTrainer sigmoid has no smoothing any more.
    pi_c, pi_r, ref_c, ref_r = (random(5, seed=s) for s in range(7, 11))
    losses, chosen_rewards, rejected_rewards = cpo("sigmoid", 0.1, 0.15)(pi_c - ref_c, pi_r - ref_r)
    loss, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=0.15)
    torch.testing.assert_close(loss, losses.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean())
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean())


def test_simpo_matches_trl_cpo_trainer():
    avg_c, avg_r = -random(5, seed=11).abs(), -random(5, seed=12).abs()
    losses, chosen_rewards, _ = cpo("simpo", 2.0, 0.0, gamma=0.8)(avg_c, avg_r)
    loss, metrics = simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.8)
    torch.testing.assert_close(loss, losses.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean())


def grpo_batch():
    logprobs = -random(4, 6, seed=13).abs()
    old = logprobs + 0.3 * random(4, 6, seed=14)  # ratios on both sides of the clip
    ref = logprobs + 0.5 * random(4, 6, seed=15)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:], mask[2, 2:], mask[3, 5:] = 0, 0, 0
    return logprobs, old, ref, mask, random(4, seed=16)


def trl_grpo(loss_type: str, beta: float):
    logprobs, old, ref, mask, advantages = grpo_batch()
    fake = trainer(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        max_completion_length=8,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(4, 2, dtype=torch.long),
        "prompt_mask": torch.ones(4, 2, dtype=torch.long),
        "completion_ids": torch.zeros(4, 6, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return call(trl.GRPOTrainer._compute_loss, fake, None, inputs), logged(fake)


@pytest.mark.parametrize(("ours", "theirs"), [("grpo", "grpo"), ("bnpo", "bnpo"), ("bnpo", "dapo"), ("dr_grpo",) * 2])
def test_grpo_loss_matches_trl_grpo_trainer(ours, theirs):
    expected, trl_metrics = trl_grpo(theirs, beta=0.04)
    logprobs, old, ref, mask, advantages = grpo_batch()
    loss, metrics = grpo_loss(
        logprobs, old, advantages, mask, ref, 0.04, 0.2, 0.28, loss_type=ours, max_completion_length=8
    )
    torch.testing.assert_close(loss, expected)
    assert metrics["clip_ratio/region_mean"] > 0
    for name, value in metrics.items():
        assert value.item() == pytest.approx(trl_metrics[name]), name


def test_group_advantages_use_trl_bessel_std():
    rewards = random(12, seed=17)
    std = utils.nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4)
    mean = rewards.view(-1, 4).mean(dim=1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(rewards, 4), (rewards - mean) / (std + 1e-4))
