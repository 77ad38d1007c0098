"""The paged KV cache: rows at their own positions, in scattered blocks, give the logits of a plain forward."""

import pytest
import torch

from mistura.errors import ConfigError
from mistura.model import Transformer, paged_attention
from mistura.model.paged import PagedRow, PagePool
from tests.infer.test_engine import ARCHITECTURES

SEQUENCES = [[5, 17, 3, 8, 1, 44, 9, 23, 60, 2, 70], [12, 33, 4, 90, 7], [61, 62, 63, 64, 65, 66, 67, 68, 69]]
CHUNKS = [[4, 6, 1], [3, 1, 1], [5, 3, 1]]  # each sequence's new tokens per forward: prefill chunks, decodes


def forward_in_chunks(model: Transformer, pool: PagePool) -> list[torch.Tensor]:
    """Each sequence's logits (T, V), fed in CHUNKS through scattered blocks of `pool`, all rows in each forward."""
    tables = [[9, 2, 14], [0, 7], [3, 11, 5]]  # not contiguous, not in order
    done = [0, 0, 0]
    got = [[] for _ in SEQUENCES]
    for step in range(3):  # prefill chunks; a decode beside two chunks; decodes
        rows = [
            PagedRow(tables[b], done[b], seq[done[b] : done[b] + CHUNKS[b][step]]) for b, seq in enumerate(SEQUENCES)
        ]
        batch = pool.batch(rows)
        assert batch.ids.shape == (1, sum(c[step] for c in CHUNKS))
        logits = model(batch.ids, batch.cache)[0]  # (N, V)
        for b, row in enumerate(rows):
            assert batch.ids[0, batch.places[b]].tolist() == row.tokens
            got[b].append(logits[batch.places[b]])
            done[b] += len(row.tokens)
    return [torch.cat(g) for g in got]


@pytest.mark.parametrize("attention", ["gather", "flex"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@torch.no_grad()
def test_chunks_through_scattered_pages_give_the_full_forward_logits(tiny, architecture, attention, eager_flex):
    preset, overrides = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model = Transformer(tiny(preset, **overrides)).eval()
    got = forward_in_chunks(model, PagePool(model, n_blocks=16, block_size=4, attention=attention))
    assert bool(eager_flex) == (attention == "flex")  # the flex kernel ran, and only for flex
    for b, seq in enumerate(SEQUENCES):
        want = model(torch.tensor([seq]))[0]
        assert torch.allclose(got[b], want, atol=1e-5), (b, (got[b] - want).abs().max())


@torch.no_grad()
def test_compiled_flex_reads_the_pool_in_place_as_gather_reads_it(tiny, monkeypatch):
    """The fused C++ kernel, not its eager reference: it visits only the blocks the block mask lists."""
    torch.manual_seed(0)
    model = Transformer(tiny("llama-tiny", n_kv_head=2)).eval()
    want = forward_in_chunks(model, PagePool(model, 16, 4))
    compiled, kernels = paged_attention.flex_kernel(), []
    monkeypatch.setattr(paged_attention, "flex_kernel", lambda: kernels.append(compiled) or compiled)
    got = forward_in_chunks(model, PagePool(model, 16, 4, attention="flex"))
    assert len(kernels) == 3 * model.config.n_layer  # every layer of every forward ran the compiled kernel
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()


def test_a_pool_is_sized_and_copied_by_blocks(tiny):
    model = Transformer(tiny("llama-tiny", n_kv_head=2))
    pool = PagePool(model, n_blocks=3, block_size=4)
    assert (
        PagePool.block_bytes(model, 4) == 2 * 4 * 2 * (2 * 8) * 4
    )  # layers x positions x (k, v) x heads x dims x fp32
    pool.tensors[0][:, 4:8] = 1.0
    pool.copy_block(1, 2)
    assert pool.tensors[0][:, 8:12].eq(1.0).all() and pool.tensors[0][:, :4].eq(0.0).all()
    mla = Transformer(tiny("dragao-tiny", d_ff=64))
    assert len(PagePool(mla, 2, 4).tensors) == 1
    with pytest.raises(ConfigError, match=">= 1 block"):
        PagePool(model, 0, 4)
    with pytest.raises(ConfigError, match="gather, flex"):
        PagePool(model, 2, 4, attention="paged")
    with pytest.raises(ConfigError, match="CPU only"):
        PagePool(model.to("meta"), 2, 4, attention="flex")
