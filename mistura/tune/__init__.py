"""Fine-tuning a trained checkpoint: supervised (SFT), and the losses of preference tuning and RL.

Every run builds on tuned.py (TunedLoop: a base checkpoint trained in full or with LoRA).
Supervised fine-tuning (`mistura finetune`): config.py (the run's YAML), data.py (JSONL
conversations), template.py (the chat template), encode.py (ids labelled on the assistant's
tokens), batches.py, tasks.py (a small Portuguese task from the corpus), evaluate.py, sft.py.

Preference tuning and RL, pure functions for the trainers to call:
- pairs.py: JSONL preference pairs (prompt, chosen, rejected), checked line by line, encoded as two examples.
- logprobs.py: per-token and per-sequence log-probs of the labels, entropies, KL estimators k1/k2/k3.
- masked.py: mean, variance, whitening over the real tokens of a padded batch; each row's last token.
- losses.py: the reward model's Bradley-Terry loss; DPO (sigmoid, cDPO, IPO) and SimPO.
- advantages.py: PPO's KL-shaped rewards and GAE, GRPO's group advantages, the KL controllers.
- policy.py: PPO's clipped policy and value losses and entropy bonus; GRPO's loss.
- rlaif.py: a critic's p(yes) / (p(yes) + p(no)) as a reward.
- reward_model.py: RewardModel (a Transformer with a scalar head on the last real token), ValueHead.
"""
