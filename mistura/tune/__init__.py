"""Post-training a trained checkpoint: supervised fine-tuning, a reward model, DPO, and RL (PPO, GRPO).

Every run builds on tuned.py (TunedLoop: a base checkpoint trained in full or with LoRA, in the loop
of mistura.train.loop) and reads its YAML through config.py (one config class per command).

Supervised fine-tuning (`mistura finetune`): data.py (JSONL conversations), template.py (the chat
template), encode.py (ids labelled on the assistant's tokens), batches.py, tasks.py (small Portuguese
task sets from the corpus: machado-obras, machado-pares), evaluate.py, sft.py.

Preferences (`mistura reward-model`, `mistura dpo`): pairs.py (JSONL prompt/chosen/rejected),
reward_model.py (a Transformer with a scalar head; HeadedModel, which PPO's policy shares),
preference.py (the two trainers).

Reinforcement learning (`mistura rl`): prompts.py (JSONL prompts and their columns), rewards.py
(verifiable built-ins, module:function, a reward model, an RLAIF critic), rl.py (PPO and GRPO:
rollouts, advantages, updates), plots.py (reward against KL).

The losses, as pure functions checked against hand computations and TRL's own code:
- logprobs.py: per-token and per-sequence log-probs of the labels, entropies, KL estimators k1/k2/k3.
- masked.py: mean, variance, whitening over the real tokens of a padded batch; each row's last token.
- losses.py: the reward model's Bradley-Terry loss; DPO (sigmoid, cDPO, IPO) and SimPO.
- advantages.py: PPO's KL-shaped rewards and GAE, GRPO's group advantages, the KL controllers.
- policy.py: PPO's clipped policy and value losses and entropy bonus; GRPO's loss.
- rlaif.py: a critic's p(yes) / (p(yes) + p(no)) as a reward.
"""
