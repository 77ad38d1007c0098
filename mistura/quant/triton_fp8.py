"""Triton kernels for FP8 inference in DeepSeek-V3's format, and their launchers.

The PyTorch path (`mistura.convert.fp8`) dequantises a weight to bf16 before every matmul.
On a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper and later) these
kernels keep both operands in 8 bits:

    act_quant(x)               x (..., K) -> q e4m3 (..., K), scale fp32 (..., G)      one scale per 1 x 128 group
    weight_dequant(q, s)       q e4m3 (..., R, C), s (..., ceil(R/128), ceil(C/128))  -> q * s, one scale per block
    fp8_gemm(a, a_s, b, b_s)   a e4m3 (..., K), b e4m3 (N, K)                          -> a @ b.T (..., N)
    fp8_linear(x, w, w_s)      act_quant, then fp8_gemm: a quantised linear layer's forward

G = ceil(K / 128). The GEMM walks K one 128-wide block at a time: each step's FP8 product
of an (BLOCK_M x 128) tile of `a` and a (128 x BLOCK_N) tile of `b.T` comes out of the tensor
cores in fp32 and is multiplied by the row scales of `a` and the block scales of `b` for that
step, then added to an fp32 accumulator. Since a block of `a`'s groups lines up with a block
of `b`'s, each step needs one scale per row and one per column, and the scales never enter
the 8-bit products. Tile sizes and pipeline stages are autotuned per (N, K) and power-of-two
bucket of M.

The kernels reproduce the PyTorch path on the CPU bit for bit (act_quant, weight_dequant) or
to fp32 rounding (fp8_gemm): same scale s = amax / 448 (1 for an all-zero group), the same
IEEE division (`div_rn`, not Triton's faster approximate `/`), the same clamp to +-448 before
the round-to-nearest-even cast.

Triton's interpreter (TRITON_INTERPRET=1 in the environment before this module is imported)
runs the same kernels on CPU tensors with numpy, which is how the tests check them without a
GPU. Its float conversions are not the hardware's: in Triton 3.9, fp32 -> e4m3 drops the
carry when rounding up to the next power of two (31.6 becomes 16, not 32) and fp32 -> bf16
truncates. Under the interpreter the kernels therefore write fp32, and PyTorch makes the final
cast; the autotuner, which cannot time anything there, is given a single configuration.
"""

import math
import os

import torch

from mistura.convert.fp8 import FP8, FP8_MAX, GROUP
from mistura.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: available() is False, and the kernels below are not defined
    triton = None

# Triton decides when it decorates a kernel, at this module's import, whether its interpreter runs it.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    """Whether the kernels run on this machine's GPU: triton installed and CUDA compute capability 8.9+."""
    return triton is not None and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


# ---------------------------------------------------------------------------------------
# Kernels.

