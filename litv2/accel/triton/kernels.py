"""The Triton kernels of the acceleration layer (imports triton only; launched by :mod:`.ops`).

Activations are rows of a contiguous channels-last ``(B, H, W, C)`` map: row ``q`` of ``B*H*W`` holds ``C``
channels. Every kernel loads its inputs in their own dtype, computes in fp32 and stores in the output's dtype;
offsets are 64-bit. Reductions over rows (weight and bias gradients) are written per program and summed by the
launcher, so results do not depend on scheduling (no atomics).
"""
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


# ---- residual add + LayerNorm -----------------------------------------------------------------------------------

@triton.jit
def add_layer_norm_rows(X, R, W, B, Y, Z, Mean, Rstd, rows, offs, row_ok, mask, cols, col_ok, C, eps):
    """The body of :func:`add_layer_norm_fwd` for the rows ``rows`` (element offsets ``offs``): stores y, z, mean and
    1/std; returns z in fp32 (zero where masked)."""
    y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    y = y.to(Y.dtype.element_ty)
    tl.store(Y + offs, y, mask=mask)
    y = y.to(tl.float32)
    mean = tl.sum(y, axis=1) / C
    d = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    z = tl.where(mask, d * rstd[:, None] * w[None, :] + b[None, :], 0.0)
    tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    return z


