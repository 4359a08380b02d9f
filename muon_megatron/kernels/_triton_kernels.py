"""Triton kernels (imported only where Triton is importable; used by :mod:`.ns_triton` and
:mod:`.step`). Nothing here is called on the CPU except under ``TRITON_INTERPRET=1``.

``symmetric_product_kernel``: ``Out = alpha * A A^T + beta * C (+ gamma I)`` for a batch of ``m x k``
matrices ``A`` (any strides) and a symmetric ``C``. Only the tiles on and below the diagonal
are computed (``T (T + 1) / 2`` of ``T^2``); each off-diagonal tile is stored twice, as itself
and transposed. bf16/fp16 in, fp32 accumulate, one rounding at the store.

``momentum_gather_kernel`` / ``apply_update_kernel``: the Muon element-wise work of many
matrices in one launch each, a backend of the core's ``momentum_`` and ``decay_`` +
``apply_orthogonal_`` (:mod:`muon_megatron.core.update`; tests check them against those). A chunk table maps each program to (matrix, first element);
per-matrix pointers come from int64 address tables (multi-tensor apply, as ``torch._foreach``
does in C++), so no per-parameter launch or Python loop runs in the step.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# A short, fixed list: each config compiles once per (m, k) specialisation and the autotuner
# times them on the first call of a shape (Emerging-Optimizers' long list took minutes).
if _INTERPRET:
    _SYRK_CONFIGS = [triton.Config({"BLOCK": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
else:
    _SYRK_CONFIGS = [
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_SYRK_CONFIGS, key=["m", "k", "HAS_C"])
@triton.heuristics({"EVEN": lambda args: args["m"] % args["BLOCK"] == 0 and args["k"] % args["BLOCK_K"] == 0})
@triton.jit
def symmetric_product_kernel(
    A, C, Out, m, k,
    s_ab, s_am, s_ak, s_cb, s_cm, s_cn, s_ob, s_om, s_on,
    alpha, beta, gamma,
    HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
):
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    # Lower-triangular tile index: pid = i (i + 1) / 2 + j with 0 <= j <= i. The float square
    # root can be off by one near perfect squares; the two corrections make it exact.
    i = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    j = pid - i * (i + 1) // 2
    rows_i = i * BLOCK + tl.arange(0, BLOCK)
    rows_j = j * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    base = A + bid * s_ab
    a_ptrs = base + rows_i[:, None] * s_am + ks[None, :] * s_ak
    b_ptrs = base + rows_j[None, :] * s_am + ks[:, None] * s_ak
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for kk in range(0, tl.cdiv(k, BLOCK_K)):
        if EVEN:  # Moonlight's shapes (1408 = 11 x 128, 2048): no masks in the main loop
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = k - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=(rows_i[:, None] < m) & (ks[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(rows_j[None, :] < m) & (ks[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_ak
    acc = acc * alpha
    mask = (rows_i[:, None] < m) & (rows_j[None, :] < m)
    if HAS_C:
        c = tl.load(C + bid * s_cb + rows_i[:, None] * s_cm + rows_j[None, :] * s_cn, mask=mask, other=0.0)
        acc += beta * c.to(tl.float32)
        if i == j:  # + gamma I: folds Newton-Schulz's a X into B (see ns_torch)
            acc += tl.where(rows_i[:, None] == rows_j[None, :], gamma, 0.0)
    out = acc.to(Out.dtype.element_ty)
    o = Out + bid * s_ob
    tl.store(o + rows_i[:, None] * s_om + rows_j[None, :] * s_on, out, mask=mask)
    if i != j:
        mask_t = (rows_j[:, None] < m) & (rows_i[None, :] < m)
        tl.store(o + rows_j[:, None] * s_om + rows_i[None, :] * s_on, tl.trans(out), mask=mask_t)


@triton.jit
def momentum_gather_kernel(
    grad_ptrs, buf_ptrs, dst, dst_off, numels, cols, ld, chunk_matrix, chunk_start, mu,
    NESTEROV: tl.constexpr, PADDED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per matrix: ``buf = mu * buf + g`` (fp32, in place); ``dst = g + mu * buf`` (Nesterov)
    or ``buf``, rounded to ``dst``'s dtype, written into rows of width ``cols`` and stride ``ld``."""
    c = tl.program_id(0)
    t = tl.load(chunk_matrix + c)
    start = tl.load(chunk_start + c)
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(buf_ptrs + t).to(tl.pointer_type(tl.float32))
    numel = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    b = mu * b + g
    tl.store(b_ptr + offs, b, mask=mask)
    if NESTEROV:
        u = g + mu * b
    else:
        u = b
    if PADDED:
        n = tl.load(cols + t)
        r = offs // n
        where = r * tl.load(ld + t) + (offs - r * n)
    else:
        where = offs
    tl.store(dst + tl.load(dst_off + t) + where, u.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def apply_update_kernel(
    param_ptrs, src, src_off, numels, cols, ld, scales, chunk_matrix, chunk_start, lr_wd,
    PADDED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per matrix: ``p = p * (1 - lr * wd) - lr * scale * O`` with ``lr_wd = [lr, 1 - lr * wd]``
    read from device memory (so a captured graph sees the current values)."""
    c = tl.program_id(0)
    t = tl.load(chunk_matrix + c)
    start = tl.load(chunk_start + c)
    p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(tl.float32))
    numel = tl.load(numels + t)
    lr = tl.load(lr_wd)
    decay = tl.load(lr_wd + 1)
    step = lr * tl.load(scales + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    if PADDED:
        n = tl.load(cols + t)
        r = offs // n
        where = r * tl.load(ld + t) + (offs - r * n)
    else:
        where = offs
    o = tl.load(src + tl.load(src_off + t) + where, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    tl.store(p_ptr + offs, p * decay - step * o, mask=mask)


@triton.jit
def momentum_gather_t_kernel(
    grad_ptrs, buf_ptrs, dst, dst_off, rows, cols, ld, chunk_matrix, chunk_start, mu,
    NESTEROV: tl.constexpr, TILE: tl.constexpr,
):
    """:func:`momentum_gather_kernel` for tall matrices, one ``TILE x TILE`` tile per program:
    the Newton-Schulz input is written transposed (wide, row stride ``ld``), so the batched
    products see row-major wide operands and no transposing copy runs (issue 7, run 2: the two
    copies cost ~2.8 ms per 128 expert down-projections). ``tl.trans`` keeps both sides coalesced."""
    c = tl.program_id(0)
    t = tl.load(chunk_matrix + c)
    start = tl.load(chunk_start + c)
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(buf_ptrs + t).to(tl.pointer_type(tl.float32))
    m = tl.load(rows + t)
    n = tl.load(cols + t)
    r0 = start // n
    r = r0 + tl.arange(0, TILE).to(tl.int64)
    cc = (start - r0 * n) + tl.arange(0, TILE).to(tl.int64)
    mask = (r[:, None] < m) & (cc[None, :] < n)
    offs = r[:, None] * n + cc[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    b = mu * b + g
    tl.store(b_ptr + offs, b, mask=mask)
    if NESTEROV:
        u = g + mu * b
    else:
        u = b
    mask_t = (cc[:, None] < n) & (r[None, :] < m)
    where = tl.load(dst_off + t) + cc[:, None] * tl.load(ld + t) + r[None, :]
    tl.store(dst + where, tl.trans(u).to(dst.dtype.element_ty), mask=mask_t)


@triton.jit
def apply_update_t_kernel(
    param_ptrs, src, src_off, rows, cols, ld, scales, chunk_matrix, chunk_start, lr_wd, TILE: tl.constexpr,
):
    """:func:`apply_update_kernel` for tall matrices whose Newton-Schulz output is stored
    transposed (wide, row stride ``ld``); one ``TILE x TILE`` tile per program."""
    c = tl.program_id(0)
    t = tl.load(chunk_matrix + c)
    start = tl.load(chunk_start + c)
    p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(tl.float32))
    m = tl.load(rows + t)
    n = tl.load(cols + t)
    lr = tl.load(lr_wd)
    decay = tl.load(lr_wd + 1)
    step = lr * tl.load(scales + t)
    r0 = start // n
    r = r0 + tl.arange(0, TILE).to(tl.int64)
    cc = (start - r0 * n) + tl.arange(0, TILE).to(tl.int64)
    mask_t = (cc[:, None] < n) & (r[None, :] < m)
    o_t = tl.load(src + tl.load(src_off + t) + cc[:, None] * tl.load(ld + t) + r[None, :], mask=mask_t, other=0.0)
    o = tl.trans(o_t).to(tl.float32)
    mask = (r[:, None] < m) & (cc[None, :] < n)
    offs = r[:, None] * n + cc[None, :]
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    tl.store(p_ptr + offs, p * decay - step * o, mask=mask)
