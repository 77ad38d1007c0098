import torch

from mistura.model import Transformer
from mistura.tune.reward_model import RewardModel, ValueHead


def model_and_batch(tiny, preset="llama-tiny"):
    torch.manual_seed(0)
    model = RewardModel(Transformer(tiny(preset))).eval()
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    return model, ids, mask


def test_hidden_states_are_what_the_lm_head_reads(tiny):
    torch.manual_seed(0)
    model = Transformer(tiny("gpt2-baseline-tiny")).eval()
    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(model.lm_head(model.hidden_states(ids)), model(ids))


def test_value_head_gives_a_scalar_per_token():
    assert ValueHead(32)(torch.randn(2, 5, 32)).shape == (2, 5)


def test_reward_is_the_score_at_the_last_real_token(tiny):
    model, ids, mask = model_and_batch(tiny)
    rewards = model(ids, mask)
    values = model.values(ids)
    assert rewards.shape == (2,) and values.shape == (2, 8)
    torch.testing.assert_close(rewards, torch.stack([values[0, 4], values[1, 7]]))


def test_padding_ids_do_not_change_the_reward_but_the_last_real_token_does(tiny):
    for preset in ("llama-tiny", "gpt2-baseline-tiny"):
        model, ids, mask = model_and_batch(tiny, preset)
        with torch.no_grad():
            reward = model(ids, mask)
            repadded = ids.clone()
            repadded[0, 5:] = torch.tensor([0, 50, 96])
            torch.testing.assert_close(model(repadded, mask), reward)
            changed = ids.clone()
            changed[0, 4] = (changed[0, 4] + 1) % 97
            assert model(changed, mask)[0] != reward[0]
            assert model(changed, mask)[1] == reward[1]


def test_gradient_reaches_the_backbone_and_the_head(tiny):
    model, ids, mask = model_and_batch(tiny)
    model.train()
    model(ids, mask).sum().backward()
    assert model.head.proj.weight.grad.abs().sum() > 0
    assert model.backbone.tok_emb.weight.grad.abs().sum() > 0
