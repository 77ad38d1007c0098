import shutil

import pytest
import torch
from safetensors.torch import load_file

import mistura
from mistura.errors import ConfigError
from mistura.quant import QuantConfig, quantize_checkpoint
from mistura.train.loggers import read_metrics
from mistura.tune.batches import collate
from mistura.tune.config import FinetuneConfig
from mistura.tune.data import Conversation
from mistura.tune.sft import FineTuner
from mistura.tune.template import SCRIPT_WITH_EOS, tuning_template
from tests.tune.conftest import QUICK_TRAIN

QUESTION = {"role": "user", "content": "Quem é Capitu?"}
REPLY = {"role": "assistant", "content": "Capitu tinha olhos de cigana."}


def config(base, toy, out_dir, method="full", **train):
    return FinetuneConfig.from_dict(
        {
            "base": str(base),
            "method": method,
            "data": {"train": str(toy), "val": str(toy)},
            "lora": {"rank": 4, "alpha": 8},
            "train": {"out_dir": str(out_dir), **QUICK_TRAIN, **train},
        }
    )


def fine_tune(base, toy, out_dir, resume=False, **options):
    tuner = FineTuner(config(base, toy, out_dir, **options), log=lambda *a: None)
    return tuner, tuner.fit(resume=resume, progress=False)


def losses(out_dir):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out_dir)]


def loss_of(tuner, *messages) -> float:
    """The fine-tuning loss of one conversation, as a training batch gives it."""
    example = tuner.encoder.encode(Conversation(messages, "test"))
    with torch.no_grad():
        return tuner.loss(tuner.model.eval(), collate([example]), 0.0)[0].item()


def test_the_loss_moves_with_the_assistants_tokens_only(base, toy, tmp_path):
    tuner = FineTuner(config(base, toy, tmp_path / "run"), log=lambda *a: None)
    before = loss_of(tuner, QUESTION, REPLY, {"role": "user", "content": "E o amor?"})
    # Another user message after the reply, of other tokens and another length: not learnt, the loss stays.
    assert loss_of(tuner, QUESTION, REPLY, {"role": "user", "content": "Naquele tempo"}) == (
        pytest.approx(before, abs=1e-6)
    )
    other_reply = {"role": "assistant", "content": "Capitu tinha olhos de ressaca."}
    assert loss_of(tuner, QUESTION, other_reply, {"role": "user", "content": "E o amor?"}) != pytest.approx(before)


def test_a_full_fine_tune_learns_and_saves_a_chat_ready_checkpoint(base, toy, tmp_path):
    tuner, summary = fine_tune(base, toy, tmp_path / "run", max_steps=24)
    evals = [r["val_loss"] for r in read_metrics(tuner.out_dir) if "val_loss" in r]
    assert evals[-1] < evals[0] / 2
    checkpoint = tuner.out_dir / "checkpoints" / "step-0000024"
    assert summary["checkpoint"] == str(checkpoint)
    assert (checkpoint / "chat_template.jinja").read_text(encoding="utf-8") == SCRIPT_WITH_EOS
    assert (checkpoint / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    loaded = mistura.load(tuner.out_dir)
    x, _ = collate(tuner.val_examples)
    assert torch.equal(loaded(x), tuner.model.eval()(x))


def test_a_resumed_fine_tune_continues_the_uninterrupted_one(base, toy, tmp_path):
    full, _ = fine_tune(base, toy, tmp_path / "full")
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000012")
    resumed, _ = fine_tune(base, toy, tmp_path / "cut", resume=True)
    assert losses(resumed.out_dir) == losses(full.out_dir)
    final = "checkpoints/step-0000012/model.safetensors"
    a, b = load_file(full.out_dir / final), load_file(resumed.out_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_fine_tune_trains_the_adapters_alone_and_resumes_exactly(base, toy, tmp_path):
    notices = []
    tuner = FineTuner(config(base, toy, tmp_path / "full", method="lora"), log=notices.append)
    assert any(n.startswith("LoRA adapters: training ") for n in notices)
    base_weights = {k: v.clone() for k, v in tuner.model.state_dict().items() if "lora_" not in k}
    tuner.fit(progress=False)
    assert all(torch.equal(v, tuner.model.state_dict()[k]) for k, v in base_weights.items())
    checkpoint = tuner.out_dir / "checkpoints" / "step-0000012"
    assert {"adapter_config.json", "adapter.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in checkpoint.iterdir()
    }
    x, _ = collate(tuner.val_examples)
    assert torch.allclose(mistura.load(tuner.out_dir)(x), tuner.model.eval()(x), atol=1e-6)
    assert tuning_template(checkpoint).source == tuner.template.source  # the step folder alone, as chat reads it
    shutil.copytree(tuner.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000012")
    resumed, _ = fine_tune(base, toy, tmp_path / "cut", resume=True, method="lora")
    assert losses(resumed.out_dir) == losses(tuner.out_dir)


def test_a_quantised_base_is_refused_for_a_full_fine_tune(base, toy, tmp_path):
    quantised = quantize_checkpoint(base, tmp_path / "int8", QuantConfig("int8"))
    with pytest.raises(ConfigError, match="is quantised: .* use method lora"):
        FineTuner(config(quantised, toy, tmp_path / "run"), log=lambda *a: None)
