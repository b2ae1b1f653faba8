"""The Triton kernels of HiLo attention (launched by :mod:`.hilo`), and the residual add + LayerNorm that also
writes the ``s x s`` average-pooled map Lo-Fi's keys and values come from.

Layouts (rows of contiguous channels-last maps, ``N = H*W`` positions per image, ``d`` = head_dim):

* ``P`` ``(B, H, W, 3*Dh + Dl)``: the one GEMM of ``[h_qkv; l_q]``: Hi-Fi q, k, v of head ``j`` at channels
  ``j*d``, ``Dh + j*d``, ``2*Dh + j*d``; Lo-Fi q of head ``j`` at ``3*Dh + j*d``.
* ``KV`` ``(B, Hg, Wg, 2*Dl)``: ``l_kv`` on the pooled map (on the map itself for ``s = 1``): k at ``j*d``, v at
  ``Dl + j*d``.
* ``Out`` ``(B, H, W, Dh + Dl)``: ``[Hi-Fi, Lo-Fi]``, each branch's heads side by side; ``Lse`` ``(B, H, W, heads)``
  fp32, Hi-Fi heads first.

Hi-Fi windows have ``s*s`` tokens: a program takes BLOCK_R (window, token) rows of one head and loops over the
window's ``s*s`` keys with broadcast-multiply-sums (no ``tl.dot``, whose operands need 16 rows). Positions of the
bottom/right padding are never stored: their keys and values are the projection's bias (the layer's input is zero
there), loaded where the mask is off. Lo-Fi is flash attention with ``tl.dot`` (IEEE fp32 products for fp32
inputs). Softmax statistics are fp32; backward kernels recompute the probabilities from the saved logsumexp.
Reductions over rows are written per program and summed by the launcher (no atomics).
"""
import triton
import triton.language as tl

from .kernels import add_layer_norm_rows, layer_norm_bwd_tiles


# ---- Hi-Fi: window attention --------------------------------------------------------------------------------------

