"""Alignment: `mistura reward-model` trains a reward model on preference pairs, `mistura dpo` tunes a
checkpoint on them directly (DPO, IPO or SimPO), and `mistura rl` tunes it by reinforcement learning
(PPO or GRPO) on prompts and a reward: a reward model, a Python function or a critic checkpoint.
"""

from __future__ import annotations

import argparse

from mistura.cli.options import add_tuning_options, fit_tuning

PROMPTS = '{"prompt": ...} lines, other keys handed to the reward (a pairs or SFT file works too)'
REWARD = (
    "rl.reward: exact:COLUMN, ends_sentence, contains:WORD, length:MIN-MAX, no_repeat, module:function (a .py "
    "file's path or an importable module), model:PATH (a reward model) or critic:PATH (RLAIF: a model asked yes "
    "or no)"
)
PAIRS = '{"prompt", "chosen", "rejected"} pairs (mistura finetune-data machado-pares writes some)'


def register(sub: argparse._SubParsersAction) -> None:
    """Add `reward-model`, `dpo` and `rl` to the subcommands."""
    p = sub.add_parser("reward-model", help="train a reward model (a scalar head) on preference pairs")
    add_tuning_options(p, PAIRS, "configs/preference/reward-model.yaml")
    p.set_defaults(func=cmd_reward_model)

    p = sub.add_parser("dpo", help="tune a checkpoint on preference pairs: DPO, IPO or SimPO")
    add_tuning_options(p, PAIRS, "configs/preference/dpo.yaml")
    p.add_argument("--loss", choices=("sigmoid", "ipo", "simpo"), help="dpo.loss (default: sigmoid, DPO's)")
    p.add_argument("--beta", type=float, help="dpo.beta (default: 0.1)")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("rl", help="tune a checkpoint by reinforcement learning on prompts and a reward: PPO or GRPO")
    add_tuning_options(p, PROMPTS, "configs/rl/grpo-casa.yaml")
    p.add_argument("--algorithm", "--algoritmo", choices=("ppo", "grpo"), help="rl.algorithm (default: ppo)")
    p.add_argument("--reward", "--recompensa", metavar="SPEC", help=REWARD)
    p.set_defaults(func=cmd_rl)


def cmd_reward_model(args: argparse.Namespace) -> None:
    from mistura.tune.config import RewardModelConfig
    from mistura.tune.preference import RewardModelTrainer

    summary = fit_tuning(args, RewardModelConfig, RewardModelTrainer)
    print(
        f"\ndone: {summary['steps']} steps in {summary['wall_s']:.0f}s | held-out pairs ranked right "
        f"{summary['val_accuracy']:.1%} (loss {summary['val_loss']:.3f}) | reward model {summary['checkpoint']}"
    )
    print(f"use it as a reward with: mistura rl CKPT --data PROMPTS.jsonl --reward model:{summary['checkpoint']}")


def cmd_dpo(args: argparse.Namespace) -> None:
    from mistura.tune.config import DPOConfig
    from mistura.tune.preference import DPOTrainer

    summary = fit_tuning(args, DPOConfig, DPOTrainer, {"dpo": {"loss": args.loss, "beta": args.beta}})
    print(
        f"\ndone: {summary['steps']} steps in {summary['wall_s']:.0f}s | held-out pairs preferred "
        f"{summary['val_rewards/accuracies']:.1%}, reward margin {summary['val_rewards/margins']:.3f} | "
        f"checkpoint {summary['checkpoint']}"
    )


def cmd_rl(args: argparse.Namespace) -> None:
    from mistura.tune.config import RLConfig
    from mistura.tune.rl import RLTrainer

    summary = fit_tuning(args, RLConfig, RLTrainer, {"rl": {"algorithm": args.algorithm, "reward": args.reward}})
    print(
        f"\ndone: {summary['steps']} steps in {summary['wall_s']:.0f}s | held-out reward {summary['val_reward']:.3f} "
        f"(best {summary['best_val_reward']:.3f}), KL to the base {summary['val_kl']:.2f} nats per reply | "
        f"checkpoint {summary['checkpoint']}"
    )
    print(f"reward against KL: {summary['plot']}")