if triton is not None:
    E4M3_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, GROUPS, BLOCK: tl.constexpr):
        """One program per (row, group): x[row, group * BLOCK:(group + 1) * BLOCK]."""
        row = tl.program_id(0).to(tl.int64)
        group = tl.program_id(1)
        cols = group * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        mask = cols < K
        x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        s = tl.where(amax > 0, tl.div_rn(amax, E4M3_MAX), 1.0)
        q = tl.clamp(tl.div_rn(x, s), -E4M3_MAX, E4M3_MAX)
        tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * GROUPS + group, s)

    @triton.jit
    def _weight_dequant_kernel(q_ptr, s_ptr, y_ptr, R, C, BLOCK: tl.constexpr):
        """One program per (row block, column block, matrix) of a stack of (R, C) matrices."""
        block_r = tl.program_id(0)
        block_c = tl.program_id(1)
        matrix = tl.program_id(2).to(tl.int64)
        n_r = tl.cdiv(R, BLOCK)
        n_c = tl.cdiv(C, BLOCK)
        rows = block_r * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        cols = block_c * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        offs = matrix * R * C + rows[:, None] * C + cols[None, :]  # (BLOCK, BLOCK)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        q = tl.load(q_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + (matrix * n_r + block_r) * n_c + block_c)
        tl.store(y_ptr + offs, (q * s).to(y_ptr.dtype.element_ty), mask=mask)

    # (BLOCK_M, BLOCK_N, stages), 4 warps each: of 18 tried on an H100 (BLOCK_M 16 or 64, BLOCK_N 32 to 128,
    # 3 to 5 stages), those within 5% of the best at some M from 1 to 4096 on Llama-3-8B's weight shapes;
    # few rows favour 16-row tiles, many rows 64 x 128. Wider sweeps found 128-row tiles and 8 warps never best.
    GEMM_CONFIGS = [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_stages=stages, num_warps=4)
        for block_m, block_n, stages in [
            (16, 32, 4),
            (16, 32, 5),
            (16, 64, 4),
            (16, 64, 5),
            (16, 128, 5),
            (64, 64, 5),
            (64, 128, 3),
            (64, 128, 4),
        ]
    ]

    # The best tiles depend on M as much as on N and K (one tuned at M = 1 ran 3 to 6 times slower at
    # M = 4096), but M changes with every prompt: the key takes M_BUCKET, M rounded up to a power of two
    # in [16, 1024], an argument the kernel itself ignores.
    @triton.autotune(configs=GEMM_CONFIGS[:1] if INTERPRETED else GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr,
        a_s_ptr,
        b_ptr,
        b_s_ptr,
        y_ptr,
        M,
        N,
        K,
        M_BUCKET,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """y (M, N) = a (M, K) @ b (N, K).T, one program per (BLOCK_M, BLOCK_N) tile of y.

        BLOCK_K is the scale block: in each step along K, row m of `a` has one scale
        a_s[m, step] and column n of `b.T` one scale b_s[n // BLOCK_K, step].
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        steps = tl.cdiv(K, BLOCK_K)
        # Rows and columns past the edge wrap around to real ones: their loads need no mask,
        # and the store below drops what they compute.
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # (BLOCK_M,)
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # (BLOCK_N,)
        ks = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # (BLOCK_M, BLOCK_K)
        b_ptrs = b_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]  # (BLOCK_K, BLOCK_N)
        a_s_ptrs = a_s_ptr + rows.to(tl.int64) * steps  # (BLOCK_M,)
        b_s_ptrs = b_s_ptr + (cols // BLOCK_K) * steps  # (BLOCK_N,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(steps):
            k_left = K - step * BLOCK_K
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
            a_s = tl.load(a_s_ptrs + step)
            b_s = tl.load(b_s_ptrs + step)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers.


def act_quant(x: torch.Tensor, block_size: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> q float8_e4m3fn (..., K), scale fp32 (..., ceil(K / block_size)); x ~= q * scale.

    `mistura.convert.fp8.quantize_fp8_groups` on the GPU; a last group narrower than
    `block_size` is quantised alone.
    """
    _check_block(block_size)
    _check_tensors(x)
    if not x.is_floating_point() or x.dtype == FP8:
        raise ConfigError(f"act_quant quantises a floating-point tensor, got {x.dtype}")
    if x.ndim == 0:
        raise ConfigError("act_quant needs a tensor with a last dimension to group, got a scalar")
    x = x.contiguous()
    K = x.shape[-1]
    groups = _cdiv(K, block_size)
    q = torch.empty(x.shape, dtype=_stored(FP8), device=x.device)
    s = torch.empty(*x.shape[:-1], groups, dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        _act_quant_kernel[(math.prod(x.shape[:-1]), groups)](x, q, s, K, groups, BLOCK=block_size)
    return q.to(FP8), s


def weight_dequant(
    q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = GROUP, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """q float8_e4m3fn (..., R, C) times its block scales (..., ceil(R / b), ceil(C / b)), as `dtype`.

    `mistura.convert.fp8.dequantize_fp8_blocks` with square blocks of side b = block_size on
    the GPU; leading dimensions, such as stacked experts (E, F, D), are matrices side by side.
    """
    _check_block(block_size)
    _check_tensors(q, scale_inv)
    _check_dtype("weight_dequant", dtype)
    if q.dtype != FP8 or q.ndim < 2:
        raise ConfigError(f"weight_dequant takes a float8_e4m3fn matrix, got {q.dtype} of shape {tuple(q.shape)}")
    R, C = q.shape[-2:]
    _check_scales("weight", scale_inv, (*q.shape[:-2], _cdiv(R, block_size), _cdiv(C, block_size)))
    q, scale_inv = q.contiguous(), scale_inv.contiguous()
    y = torch.empty(q.shape, dtype=_stored(dtype), device=q.device)
    if q.numel() > 0:
        grid = (_cdiv(R, block_size), _cdiv(C, block_size), math.prod(q.shape[:-2]))
        _weight_dequant_kernel[grid](q, scale_inv, y, R, C, BLOCK=block_size)
    return y.to(dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale_inv: torch.Tensor,
    block_size: int = GROUP,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """a (..., K) @ b (N, K).T -> (..., N) as `dtype`, both operands float8_e4m3fn, accumulated in fp32.

    a_scale (..., G) holds act_quant's scales of `a` (1 x block_size groups), b_scale_inv
    (ceil(N / block_size), G) the block scales of the weight `b`, G = ceil(K / block_size).
    """
    _check_block(block_size)
    _check_tensors(a, a_scale, b, b_scale_inv)
    _check_dtype("fp8_gemm", dtype)
    if a.dtype != FP8 or b.dtype != FP8:
        raise ConfigError(f"fp8_gemm multiplies float8_e4m3fn tensors, got {a.dtype} and {b.dtype}")
    if a.ndim == 0 or b.ndim != 2 or a.shape[-1] != b.shape[1]:
        raise ConfigError(
            f"fp8_gemm needs a (..., K) and b (N, K) with the same K, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    N, K = b.shape
    groups = _cdiv(K, block_size)
    _check_scales("activation", a_scale, (*a.shape[:-1], groups))
    _check_scales("weight", b_scale_inv, (_cdiv(N, block_size), groups))
    a, a_scale, b, b_scale_inv = a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale_inv.contiguous()
    M = math.prod(a.shape[:-1])
    y = torch.empty(*a.shape[:-1], N, dtype=_stored(dtype), device=a.device)
    if y.numel() > 0:  # K = 0 runs no step and writes zeros

        def grid(meta):
            return _cdiv(M, meta["BLOCK_M"]), _cdiv(N, meta["BLOCK_N"])

        m_bucket = min(max(1 << (M - 1).bit_length(), 16), 1024)
        _fp8_gemm_kernel[grid](a, a_scale, b, b_scale_inv, y, M, N, K, m_bucket, BLOCK_K=block_size)
    return y.to(dtype)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size: int = GROUP
) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T -> (..., N) in x's dtype: x quantised per group at run time, then fp8_gemm."""
    q, scale = act_quant(x, block_size)
    return fp8_gemm(q, scale, weight, weight_scale_inv, block_size, x.dtype)


# ---------------------------------------------------------------------------------------
# Checks.


def _stored(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes: `dtype`, or fp32 that PyTorch casts under the interpreter (module docstring)."""
    return torch.float32 if INTERPRETED else dtype


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv, wrapped for use in kernels too, costs over a microsecond a call


def _check_block(block_size: int) -> None:
    if triton is None:
        raise ConfigError("the FP8 Triton kernels need triton: pip install triton")
    # 32: the smallest K of an FP8 tensor-core product (Triton does not compile a 16-wide one).
    if not (isinstance(block_size, int) and block_size >= 32 and block_size & (block_size - 1) == 0):
        raise ConfigError(f"FP8 block size must be a power of two of at least 32, got {block_size!r}")


def _check_tensors(*tensors: torch.Tensor) -> None:
    """All on one device, and a CUDA one unless the interpreter runs the kernels."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ConfigError(f"FP8 kernel inputs must share a device, got {[str(t.device) for t in tensors]}")
    if device.type != "cuda" and not INTERPRETED:
        raise ConfigError(f"the FP8 Triton kernels run on CUDA tensors, got {device} (use mistura.convert.fp8 on CPU)")


def _check_dtype(kernel: str, dtype: torch.dtype) -> None:
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"{kernel} writes bfloat16, float16 or float32, not {dtype}")


def _check_scales(kind: str, scales: torch.Tensor, expected: tuple[int, ...]) -> None:
    if scales.dtype != torch.float32 or tuple(scales.shape) != expected:
        raise ConfigError(
            f"{kind} scales must be float32 of shape {expected}, got {scales.dtype} of shape {tuple(scales.shape)}"
        )