@triton.jit
def _window_rows(r, R, H, W, Hg, Wg, S: tl.constexpr):
    """Row ``r`` of the window-major order (image, window row, window column, token): its image, window origin
    and whether it exists."""
    t = r % (S * S)
    win = r // (S * S)
    gx = win % Wg
    gy = (win // Wg) % Hg
    b = win // (Wg * Hg)
    return b, gy * S, gx * S, t // S, t % S, r < R


@triton.jit
def hifi_fwd(P, Bias, Out, Lse, R, H, W, Hg, Wg, Cp, Co, Dh, D, HEADS, scale,
             S: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Softmax(q k^T * scale) v within each ``S x S`` window for Hi-Fi head ``program_id(1)``; one program: BLOCK_R
    rows, online softmax over the window's keys."""
    head = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b, y0, x0, ty, tx, r_ok = _window_rows(r, R, H, W, Hg, Wg, S)
    ok = r_ok & (y0 + ty < H) & (x0 + tx < W)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    row = ((b * H + y0 + ty) * W + x0 + tx).to(tl.int64)
    q = tl.load(P + row[:, None] * Cp + head * D + cols[None, :], mask=ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    if HAS_BIAS:  # the padding's keys and values, rounded as the projection's output is
        bk = tl.load(Bias + Dh + head * D + cols, mask=c_ok, other=0.0).to(P.dtype.element_ty).to(tl.float32)
        bv = tl.load(Bias + 2 * Dh + head * D + cols, mask=c_ok, other=0.0).to(P.dtype.element_ty).to(tl.float32)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(S * S):
        k_ok = r_ok & (y0 + j // S < H) & (x0 + j % S < W)
        krow = ((b * H + y0 + j // S) * W + x0 + j % S).to(tl.int64)
        kmask = k_ok[:, None] & c_ok[None, :]
        k = tl.load(P + krow[:, None] * Cp + Dh + head * D + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(P + krow[:, None] * Cp + 2 * Dh + head * D + cols[None, :], mask=kmask,
                    other=0.0).to(tl.float32)
        if HAS_BIAS:
            k = tl.where(k_ok[:, None], k, bk[None, :])
            v = tl.where(k_ok[:, None], v, bv[None, :])
        s = tl.sum(q * k, axis=1) * scale
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
    tl.store(Out + row[:, None] * Co + head * D + cols[None, :], (acc / l[:, None]).to(Out.dtype.element_ty),
             mask=ok[:, None] & c_ok[None, :])
    tl.store(Lse + row * HEADS + head, m + tl.log(l), mask=ok)


@triton.jit
def hifi_bwd(P, Bias, Out, DOut, Lse, DP, PartB, R, H, W, Hg, Wg, Cp, Co, Dh, D, HEADS, scale,
             S: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradients of :func:`hifi_fwd` for Hi-Fi head ``program_id(1)``: each row as a query (dq, over the window's
    keys) and as a key (dk, dv, over the window's queries), stored in DP; a padding row's dk and dv (the bias's
    gradient) summed over this program's rows in ``PartB[pid, 0:Dh]`` (k) and ``PartB[pid, Dh:2*Dh]`` (v)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    b, y0, x0, ty, tx, r_ok = _window_rows(r, R, H, W, Hg, Wg, S)
    ok = r_ok & (y0 + ty < H) & (x0 + tx < W)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    mask = ok[:, None] & c_ok[None, :]
    row = ((b * H + y0 + ty) * W + x0 + tx).to(tl.int64)
    base = row[:, None] * Cp + head * D + cols[None, :]
    q = tl.load(P + base, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(P + base + Dh, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(P + base + 2 * Dh, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bk = tl.load(Bias + Dh + head * D + cols, mask=c_ok, other=0.0).to(P.dtype.element_ty).to(tl.float32)
        bv = tl.load(Bias + 2 * Dh + head * D + cols, mask=c_ok, other=0.0).to(P.dtype.element_ty).to(tl.float32)
        k = tl.where(ok[:, None], k, bk[None, :])
        v = tl.where(ok[:, None], v, bv[None, :])
    obase = row[:, None] * Co + head * D + cols[None, :]
    do = tl.load(DOut + obase, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(do * tl.load(Out + obase, mask=mask, other=0.0).to(tl.float32), axis=1)
    lse = tl.load(Lse + row * HEADS + head, mask=ok, other=0.0)
    dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    dk = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(S * S):
        j_ok = r_ok & (y0 + j // S < H) & (x0 + j % S < W)
        jrow = ((b * H + y0 + j // S) * W + x0 + j % S).to(tl.int64)
        jmask = j_ok[:, None] & c_ok[None, :]
        jbase = jrow[:, None] * Cp + head * D + cols[None, :]
        # token j as the key of this row's query
        kj = tl.load(P + jbase + Dh, mask=jmask, other=0.0).to(tl.float32)
        vj = tl.load(P + jbase + 2 * Dh, mask=jmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            kj = tl.where(j_ok[:, None], kj, bk[None, :])
            vj = tl.where(j_ok[:, None], vj, bv[None, :])
        p = tl.where(ok, tl.exp(tl.sum(q * kj, axis=1) * scale - lse), 0.0)
        dq += (p * (tl.sum(do * vj, axis=1) - delta))[:, None] * kj
        # token j as a query of this row's key (a padding query has no output: no gradient)
        qj = tl.load(P + jbase, mask=jmask, other=0.0).to(tl.float32)
        ojbase = jrow[:, None] * Co + head * D + cols[None, :]
        doj = tl.load(DOut + ojbase, mask=jmask, other=0.0).to(tl.float32)
        deltaj = tl.sum(doj * tl.load(Out + ojbase, mask=jmask, other=0.0).to(tl.float32), axis=1)
        lsej = tl.load(Lse + jrow * HEADS + head, mask=j_ok, other=0.0)
        pj = tl.where(j_ok, tl.exp(tl.sum(qj * k, axis=1) * scale - lsej), 0.0)
        dv += pj[:, None] * doj
        dk += (pj * (tl.sum(doj * v, axis=1) - deltaj))[:, None] * qj
    dq *= scale
    dk *= scale
    tl.store(DP + base, dq.to(DP.dtype.element_ty), mask=mask)
    tl.store(DP + base + Dh, dk.to(DP.dtype.element_ty), mask=mask)
    tl.store(DP + base + 2 * Dh, dv.to(DP.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        pad = (r_ok & ~ok)[:, None]
        tl.store(PartB + pid * 2 * Dh + head * D + cols, tl.sum(tl.where(pad, dk, 0.0), axis=0), mask=c_ok)
        tl.store(PartB + pid * 2 * Dh + Dh + head * D + cols, tl.sum(tl.where(pad, dv, 0.0), axis=0), mask=c_ok)


# ---- Lo-Fi: every query against the pooled keys -------------------------------------------------------------------

@triton.jit
def _dot(a, b, F32: tl.constexpr, TF32: tl.constexpr):
    """``a @ b`` in fp32; F32: on operands upcast to fp32 first (Triton's interpreter multiplies bf16 operands as
    their integer bits); TF32: fp32 operands rounded to TF32 (torch's allow_tf32), else IEEE fp32 products."""
    if F32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif TF32:
        c = tl.dot(a, b, input_precision="tf32")
    else:
        c = tl.dot(a, b, input_precision="ieee")
    return c


@triton.jit
def _kv_tile(KV, b, M, kj, Ckv, Dl, head, D, cols, c_ok):
    """Lo-Fi keys ``kj`` of image ``b``, head ``head``: their offsets in KV, mask, k and v."""
    kbase = (b * M + kj).to(tl.int64)[:, None] * Ckv + head * D + cols[None, :]
    kmask = (kj < M)[:, None] & c_ok[None, :]
    return kbase, kmask, tl.load(KV + kbase, mask=kmask, other=0.0), tl.load(KV + kbase + Dl, mask=kmask, other=0.0)


@triton.jit
def _q_tile_grad(P, Out, DOut, Lse, b, N, qi, Cp, Co, q_off, o_off, HEADS, h_off, head, D, cols, c_ok):
    """Lo-Fi queries ``qi`` of image ``b``, head ``head``, for the backward pass: their offsets in P and mask, q, the
    output's gradient ``do``, ``delta = rowsum(do * out)`` and the saved logsumexp."""
    q_ok = qi < N
    qrow = (b * N + qi).to(tl.int64)
    qmask = q_ok[:, None] & c_ok[None, :]
    qbase = qrow[:, None] * Cp + q_off + head * D + cols[None, :]
    obase = qrow[:, None] * Co + o_off + head * D + cols[None, :]
    do = tl.load(DOut + obase, mask=qmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * tl.load(Out + obase, mask=qmask, other=0.0).to(tl.float32), axis=1)
    lse = tl.load(Lse + qrow * HEADS + h_off + head, mask=q_ok, other=0.0)
    return qbase, qmask, tl.load(P + qbase, mask=qmask, other=0.0), do, delta, lse


@triton.jit
def lofi_fwd(P, KV, Out, Lse, N, M, Cp, Ckv, Co, q_off, o_off, Dl, D, HEADS, h_off, L, scale,
             BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
             TF32: tl.constexpr):
    """Flash attention of BLOCK_Q queries (of ``N``) of image and Lo-Fi head ``program_id(1)`` (``b * L + head``)
    against the image's ``M`` keys, BLOCK_K at a time."""
    bh = tl.program_id(1)
    b = bh // L
    head = bh % L
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qi < N
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    qrow = (b * N + qi).to(tl.int64)
    q = tl.load(P + qrow[:, None] * Cp + q_off + head * D + cols[None, :], mask=q_ok[:, None] & c_ok[None, :],
                other=0.0)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_K):
        kj = start + tl.arange(0, BLOCK_K)
        _, _, k, v = _kv_tile(KV, b, M, kj, Ckv, Dl, head, D, cols, c_ok)
        s = _dot(q, tl.trans(k), DOT_F32, TF32) * scale
        s = tl.where((kj < M)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, TF32)
        m = m_new
    tl.store(Out + qrow[:, None] * Co + o_off + head * D + cols[None, :], (acc / l[:, None]).to(Out.dtype.element_ty),
             mask=q_ok[:, None] & c_ok[None, :])
    tl.store(Lse + qrow * HEADS + h_off + head, m + tl.log(l), mask=q_ok)


@triton.jit
def lofi_bwd_dkdv(P, KV, Out, DOut, Lse, DKV, N, M, Cp, Ckv, Co, q_off, o_off, Dl, D, HEADS, h_off, L, scale,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                  TF32: tl.constexpr):
    """dk and dv of BLOCK_K keys of image and Lo-Fi head ``program_id(1)``, over all ``N`` queries, BLOCK_Q at a
    time (probabilities from the saved logsumexp), stored in DKV."""
    bh = tl.program_id(1)
    b = bh // L
    head = bh % L
    kj = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    kbase, kmask, k, v = _kv_tile(KV, b, M, kj, Ckv, Dl, head, D, cols, c_ok)
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_Q):
        qi = start + tl.arange(0, BLOCK_Q)
        _, _, q, do, delta, lse = _q_tile_grad(P, Out, DOut, Lse, b, N, qi, Cp, Co, q_off, o_off, HEADS, h_off, head,
                                              D, cols, c_ok)
        s = _dot(q, tl.trans(k), DOT_F32, TF32) * scale
        p = tl.where((qi < N)[:, None] & (kj < M)[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_F32, TF32)
        dp = _dot(do, tl.trans(v), DOT_F32, TF32)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_F32, TF32)
    tl.store(DKV + kbase, (dk * scale).to(DKV.dtype.element_ty), mask=kmask)
    tl.store(DKV + kbase + Dl, dv.to(DKV.dtype.element_ty), mask=kmask)


@triton.jit
def lofi_bwd_dq(P, KV, Out, DOut, Lse, DP, N, M, Cp, Ckv, Co, q_off, o_off, Dl, D, HEADS, h_off, L, scale,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                TF32: tl.constexpr):
    """dq of BLOCK_Q queries of image and Lo-Fi head ``program_id(1)`` over the image's ``M`` keys, stored in DP
    at Lo-Fi q's channels."""
    bh = tl.program_id(1)
    b = bh // L
    head = bh % L
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    qbase, qmask, q, do, delta, lse = _q_tile_grad(P, Out, DOut, Lse, b, N, qi, Cp, Co, q_off, o_off, HEADS, h_off,
                                                   head, D, cols, c_ok)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_K):
        kj = start + tl.arange(0, BLOCK_K)
        _, _, k, v = _kv_tile(KV, b, M, kj, Ckv, Dl, head, D, cols, c_ok)
        s = _dot(q, tl.trans(k), DOT_F32, TF32) * scale
        p = tl.where((qi < N)[:, None] & (kj < M)[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_F32, TF32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_F32, TF32)
    tl.store(DP + qbase, (dq * scale).to(DP.dtype.element_ty), mask=qmask)


# ---- residual add + LayerNorm + s x s average pool -----------------------------------------------------------------

@triton.jit
def add_layer_norm_pool_fwd(X, R, W, B, Y, Z, Pool, Mean, Rstd, G, H, Wd, Hg, Wg, C, eps,
                            S: tl.constexpr, S2P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """``add_layer_norm_fwd`` over BLOCK_G whole ``S x S`` windows (of ``G = B*Hg*Wg``; ``S2P`` rows each, the
    first ``S*S`` used), which also writes each window's mean of ``z`` (the padding's zeros counted) in Pool's
    dtype."""
    i = tl.arange(0, BLOCK_G * S2P)
    g = tl.program_id(0) * BLOCK_G + i // S2P
    t = i % S2P
    h = (g // Wg) % Hg * S + t // S
    w = g % Wg * S + t % S
    row_ok = (g < G) & (t < S * S) & (h < H) & (w < Wd)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows = ((g // (Wg * Hg) * H + h) * Wd + w).to(tl.int64)
    offs = rows[:, None] * C + cols[None, :]
    z = add_layer_norm_rows(X, R, W, B, Y, Z, Mean, Rstd, rows, offs, row_ok, mask, cols, col_ok, C, eps)
    pooled = tl.sum(tl.reshape(z, (BLOCK_G, S2P, BLOCK_C)), axis=1) / (S * S)
    gw = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(Pool + gw.to(tl.int64)[:, None] * C + cols[None, :], pooled.to(Pool.dtype.element_ty),
             mask=(gw < G)[:, None] & col_ok[None, :])


@triton.jit
def add_layer_norm_pool_bwd(DY, DZ, DPool, Y, W, Mean, Rstd, DX, PartW, PartB, M, C, H, Wd, Hg, Wg,
                            S: tl.constexpr, HAS_DY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``add_layer_norm_bwd`` with z's gradient ``dz + dpool / S^2`` of the row's window (the pool's backward)."""
    layer_norm_bwd_tiles(DY, DZ, DPool, Y, W, Mean, Rstd, DX, PartW, PartB, M, C, H, Wd, Hg, Wg, S, HAS_DY, BLOCK_M,
                         BLOCK_C)
