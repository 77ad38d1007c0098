"""llama.cpp itself (through llama-cpp-python) runs our GGUF exports as mistura runs the checkpoints.

For every family of `test_gguf.py`: the logits of the same token ids (f32 within 1e-3, f16
within 2e-2), the same greedy continuation, and llama.cpp's tokenizer giving our ids for
a Portuguese paragraph. Our q8_0 and q4_0 files: the bytes llama.cpp's own quantizer writes,
and the logits of the weights they hold. Skipped unless `llama_cpp` imports.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import mistura
from mistura.convert.gguf import from_gguf, to_gguf
from mistura.data.tokenizer import BOS_ID

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama.cpp parity needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp, ~6 minutes)",
)

# The families, models and tokenizer text of test_gguf.py (test modules import each other only by path).
_spec = importlib.util.spec_from_file_location("gguf_cases", Path(__file__).with_name("test_gguf.py"))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)
tokenizer_file = cases.tokenizer_file

IDS = [BOS_ID, 17, 200, 3, 99, 42, 7, 150, 61, 250]


@pytest.fixture
def no_repacking(monkeypatch):
    """llama.cpp's CPU "extra buffer types" off (`use_extra_bufts`: AMX and repacked copies of q8_0/q4_0 weights),
    which crash llama.cpp 0.3.36 on this machine's AMX CPU when it runs q8_0/q4_0 (benchmarks/vs_llamacpp.py)."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers)


def run_llama_cpp(path: Path, ids: list[int], new: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for `ids` (T, V) and its greedy continuation of `new` tokens."""
    # An f32 KV cache: llama.cpp caches keys and values in f16 by default.
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=32, logits_all=True, n_threads=1, type_k=f32, type_v=f32, verbose=False
    )
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    continuation = []
    for _ in range(new):
        continuation.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(continuation[-1:])
    return logits, continuation


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("family", sorted(cases.FAMILIES))
def test_llama_cpp_computes_our_logits(family, kind, tokenizer_file, tmp_path, greedy):
    ckpt = mistura.checkpoint.save_model(tmp_path / "ckpt", cases.build(family), tokenizer_file)
    path = to_gguf(ckpt, tmp_path / "model.gguf", type=kind)
    model = mistura.load(ckpt)
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0].numpy()
    theirs, continuation = run_llama_cpp(path, IDS, 8)
    assert np.abs(theirs - ours).max() <= (1e-3 if kind == "f32" else 2e-2)
    if kind == "f32":
        assert continuation == greedy(model, torch.tensor([IDS]), 8)[0, len(IDS) :].tolist()


def test_llama_cpp_tokenizes_as_we_do(tokenizer_file, tmp_path):
    ckpt = mistura.checkpoint.save_model(tmp_path / "ckpt", cases.build("llama"), tokenizer_file)
    llm = llama_cpp.Llama(model_path=str(to_gguf(ckpt, tmp_path / "m.gguf")), vocab_only=True, verbose=False)
    ours = mistura.load_tokenizer(ckpt).encode(cases.TEXT).ids
    assert llm.tokenize(cases.TEXT.encode("utf-8"), add_bos=True, special=False) == [BOS_ID, *ours]
    assert llm.detokenize(ours).decode("utf-8") == cases.TEXT
    decomposed = unicodedata.normalize("NFD", cases.TEXT)  # we normalise to NFC first; llama.cpp does not (README)
    assert mistura.load_tokenizer(ckpt).encode(decomposed).ids == ours
    assert llm.tokenize(decomposed.encode("utf-8"), add_bos=True, special=False) != [BOS_ID, *ours]


@pytest.mark.parametrize(("kind", "ftype"), [("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")])
def test_our_quantised_tensors_are_the_bytes_llama_cpp_quantises(kind, ftype, tokenizer_file, tmp_path):
    """llama.cpp's own quantizer, every matrix in one type ("pure"), from our f32 export, writes byte for byte
    the blocks we write."""
    import ctypes

    import gguf

    ckpt = mistura.checkpoint.save_model(tmp_path / "ckpt", cases.build("llama"), tokenizer_file)
    f32, ours = to_gguf(ckpt, tmp_path / "f32.gguf", type="f32"), to_gguf(ckpt, tmp_path / "ours.gguf", type=kind)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure = getattr(llama_cpp, ftype), True
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    expected = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    tensors = gguf.GGUFReader(ours).tensors
    assert {t.name for t in tensors} == set(expected) and any(t.tensor_type.name == kind.upper() for t in tensors)
    for tensor in tensors:
        assert tensor.tensor_type == expected[tensor.name].tensor_type, tensor.name
        assert np.asarray(tensor.data).tobytes() == np.asarray(expected[tensor.name].data).tobytes(), tensor.name


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("family", sorted(cases.FAMILIES))
def test_llama_cpp_computes_the_logits_of_our_quantised_weights(family, kind, tokenizer_file, tmp_path, no_repacking):
    """llama.cpp on our q8_0/q4_0 file against mistura on the same file read back (its blocks dequantised to fp32).

    For these types ggml also rounds each matmul's activations to 8-bit blocks, so logits differ by about 1 %
    (measured: mean 0.005-0.008, at most 0.06, on logits of about 2.5); and an MoE router close to a tie can send
    one position to another expert (qwen2-moe at q4_0: 0.42 at its last position), hence medians over the
    positions. A misplaced or misread tensor moves every position by far more."""
    ckpt = mistura.checkpoint.save_model(tmp_path / "ckpt", cases.build(family), tokenizer_file)
    path = to_gguf(ckpt, tmp_path / "model.gguf", type=kind)
    model = mistura.load(from_gguf(path, tmp_path / "back"))
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0].numpy()
    theirs, _ = run_llama_cpp(path, IDS, 0)
    gap = np.abs(theirs - ours)  # (T, V)
    assert np.median(gap.mean(-1)) <= 0.015 and np.median(gap.max(-1)) <= 0.08, gap.max(-1)  # medians over positions