@triton.jit
def add_layer_norm_fwd(X, R, W, B, Y, Z, Mean, Rstd, M, C, eps,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``y = x + r`` (stored in Y's dtype, as ``x + r`` rounds it), ``z = LayerNorm(y) * w + b``; fp32 mean and
    1/std per row. One program: BLOCK_M whole rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    add_layer_norm_rows(X, R, W, B, Y, Z, Mean, Rstd, rows, offs, row_ok, mask, cols, col_ok, C, eps)


@triton.jit
def layer_norm_bwd_tiles(DY, DZ, DPool, Y, W, Mean, Rstd, DX, PartW, PartB, M, C, H, Wd, Hg, Wg,
                         S: tl.constexpr, HAS_DY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The body of :func:`add_layer_norm_bwd`. ``S > 0``: z's gradient also takes ``DPool / S^2`` of the row's
    ``S x S`` window of the ``(B, H, Wd)`` map (``Hg x Wg`` windows an image): an average pool's backward."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DZ + offs, mask=mask, other=0.0).to(tl.float32)
        if S > 0:
            win = (rows // (H * Wd) * Hg + rows % (H * Wd) // Wd // S) * Wg + rows % Wd // S
            dz += tl.load(DPool + win.to(tl.int64)[:, None] * C + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32) / (S * S)
        yhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        g = dz * w[None, :]
        c1 = tl.sum(yhat * g, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - (yhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DY:
            dx += tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        acc_w += tl.sum(dz * yhat, axis=0)
        acc_b += tl.sum(dz, axis=0)
    tl.store(PartW + pid * C + cols, acc_w, mask=col_ok)
    tl.store(PartB + pid * C + cols, acc_b, mask=col_ok)


@triton.jit
def add_layer_norm_bwd(DY, DZ, Y, W, Mean, Rstd, DX, PartW, PartB, M, C,
                       HAS_DY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gradient of ``y = x + r`` (the same for x and r): ``dy + LayerNorm'(dz)``, stored in DX; this program's
    sums of ``dz * yhat`` and ``dz`` over its rows in ``PartW[pid]``, ``PartB[pid]``. Programs take every
    ``num_programs``-th tile of BLOCK_M rows."""
    layer_norm_bwd_tiles(DY, DZ, DZ, Y, W, Mean, Rstd, DX, PartW, PartB, M, C, 1, 1, 1, 1, 0, HAS_DY, BLOCK_M, BLOCK_C)


# ---- 3x3 depthwise conv (+ bias, + exact GELU) -------------------------------------------------------------------

@triton.jit
def _tap(X, q64, h, w, q_ok, cols, col_ok, H, Wd, C, dh, dw):
    """The ``(dh, dw)`` neighbours of positions ``q64`` (at ``h``, ``w`` of a ``(B, H, Wd, C)`` map), channels
    ``cols``, in fp32; zero off the map."""
    ok = q_ok & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < Wd)
    return tl.load(X + (q64 + dh * Wd + dw)[:, None] * C + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _conv3x3(X, W, Bias, q64, h, w, q_ok, cols, col_ok, H, Wd, C,
             HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``conv3x3(X) + bias`` per channel at positions ``q64``, channels ``cols``, in fp32 (FLIP: the kernel
    mirrored)."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k in tl.static_range(9):
        dh = k // 3 - 1
        dw = k % 3 - 1
        if FLIP:
            dh = -dh
            dw = -dw
        acc += _tap(X, q64, h, w, q_ok, cols, col_ok, H, Wd, C, dh, dw) * tl.load(
            W + cols * 9 + k, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def dwconv3x3(X, W, Bias, Out, N, H, Wd, C,
              HAS_BIAS: tl.constexpr, GELU: tl.constexpr, FLIP: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Out = GELU(conv3x3(X) + bias)`` per channel with zero padding; W is ``(C, 9)``. FLIP runs the transposed
    conv (the kernel mirrored: the input gradient). One program: BLOCK_P positions of the ``N = B*H*W`` x BLOCK_C
    channels."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok = q < N
    col_ok = cols < C
    h = (q % (H * Wd)) // Wd
    w = q % Wd
    q64 = q.to(tl.int64)
    acc = _conv3x3(X, W, Bias, q64, h, w, q_ok, cols, col_ok, H, Wd, C, HAS_BIAS, FLIP, BLOCK_P, BLOCK_C)
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * _SQRT1_2))
    tl.store(Out + q64[:, None] * C + cols[None, :], acc.to(Out.dtype.element_ty),
             mask=q_ok[:, None] & col_ok[None, :])


@triton.jit
def dwconv3x3_gelu_bwd(DG, X, W, Bias, DY, PartW, PartB, N, H, Wd, C,
                       HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of ``g = GELU(conv3x3(x) + bias)`` up to the conv: recomputes the conv output ``y`` from X, stores
    ``dy = dg * GELU'(y)`` in DY, and this program's sums over its positions of ``dy * x[tap]`` per tap and of
    ``dy`` in ``PartW[pid, tap]``, ``PartB[pid]`` (taps held in a ``(16, BLOCK_C)`` tile, 9-15 unused). Programs take
    every ``num_programs(0)``-th tile of BLOCK_P positions, for the channels ``program_id(1)``."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    taps = tl.arange(0, 16)
    acc_w = tl.zeros([16, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(N, BLOCK_P), tl.num_programs(0)):
        q = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        q_ok = q < N
        h = (q % (H * Wd)) // Wd
        w = q % Wd
        q64 = q.to(tl.int64)
        y = _conv3x3(X, W, Bias, q64, h, w, q_ok, cols, col_ok, H, Wd, C, HAS_BIAS, False, BLOCK_P, BLOCK_C)
        mask = q_ok[:, None] & col_ok[None, :]
        offs = q64[:, None] * C + cols[None, :]
        dg = tl.load(DG + offs, mask=mask, other=0.0).to(tl.float32)
        dy = dg * (0.5 * (1.0 + tl.math.erf(y * _SQRT1_2)) + y * _INV_SQRT_2PI * tl.exp(-0.5 * y * y))
        tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=mask)
        acc_b += tl.sum(dy, axis=0)
        for k in tl.static_range(9):  # the taps again (from cache): nine tiles would not fit in registers
            x = _tap(X, q64, h, w, q_ok, cols, col_ok, H, Wd, C, k // 3 - 1, k % 3 - 1)
            acc_w += tl.where(taps[:, None] == k, tl.sum(dy * x, axis=0)[None, :], 0.0)
    tl.store(PartW + (pid * 9 + taps[:, None]) * C + cols[None, :], acc_w, mask=(taps[:, None] < 9) & col_ok[None, :])
    tl.store(PartB + pid * C + cols, acc_b, mask=col_ok)
