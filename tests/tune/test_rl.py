"""mistura.tune.rl: PPO and GRPO on a toy reward a tiny random model learns in a few steps (the share of
the letter a in a reply), step 0 on the reference, exact resumes, checkpoints, bad input and the CLI."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mistura
from mistura.cli import main
from mistura.errors import ConfigError, DataError
from mistura.train.loggers import read_metrics
from mistura.tune.config import RLConfig
from mistura.tune.rl import PLOT, RLTrainer, pack
from tests.tune.conftest import PAIRS

REWARDS = '''
import math


def share_of_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


def fails(prompts, completions, **columns):
    raise KeyError("no such column")


def not_a_number(prompts, completions, **columns):
    return [math.nan for _ in completions]


def answer_in_prompt(prompts, completions, answer, **columns):
    """1 for a reply whose line's answer ends its prompt; the columns must come one per reply, None if missing."""
    assert len(answer) == len(prompts) and all(a is None or isinstance(a, str) for a in answer)
    return [float(bool(c) and a is not None and p.endswith(a)) for p, c, a in zip(prompts, completions, answer)]
'''
TRAIN = {
    "batch_size": 4,
    "lr": 1e-2,
    "warmup_steps": 2,
    "eval_interval": 10,
    "eval_batches": 1,
    "log_interval": 1,
    "checkpoint_interval": 10,
}
RL = {"group_size": 4, "max_new_tokens": 8, "epochs": 2, "mini_batches": 2}
QUIET = {"log": lambda *a: None}
STEP_METRICS = {"reward", "reward_std", "kl", "entropy", "reply_length", "ended"}
OWN_METRICS = {
    "ppo": {"kl_coef", "policy/clipfrac", "loss/value", "val/clipfrac"},
    "grpo": {"clip_ratio/region_mean", "kl_per_token"},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with rewards.py (the reward functions above) and prompts.jsonl (the preference pairs' prompts)."""
    folder = tmp_path_factory.mktemp("rl-files")
    (folder / "rewards.py").write_text(REWARDS, encoding="utf-8")
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    return folder


def reward(files: Path, function: str = "share_of_a") -> str:
    return f"{files / 'rewards.py'}:{function}"


def run_config(base, prompts, out_dir, algorithm, reward, method="full", rl=None, **train) -> RLConfig:
    return RLConfig.from_dict(
        {
            "base": str(base),
            "method": method,
            "data": {"train": str(prompts), "val": str(prompts)},
            "lora": {"rank": 4, "alpha": 8},
            "train": {"out_dir": str(out_dir), **TRAIN, **train},
            "rl": {"algorithm": algorithm, "reward": reward, **RL, **(rl or {})},
        }
    )


def rl_run(base, prompts, out_dir, algorithm, reward, resume=False, log=QUIET["log"], **options):
    trainer = RLTrainer(run_config(base, prompts, out_dir, algorithm, reward, **options), log=log)
    return trainer, trainer.fit(resume=resume, progress=False)


def steps(out_dir) -> list[dict]:
    return [r for r in read_metrics(out_dir) if "reward" in r]


def evaluations(out_dir) -> list[dict]:
    return [r for r in read_metrics(out_dir) if "val_reward" in r]


def records(out_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s"} for r in read_metrics(out_dir)]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.fixture(scope="module", params=["ppo", "grpo"])
def learned(request, base, files, tmp_path_factory):
    """20 steps of PPO (a light KL penalty) or GRPO (beta 0.05) on share_of_a: (algorithm, trainer, summary)."""
    algorithm = request.param
    out_dir = tmp_path_factory.mktemp(f"learned-{algorithm}") / "run"
    rl = {"kl_coef": 0.01} if algorithm == "ppo" else {"kl_coef": 0.05}
    trainer, summary = rl_run(base, files / "prompts.jsonl", out_dir, algorithm, reward(files), rl=rl, max_steps=20)
    return algorithm, trainer, summary


def test_ppo_and_grpo_raise_the_reward_of_the_toy_task(learned):
    algorithm, trainer, summary = learned
    logged = steps(trainer.out_dir)
    assert [r["step"] for r in logged] == list(range(1, 21))
    first, last = mean(r["reward"] for r in logged[:5]), mean(r["reward"] for r in logged[-5:])
    assert first < 0.1 and last > first + 0.1, (first, last)  # measured: 0.06 -> 0.25 for both
    for record in logged:
        assert STEP_METRICS | OWN_METRICS[algorithm] <= set(record), algorithm
        assert record["reply_length"] <= 8 and 0 <= record["ended"] <= 1 and record["reward_std"] >= 0
    clipped = "policy/clipfrac" if algorithm == "ppo" else "clip_ratio/region_mean"
    assert any(r[clipped] > 0 for r in logged)  # 2 epochs of 2 mini-batches at lr 1e-2 leave the trust region
    assert logged[-1]["kl"] > 1.0  # the policy moved away from the reference to get there


def test_evaluations_the_summary_and_the_plot(learned):
    algorithm, trainer, summary = learned
    evals = evaluations(trainer.out_dir)
    assert [r["step"] for r in evals] == [0, 10, 20]  # once before the first step: the starting point
    for record in evals:
        assert {"val_reward", "val_kl", "val_reply_length"} <= set(record)
        assert 0 < record["val_reply_length"] <= 8
    assert abs(evals[0]["val_kl"]) < 1e-4  # the base is the reference
    assert evals[-1]["val_reward"] > evals[0]["val_reward"] + 0.1  # measured: 0.09 -> 0.30 (PPO), 0.33 (GRPO)
    assert summary["val_reward"] == evals[-1]["val_reward"]  # the same fixed-seed replies at the same weights
    assert summary["best_val_reward"] == max(r["val_reward"] for r in evals[1:])  # of the run's own evaluations
    plot = Path(summary["plot"])
    assert plot == trainer.out_dir / PLOT and plot.is_file()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_the_first_step_samples_from_the_reference(learned):
    algorithm, trainer, _ = learned
    first = steps(trainer.out_dir)[0]
    assert abs(first["kl"]) < 1e-4  # the rollout is read before the first update
    if algorithm == "ppo":
        assert first["kl_coef"] == 0.01


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_one_epoch_in_one_mini_batch_updates_on_policy(base, files, tmp_path, algorithm):
    """The update reads the replies as the rollout did (the same temperature): ratio 1, nothing clipped."""
    rl = {"epochs": 1, "mini_batches": 1, "temperature": 0.7}
    trainer, _ = rl_run(base, files / "prompts.jsonl", tmp_path / "run", algorithm, reward(files), rl=rl, max_steps=3)
    logged = steps(trainer.out_dir)
    assert abs(logged[0]["kl"]) < 1e-4
    for record in logged:
        if algorithm == "ppo":
            assert record["policy/clipfrac"] == 0
            assert record["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
            assert record["policy/approxkl"] == pytest.approx(0.0, abs=1e-8)
        else:
            assert record["clip_ratio/region_mean"] == 0
    if algorithm == "grpo":  # on the reference, ratio 1 and KL 0: the loss is minus the mean advantage, 0 by groups
        assert logged[0]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
        assert logged[0]["loss/main"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    ("algorithm", "method", "rl", "train"),
    [
        ("ppo", "full", {"kl_target": 0.5, "kl_horizon": 64}, {}),  # an adaptive kl_coef: its saved value matters
        ("ppo", "lora", {}, {}),
        ("ppo", "full", {}, {"ema_decay": 0.9}),  # the averaged policy and value head evaluate and are saved
        ("grpo", "full", {}, {}),
    ],
)
def test_a_resumed_run_continues_the_uninterrupted_one(base, files, tmp_path, algorithm, method, rl, train):
    options = {"method": method, "rl": rl, "max_steps": 6, "checkpoint_interval": 3, "eval_interval": 3, **train}
    prompts = files / "prompts.jsonl"
    full, _ = rl_run(base, prompts, tmp_path / "full", algorithm, reward(files), **options)
    shutil.copytree(full.out_dir, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000006")
    lines = []
    resumed, _ = rl_run(
        base, prompts, tmp_path / "cut", algorithm, reward(files), resume=True, log=lines.append, **options
    )
    assert any("resumed from" in line and "at step 3" in line for line in lines)
    assert records(resumed.out_dir) == records(full.out_dir)
    assert abs(steps(full.out_dir)[0]["kl"]) < 1e-4  # LoRA's adapters start at 0: the policy is the reference
    if "kl_target" in rl:
        assert len({r["kl_coef"] for r in steps(full.out_dir)}) == 6  # it moved every step
    final = Path("checkpoints") / "step-0000006"
    names = sorted(path.name for path in (full.out_dir / final).glob("*.safetensors"))
    assert ("value_head.safetensors" in names) == (algorithm == "ppo")
    for name in names:  # the weights (or adapters), the value head, and the optimizer's moments
        a, b = load_file(full.out_dir / final / name), load_file(resumed.out_dir / final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def sample_ids(trainer: RLTrainer) -> torch.Tensor:
    return torch.tensor([list(trainer.val_prompts[0].ids)])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_checkpoint_loads_as_the_trained_policy(base, files, tmp_path, method):
    trainer, summary = rl_run(
        base,
        files / "prompts.jsonl",
        tmp_path / "run",
        "ppo",
        reward(files),
        method=method,
        max_steps=2,
        warmup_steps=1,
    )
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint == trainer.out_dir / "checkpoints" / "step-0000002"
    assert (checkpoint / "value_head.safetensors").is_file()
    if method == "lora":
        assert (checkpoint / "adapter.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
        assert not (checkpoint / "model.safetensors").exists()  # an adapter folder naming the base
    loaded = mistura.load(checkpoint)
    assert isinstance(loaded, mistura.Transformer)
    tokenizer = mistura.load_tokenizer(checkpoint)
    assert tokenizer.get_vocab_size() == mistura.load_tokenizer(base).get_vocab_size()
    x = sample_ids(trainer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), trainer.policy.eval()(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(loaded(x), mistura.load(base).eval()(x))  # it trained
    assert isinstance(mistura.load(trainer.out_dir), mistura.Transformer)  # the run folder: its latest checkpoint


def test_the_checkpoint_of_a_run_loads_with_its_tokenizer(learned):
    algorithm, trainer, summary = learned
    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "value_head.safetensors").is_file() == (algorithm == "ppo")
    assert isinstance(mistura.load(checkpoint), mistura.Transformer)
    assert mistura.load_tokenizer(checkpoint).get_vocab_size() > 0


def test_pack_lines_up_prompts_and_replies():
    prompts = [[1, 2, 3], [4, 5], [7, 8, 9, 10]]
    replies = [[6, 7], [8, 9, 10, 11], [2]]
    x, y, mask = pack(prompts, replies, torch.device("cpu"))
    assert x.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 9, 10], [7, 8, 9, 10, 2]]
    assert y.tolist() == [[2, 3, 6, 7, 0], [5, 8, 9, 10, 11], [8, 9, 10, 2, 0]]
    assert mask.tolist() == [
        [False, False, True, True, False],  # positions 2 and 3 predict the reply 6, 7
        [False, True, True, True, True],
        [False, False, False, True, False],  # a one-token reply: only the prompt's last position
    ]
    assert x.dtype == y.dtype == torch.long and mask.dtype == torch.bool
    assert y[mask].tolist() == [token for reply in replies for token in reply]


@pytest.mark.parametrize(
    ("rl", "train", "message"),
    [
        ({"reward": None}, {}, "no reward: give --reward SPEC"),
        ({"algorithm": "grpo", "group_size": 1}, {}, "rl.group_size must be >= 2 for GRPO"),
        ({"mini_batches": 3}, {}, r"rl.mini_batches \(3\) must divide the 16 replies"),
        ({}, {"grad_accum": 2}, "train.grad_accum must be 1 in RL"),
        ({"temperature": 0}, {}, "rl.temperature must be > 0"),
        ({"grup_size": 4}, {}, "did you mean 'group_size'"),
        ({"algorithm": "a2c"}, {}, "rl.algorithm"),
        ({"kl_target": -1.0}, {}, "rl.kl_target must be > 0"),
    ],
)
def test_bad_rl_settings_are_named(base, files, tmp_path, rl, train, message):
    with pytest.raises(ConfigError, match=message):
        run_config(base, files / "prompts.jsonl", tmp_path, "ppo", reward(files), rl=rl, **train)


LONG = " ".join(["Capitu tinha olhos de cigana oblíqua e dissimulada."] * 8)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"prompt": "Bom dia."}, {"chosen": "Capitu."}], r"prompts.jsonl, line 2: 'prompt' must be a non-empty"),
        ([{"prompt": "Bom dia."}, "", {"prompt": "  "}], r"prompts.jsonl, line 3: 'prompt' must be a non-empty"),
        (["", "  "], "holds no prompts"),
        ([{"prompt": "Bom dia."}, {"prompt": LONG}], r"prompts.jsonl, line 2: the formatted prompt takes \d+ tokens"),
        ([{"prompt": "Bom dia."}, "{not json"], "line 2: not valid JSON"),
    ],
)
def test_bad_prompt_files_name_the_line(base, files, jsonl, tmp_path, lines, message):
    prompts = jsonl("prompts.jsonl", lines)
    with pytest.raises(DataError, match=message):
        RLTrainer(run_config(base, prompts, tmp_path / "run", "grpo", reward(files)), **QUIET)


def test_a_missing_prompt_file_is_named(base, files, tmp_path):
    with pytest.raises(DataError, match="prompt file not found: .*nowhere.jsonl"):
        RLTrainer(run_config(base, tmp_path / "nowhere.jsonl", tmp_path / "run", "ppo", reward(files)), **QUIET)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("fails", r"the reward .*rewards.py:fails raised KeyError: 'no such column'"),
        ("not_a_number", r"the reward .*rewards.py:not_a_number gave nan for reply 0: rewards must be finite"),
    ],
)
def test_a_bad_reward_stops_the_run_with_its_name(base, files, tmp_path, function, message):
    run = run_config(base, files / "prompts.jsonl", tmp_path / "run", "ppo", reward(files, function))
    trainer = RLTrainer(run, **QUIET)
    with pytest.raises(DataError, match=message):
        trainer.fit(progress=False)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([{"prompt": "Diga x", "answer": "x"}] * 4, 1.0),  # every prompt ends with its answer
        (  # two answers right, one line without an answer (None), one wrong
            [
                {"prompt": "Diga x", "answer": "x"},
                {"prompt": "Diga y", "answer": "y", "id": 2},
                {"prompt": "Diga w", "id": 3},
                {"prompt": "Diga w", "answer": "z"},
            ],
            0.5,
        ),
    ],
)
def test_the_prompt_files_other_keys_reach_the_reward(base, files, jsonl, tmp_path, lines, expected):
    prompts = jsonl("prompts.jsonl", lines)
    trainer, summary = rl_run(
        base, prompts, tmp_path / "run", "grpo", reward(files, "answer_in_prompt"), max_steps=2, warmup_steps=1
    )
    assert [r["reward"] for r in steps(trainer.out_dir)] == [expected, expected]
    assert summary["val_reward"] == expected  # one reply to each held-out prompt


def test_rl_end_to_end(base, pairs, files, tmp_path, capsys):
    run = tmp_path / "rl"
    argv = ["rl", str(base), "--data", str(pairs), "--val", str(pairs), "--reward", reward(files), "--out", str(run)]
    sets = ["train.max_steps=3", "train.warmup_steps=1", "train.eval_interval=2", "train.batch_size=2"]
    sets += ["rl.max_new_tokens=8"]  # the default 32 leave no room for the pairs' longest prompt in a 64-token context
    assert main([*argv, "--algorithm", "grpo", *[arg for s in sets for arg in ("--set", s)], "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "GRPO on the reward" in out and "done: 3 steps" in out and "held-out reward" in out
    assert f"reward against KL: {run / PLOT}" in out and (run / PLOT).is_file()
    assert [r["step"] for r in evaluations(run)] == [0, 2, 3]
    assert (run / "checkpoints" / "step-0000003" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reward", "nonsense"], "unknown reward 'nonsense'"),
        ([], "no reward: give --reward SPEC"),
        (["--reward", "ends_sentence", "--algorithm", "grpo", "--set", "rl.group_size=1"], "rl.group_size must be"),
        (["--reward", "contains:"], "names no word"),
    ],
)
def test_bad_rl_input_is_one_clear_line(base, pairs, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    fits = ["--set", "rl.max_new_tokens=8"]
    assert main(["rl", str(base), "--data", str(pairs), *fits, *argv, "--no-progress"]) != 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in captured.err
