"""The `mistura` model of lm-evaluation-harness: its three kinds of request answered as the model computes them,
and whole tasks run from `mistura eval --tasks` and from lm_eval's own command line, on local task files."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mistura
from mistura.cli import main
from mistura.eval.perplexity import evaluate_text
from mistura.infer.generate import generate_text
from mistura.infer.sampling import Sampling
from mistura.loading import load_tokenizer
from tests.eval.conftest import TEXT

pytest.importorskip(
    "lm_eval", reason="the lm-evaluation-harness adapter needs the eval extra: pip install -e '.[eval]'"
)
from lm_eval.api.instance import Instance  # noqa: E402

from mistura.eval.harness import MisturaLM  # noqa: E402

QUESTIONS = [
    {"pergunta": "Capitu tinha olhos de", "opcoes": [" cigana", " pedra", " vidro"], "resposta": 0},
    {"pergunta": "A casa ficava na rua de", "opcoes": [" Matacavalos", " ninguém"], "resposta": 0},
    {"pergunta": "Era o ano de", "opcoes": [" 1857", " nada", " sempre"], "resposta": 0},
]
TASKS = {
    "capitu_mc": "output_type: multiple_choice\\ndoc_to_text: '{{pergunta}}'\\ndoc_to_choice: '{{opcoes}}'\\n"
    "doc_to_target: '{{resposta}}'\\nmetric_list:\\n  - metric: acc\\n",
    "capitu_gen": "output_type: generate_until\\ndoc_to_text: '{{pergunta}}'\\ndoc_to_target: '{{opcoes[0]}}'\\n"
    "generation_kwargs:\\n  until: ['.']\\n  max_gen_toks: 4\\nmetric_list:\\n  - metric: exact_match\\n",
    "capitu_ppl": "output_type: loglikelihood_rolling\\ndoc_to_text: ''\\ndoc_to_target: '{{pergunta}}'\\n"
    "metric_list:\\n  - metric: word_perplexity\\n  - metric: bits_per_byte\\n",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of task YAML files over a local JSONL file, as --include-path takes it."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "capitu.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    for name, body in TASKS.items():
        source = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        )
        (folder / f"{name}.yaml").write_text(source + body.replace("\\n", "\n"), encoding="utf-8")
    return folder


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def test_loglikelihood_is_the_continuations_log_probability(checkpoint):
    lm = MisturaLM(str(checkpoint), batch_size=2)
    model, tokenizer = mistura.load(checkpoint), load_tokenizer(checkpoint)
    pairs = [("Capitu tinha", " olhos"), ("Era o ano", " de 1857"), ("A casa", " da rua")]  # within 16 tokens
    answers = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, answers):
        whole, start = lm.tok_encode(context + continuation), len(lm.tok_encode(context))
        logprobs = F.log_softmax(model(torch.tensor([whole]))[0], dim=-1)  # (T, V)
        targets = torch.tensor(whole[start:])
        assert logprob == pytest.approx(logprobs[start - 1 : -1].gather(1, targets[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logprobs[start - 1 : -1].argmax(-1) == targets).all())
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", TEXT)], disable_tqdm=True)
    assert rolling == pytest.approx(-evaluate_text(model, tokenizer, [("t", TEXT)], 16, 8).nll, rel=1e-5)
    (text,) = lm.generate_until([request("generate_until", "Capitu", {"until": ["a"], "max_gen_toks": 6})], True)
    assert (
        text == generate_text(model, tokenizer, ["Capitu"], Sampling(max_new_tokens=6, temperature=0, stop=("a",)))[0]
    )


def test_mistura_eval_runs_tasks_of_every_kind(checkpoint, tasks, tmp_path, capsys):
    output = tmp_path / "r.json"
    names = ",".join(TASKS)
    args = ["eval", str(checkpoint), "--tasks", names, "--include-path", str(tasks), "--output", str(output)]
    assert main(args) == 0
    result = json.loads(output.read_text())
    assert result["tasks"] == list(TASKS) and "capitu_mc" in capsys.readouterr().out
    assert 0 <= result["results"]["capitu_mc"]["acc,none"] <= 1 and result["n-samples"]["capitu_mc"]["effective"] == 3
    assert result["results"]["capitu_gen"]["exact_match,none"] >= 0
    assert result["results"]["capitu_ppl"]["bits_per_byte,none"] > 0


def test_lm_evals_own_command_line_finds_the_mistura_model(checkpoint, tasks, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "mistura.eval.harness", "--model", "mistura", "--model_args"]
    command += [f"pretrained={checkpoint}", "--batch_size", "4", "--tasks", "capitu_mc", "--include_path", str(tasks)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "capitu_mc" in result.stdout and "acc" in result.stdout


def test_unknown_tasks_and_checkpoints_are_clear_errors(checkpoint, tasks, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--tasks", "capitu_nada", "--include-path", str(tasks)]) == 2
    assert "unknown lm-evaluation-harness task(s): capitu_nada" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none"), "--tasks", "capitu_mc"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
