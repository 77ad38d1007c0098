"""The files of a conversion: streaming reads, shards both ways, and bad input refused with nothing written.

A failed conversion must name the culprit (tensor or file) and leave the output folder as
it was: absent, with no hidden staging folder beside it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mistura

transformers = pytest.importorskip("transformers")

from mistura import shards  # noqa: E402
from mistura.checkpoint import MANIFEST  # noqa: E402
from mistura.convert.hf import from_hf, load_hf_folder, to_hf  # noqa: E402
from mistura.errors import CheckpointError, ConfigError  # noqa: E402
from mistura.shards import INDEX, WeightFiles, parse_size  # noqa: E402

MOE_CASE = "qwen2-moe-shared-dense"  # routed experts, a gated shared expert and a dense layer
SHARD = 20_000  # bytes: the tiny models span several shards


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with WeightFiles(folder) as files:
        return {name: files.read(name) for name in files.shapes}


def _assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    assert all(got[name].dtype == t.dtype and torch.equal(got[name], t) for name, t in expected.items())


def _shard_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == [file.name for file in files]
    for file in files:  # full shards, unless one tensor alone is larger
        tensors = load_file(file)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= SHARD
    return files


@pytest.fixture(scope="module")
def sharded_hf(saved_case, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharded-hf")
    saved_case(MOE_CASE).hf_model.save_pretrained(folder, max_shard_size="20KB")
    return folder


@torch.no_grad()
def test_sharded_input_and_output_convert_identically(saved_case, sharded_hf, tmp_path, make_ids):
    saved = saved_case(MOE_CASE)
    assert len(list(sharded_hf.glob("model-*.safetensors"))) > 1
    ckpt = from_hf(sharded_hf, tmp_path / "ckpt", max_shard_size=SHARD)
    files = _shard_files(ckpt)
    assert set(json.loads((ckpt / MANIFEST).read_text())) >= {file.name for file in files} | {INDEX}
    _assert_same_tensors(_tensors(ckpt), _tensors(saved.checkpoint))
    ids = make_ids(2, 16)
    torch.testing.assert_close(mistura.load(ckpt)(ids), saved.hf_model(ids).logits, atol=1e-4, rtol=1e-4)

    out = to_hf(ckpt, tmp_path / "hf", max_shard_size=SHARD)
    _shard_files(out)
    _assert_same_tensors(_tensors(out), load_file(saved.folder / "model.safetensors"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded(ids).logits, saved.hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_reads_one_file_at_a_time(sharded_hf, tmp_path, monkeypatch):
    opened, open_now, most = set(), [0], [0]
    safe_open = shards.safe_open

    class Counted:
        def __init__(self, path, framework):
            self.file, self.path = safe_open(path, framework=framework), path

        def __enter__(self):
            opened.add(self.path)
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
            return self.file.__enter__()

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.file.__exit__(*exc)

    monkeypatch.setattr(shards, "safe_open", Counted)
    from_hf(sharded_hf, tmp_path / "ckpt")
    assert len(opened) > 1 and most[0] == 1 and open_now[0] == 0


def test_dtype_cast(saved_case, tmp_path):
    folder = saved_case("llama-gqa-tied").folder
    ckpt = from_hf(folder, tmp_path / "ckpt", dtype="bf16")
    assert {t.dtype for t in _tensors(ckpt).values()} == {torch.bfloat16}
    assert mistura.load(ckpt).tok_emb.weight.dtype == torch.float32  # load casts as asked, fp32 by default
    assert from_hf(folder).tok_emb.weight.dtype == torch.float32  # in memory
    assert from_hf(folder, dtype="bf16").tok_emb.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "size, expected",
    [("5GB", 5 * 10**9), ("500 MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5KB", 1500), (1234, 1234), ("99", 99)],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "0", -1])
def test_bad_size_is_refused(size):
    with pytest.raises(ConfigError, match="max_shard_size"):
        parse_size(size)


def _rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))


def _truncate(folder: Path, keep: float) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: int(len(data) * keep)])


def _corrupt_header(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:24] = b"\x00garbage\xff\xfe!!!!!!"
    (folder / "model.safetensors").write_bytes(bytes(data))


def _pickled_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")


LAYER1_UP = "model.layers.1.mlp.up_proj.weight"

# (how to spoil a copy of the llama folder, the error, a pattern it must match)
SPOILED = {
    "unknown-model-type": (lambda f: _edit_config(f, model_type="bert"), ConfigError, "'bert' is not supported"),
    "fp8-source": (
        lambda f: _edit_config(f, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}),
        ConfigError,
        r"FP8-quantised .* `mistura convert fp8-to-bf16 HF_DIR OUT_DIR`",
    ),
    "missing-tensor": (lambda f: _rewrite(f, lambda t: t.pop(LAYER1_UP)), CheckpointError, rf"missing {LAYER1_UP}"),
    "extra-tensor": (
        lambda f: _rewrite(f, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t[LAYER1_UP].clone()})),
        CheckpointError,
        r"unexpected tensors model\.layers\.2\.mlp\.up_proj\.weight",
    ),
    "wrong-shape": (
        lambda f: _rewrite(f, lambda t: t.update({LAYER1_UP: t[LAYER1_UP].t().contiguous()})),
        CheckpointError,
        rf"{LAYER1_UP}: shape \(48, 96\) in the checkpoint, expected \(96, 48\)",
    ),
    "truncated-data": (lambda f: _truncate(f, 0.5), CheckpointError, r"model\.safetensors: cannot read safetensors"),
    "truncated-header": (lambda f: _truncate(f, 0.001), CheckpointError, r"model\.safetensors: cannot read"),
    "corrupt-header": (_corrupt_header, CheckpointError, r"model\.safetensors: cannot read safetensors"),
    "no-config": (lambda f: (f / "config.json").unlink(), CheckpointError, r"config\.json: cannot read JSON"),
    "pickled-weights": (_pickled_only, CheckpointError, r"no model\.safetensors.*pickled \*\.bin weights are refused"),
}


@pytest.mark.parametrize("spoil", sorted(SPOILED))
def test_bad_input_is_named_and_nothing_is_written(saved_case, tmp_path, spoil):
    change, error, pattern = SPOILED[spoil]
    folder = tmp_path / "hf"
    shutil.copytree(saved_case("llama-gqa-untied").folder, folder)
    change(folder)
    with pytest.raises(error, match=pattern):
        from_hf(folder, tmp_path / "ckpt")
    with pytest.raises(error, match=pattern):
        load_hf_folder(folder)  # the in-memory import reads through the same checks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _sharded_copy(sharded_hf: Path, tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "hf"
    shutil.copytree(sharded_hf, folder)
    return folder, json.loads((folder / INDEX).read_text())


def test_missing_shard_is_named(sharded_hf, tmp_path):
    folder, index = _sharded_copy(sharded_hf, tmp_path)
    shard = index["weight_map"]["lm_head.weight"]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard)):
        from_hf(folder, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_index_that_misplaces_a_tensor_is_named(sharded_hf, tmp_path):
    folder, index = _sharded_copy(sharded_hf, tmp_path)
    shards_named = sorted(set(index["weight_map"].values()))
    index["weight_map"]["lm_head.weight"] = next(s for s in shards_named if s != index["weight_map"]["lm_head.weight"])
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks lm_head\.weight, which the index places here"):
        from_hf(folder, tmp_path / "ckpt")


def test_failure_while_writing_leaves_nothing(sharded_hf, tmp_path, monkeypatch):
    """A read that fails after some shards are written: the output folder still never appears."""
    reads = [0]
    read = WeightFiles.read

    def failing_read(self, name, index=None):
        reads[0] += 1
        if reads[0] == 30:
            raise CheckpointError(f"disk error while reading {name}")
        return read(self, name, index)

    monkeypatch.setattr(WeightFiles, "read", failing_read)
    with pytest.raises(CheckpointError, match="disk error"):
        from_hf(sharded_hf, tmp_path / "ckpt", max_shard_size=SHARD)
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_a_new_folder(saved_case, tmp_path):
    folder = saved_case("llama-gqa-tied").folder
    with pytest.raises(ConfigError, match="must not be the input folder"):
        from_hf(folder, folder)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        from_hf(folder, tmp_path / "busy")
    with pytest.raises(ConfigError, match="dtype: expected one of"):
        from_hf(folder, tmp_path / "ckpt", dtype="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
