import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mistura.data.bins import BatchLoader
from mistura.train.config import RunConfig
from mistura.train.loggers import read_metrics
from mistura.train.trainer import Trainer

# A tiny version of each MoE kind; run_dict's base model gives the width (d_model 32, 2 layers).
KINDS = {
    "qwen-top1-capacity": {
        "preset": "qwen-moe-4e-top1",
        "moe": {"n_experts": 4, "top_k": 1, "d_expert": 64, "capacity_factor": 1.0, "aux_loss_weight": 0.01},
    },
    "qwen-top2": {
        "preset": "qwen-moe-8e-top2",
        "moe": {"n_experts": 8, "top_k": 2, "d_expert": 32, "capacity_factor": 1.25, "aux_loss_weight": 0.01},
    },
    "deepseek": {  # a dense first layer, then sigmoid, groups, aux-free bias and a shared expert
        "preset": "deepseek-moe-tiny",
        "moe": {
            "n_experts": 8,
            "top_k": 2,
            "d_expert": 16,
            "d_shared": 16,
            "scoring": "sigmoid",
            "norm_topk": True,
            "n_groups": 4,
            "topk_groups": 2,
            "balance_bias_rate": 0.01,
            "seq_aux_loss_weight": 1e-4,
        },
    },
    "collaborative": {  # every layer a MoC layer: all experts answer, attention routes and fuses
        "preset": "moc-tiny",
        "layer_mlp": ["moc", "moc"],
        "moe": {
            "n_experts": 4,
            "top_k": 2,
            "d_expert": 32,
            "moc_heads": 4,
            "aux_loss_weight": 0.01,
            "diversity_loss_weight": 0.01,
        },
    },
}
LAYER_METRICS = ["load_cv", "max_util", "min_util", "dead_experts", "entropy", "dropped_fraction", "balance_loss"]


def train(run_dict, model, resume=False, **train_overrides):
    trainer = Trainer(RunConfig.from_dict(run_dict(model, **train_overrides)), log=lambda *a: None)
    summary = trainer.fit(resume=resume, progress=False)
    return trainer, summary


@pytest.mark.parametrize("kind", KINDS)
def test_each_moe_kind_trains_with_balanced_experts(run_dict, kind):
    trainer, summary = train(run_dict, KINDS[kind], max_steps=200, warmup_steps=5, eval_interval=10, log_interval=10)
    records = read_metrics(trainer.out_dir)
    evals = [r for r in records if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    logs = [r for r in records if "loss" in r]
    layers = [i for i, mlp in enumerate(trainer.run.model.layer_mlp) if mlp != "dense"]
    assert layers == ([1] if kind == "deepseek" else [0, 1])
    for record in logs:
        assert {"loss/main", "loss/aux"} <= set(record)
        assert {f"moe/{layer}/{name}" for layer in layers for name in LAYER_METRICS} <= set(record)
        assert record["loss"] == pytest.approx(record["loss/main"] + record["loss/aux"])
    for layer in layers:
        assert logs[-1][f"moe/{layer}/dead_experts"] == 0
        # Without balancing these runs collapse onto few experts (mean load CV above 1).
        assert sum(r[f"moe/{layer}/load_cv"] for r in logs) / len(logs) < 0.7
        assert f"val_moe/{layer}/load_cv" in evals[-1]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))


def test_validation_loss_is_the_main_loss_only(run_dict):
    qwen = KINDS["qwen-top2"]
    strong_aux = {**qwen, "moe": {**qwen["moe"], "aux_loss_weight": 1.0, "z_loss_weight": 1.0}}
    trainer, _ = train(run_dict, strong_aux, max_steps=4, warmup_steps=1)
    train_log = [r for r in read_metrics(trainer.out_dir) if "loss" in r]
    assert all(r["loss/aux"] > 0.5 for r in train_log)
    cfg, model = trainer.cfg, trainer.model.eval()
    loader = BatchLoader(trainer.val_tokens, cfg.batch_size, model.config.max_seq_len, cfg.seed + 1, trainer.device)
    batches = [loader.next_batch() for _ in range(cfg.eval_batches)]  # the batches evaluate() draws
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    metrics = trainer.evaluate()
    assert metrics["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))


def test_resume_continues_a_run_with_aux_free_balancing(run_dict, tmp_path):
    full, _ = train(run_dict, KINDS["deepseek"], out_dir=str(tmp_path / "full"))
    bias = "blocks.1.mlp.router.expert_bias"
    assert load_file(full.out_dir / "checkpoints/step-0000006/model.safetensors")[bias].any()
    # An interruption after step 6: the copy keeps only the step-6 checkpoint but the log runs on.
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000012")
    resumed, _ = train(run_dict, KINDS["deepseek"], resume=True, out_dir=str(tmp_path / "cut"))

    def losses(out_dir):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out_dir)]

    assert losses(resumed.out_dir) == losses(full.out_dir)
    final = "checkpoints/step-0000012/model.safetensors"
    a, b = load_file(full.out_dir / final), load_file(resumed.out_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
