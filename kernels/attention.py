"""Fused causal attention in Triton: flash-attention-2's forward and backward, with dropout.

Algorithm (Dao, "FlashAttention-2", 2023):
* forward - one program per (query block, batch*head). It streams key/value blocks through an
  online softmax (running max ``m``, running sum ``l``), so the (T x T) score matrix never exists.
  Causal block skipping: key blocks above the diagonal are never loaded and only the blocks on the
  diagonal are masked. Scores are kept in base 2 (``exp2`` with log2(e) folded into the scale).
  The per-row log-sum-exp (natural log) is saved for backward; for fp16/bf16 the output is
  also stored in fp32 (``O32``, see Precision).
* backward - ``attn_bwd_preprocess`` computes delta = rowsum(dO * O); ``attn_bwd_dkdv`` gives each
  program one key block and accumulates dK, dV over the query blocks at or below the diagonal;
  ``attn_bwd_dq`` gives each program one query block and accumulates dQ over key blocks. Both
  rebuild the probabilities from the saved log-sum-exp. No atomics, no stored probabilities.
* dropout - counter-based: the keep decision for score (row, col) of head ``bh`` is Philox(seed;
  counters row*T + col, bh), so backward regenerates exactly the forward's mask. The normaliser
  sums the probabilities before dropout (as ``F.dropout(softmax(s)) @ v`` does).

Limits: any T >= 1 (boundary blocks masked); head dim D <= 128, padded to the next power of two
(BLOCK_D) with masked loads and stores; q/k/v/o/dO/dq/dk/dv take arbitrary strides; with dropout
T <= 46340 (the row*T + col counter is 32-bit).

Precision: fp32 accumulation and softmax statistics for every input dtype. fp16/bf16 feed
``tl.dot`` natively on GPU; fp32 uses ``DOT_PRECISION`` ("ieee", or "tf32" when the user opts in).
tf32 dot operands are rounded to nearest by the kernels (``_dot_operand``, also dO in delta):
tensor cores would drop their low 13 bits, a biased truncation that, emulated, gave up to 9x
the error of torch's tf32 matmuls (which round); the interpreter, whose dots are exact fp32,
then computes what a GPU does.
The backward's dS = P * (dP - delta) cancels where one key dominates a row (dP - delta is then
about (1 - P) times dP), so delta = rowsum(dO * O) needs O unrounded: from a bf16 O its error
(eps_bf16 * |dO||O|) swamps dS and made dK/dQ several times (up to ~100x) plain PyTorch's error on
peaked softmaxes. For fp16/bf16 the forward therefore also writes the fp32 accumulator to O32
(``STORE_O32``), and the backward reads delta from it. Memory: 4 bytes per output element
(B*H*T*D*4, twice the fp16/bf16 output), kept from forward to backward instead of O; nothing
extra for fp32, whose O is the fp32 value. What remains: rows where one key takes all but
~1e-6 of the probability get dS from dP - delta in fp32, whose rounding (~2**-24 of
|dO||V|) then exceeds the true dS; plain PyTorch, forming both terms from the same rounded
dP, cancels exactly there (flash-attention-2's separate delta has the same limit).
Under the Triton interpreter bf16 arithmetic is unreliable, so ``UPCAST`` turns every loaded tile
into fp32 right after ``tl.load``.

Launch configs: ``FWD_CONFIGS`` / ``BWD_CONFIGS`` are what the launchers autotune over on GPU;
``INTERPRET_*`` is the single config used under the interpreter. ``aot_configs()`` lists what
fastgpt.tools.aot compiles for sm_80/sm_90 (see its docstring).
"""

import itertools

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)     # softmax runs in base 2: exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)       # and back: log(x) = log2(x) * LN2

# GPU launch configs, by padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV needs BLOCK_N % BLOCK_M == 0, so that the
# diagonal of the causal mask falls on whole inner blocks.
FWD_CONFIGS = {
    16: [(128, 64, 4, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (64, 64, 4, 3)],
    64: [(128, 64, 8, 3), (64, 64, 4, 3)],
    # 128x64 (8 warps) spills on sm_80 without dropout; 128x32 is flash-attention-2's A100 tile
    128: [(128, 32, 8, 3), (64, 64, 4, 3)],
}
# Backward: (BLOCK_M, BLOCK_N, num_warps, num_stages); dK/dV uses them as given (small query
# blocks streamed past a large key block), dQ uses them swapped (BLOCK_N, BLOCK_M).
# Philox for dropout is register-hungry: the larger tiles get 8 warps so that nothing spills.
# Spills depend on ptxas' heuristics, not only on register pressure (a no-dropout variant can
# spill where the dropout one does not), so tests/test_aot.py compiles both variants.
BWD_CONFIGS = {
    16: [(32, 128, 4, 3), (32, 64, 4, 3)],
    32: [(32, 128, 8, 3), (32, 64, 4, 3)],
    64: [(32, 128, 8, 3), (32, 64, 4, 3)],
    128: [(32, 64, 8, 2), (16, 64, 4, 2)],
}
# float32 tiles take twice the shared memory and registers (IEEE fp32 dots run on FMA units):
# one small config per head dim (head dim 32 backward: 2 stages spill on sm_80, 3 do not).
FP32_FWD_CONFIGS = {16: [(64, 32, 4, 2)], 32: [(64, 32, 4, 2)], 64: [(64, 32, 8, 2)],
                    128: [(32, 16, 8, 2)]}
FP32_BWD_CONFIGS = {16: [(16, 32, 4, 2)], 32: [(16, 32, 4, 3)], 64: [(16, 32, 8, 2)],
                    128: [(16, 32, 8, 2)]}
INTERPRET_FWD = (32, 16, 4, 1)
INTERPRET_BWD = (16, 32, 4, 1)


@triton.jit
def _program_block(H, T, BLOCK: tl.constexpr):
    """Where a program of the (T blocks, B*H) grid works: (start, offs, offs < T, bh, b, h) for
    its BLOCK positions offs = start + [0, BLOCK) along T in head bh = b*H + h. b and h are int64,
    as they scale strides."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = start + tl.arange(0, BLOCK)
    return start, offs, offs < T, bh, b, h


@triton.jit
def _seed_and_scale(SEED, sm_scale, DROPOUT: tl.constexpr):
    """(dropout seed, or 0 without dropout; score scale in base 2)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    return seed, sm_scale * LOG2E


@triton.jit
def _dropout_keep(seed, bh, rows, cols, T, dropout_p):
    """True where score (rows, cols) of head bh survives dropout (broadcasts rows against cols)."""
    counter = rows * T + cols
    r, _, _, _ = tl.philox(seed, counter, tl.zeros_like(counter) + bh, 0, 0)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _dot_operand(x, DOT_PRECISION: tl.constexpr):
    """x as a tl.dot input: for tf32 dots, fp32 rounded to the nearest tf32 (ties away from zero).
    Tensor cores drop the 13 low bits instead, which biases every product toward zero."""
    if DOT_PRECISION == "tf32":
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A tile that only feeds tl.dot."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return _dot_operand(x, DOT_PRECISION)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, skt, svt, rows, offs_n, dmask_kT, dmask_v,
               bh, T, lo, hi, qk_scale, dropout_p, seed,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_bounds = cols < T
        kT = _load(k_ptr + cols[None, :] * skt, dmask_kT & in_bounds[None, :], UPCAST,
                   DOT_PRECISION)                                                       # (D, N)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale                   # (M, N)
        if MASKED:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = _load(v_ptr + cols[:, None] * svt, dmask_v & in_bounds[:, None], UPCAST,
                  DOT_PRECISION)                                                        # (N, D)
        p = _dot_operand(p.to(v.dtype), DOT_PRECISION)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(Q, K, V, O, O32, LSE, SEED,
             sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
             H, T, T_BUCKET, sm_scale, dropout_p,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr, STORE_O32: tl.constexpr):
    """out (B, H, T, D), lse (B*H, T) for BLOCK_M rows of one head. T_BUCKET: autotune key.
    STORE_O32: also store the fp32 output in O32 (same strides as O) for the backward's delta."""
    start_m, rows, row_ok, bh, b, h = _program_block(H, T, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    q = _load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :] * sqd,
              row_ok[:, None] & dmask[None, :], UPCAST, DOT_PRECISION)                   # (M, D)
    k_ptr = K + b * skb + h * skh + offs_d[:, None] * skd
    v_ptr = V + b * svb + h * svh + offs_d[None, :] * svd
    seed, qk_scale = _seed_and_scale(SEED, sm_scale, DROPOUT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # key blocks wholly below the diagonal: no mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, skt, svt, rows, offs_n,
                               dmask[:, None], dmask[None, :], bh, T, 0, start_m, qk_scale,
                               dropout_p, seed, BLOCK_N, False, DROPOUT, UPCAST, DOT_PRECISION)
    # key blocks on the diagonal: causal mask (blocks above it are skipped)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, skt, svt, rows, offs_n,
                               dmask[:, None], dmask[None, :], bh, T, start_m,
                               tl.minimum(start_m + BLOCK_M, T), qk_scale, dropout_p, seed,
                               BLOCK_N, True, DROPOUT, UPCAST, DOT_PRECISION)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + bh.to(tl.int64) * T + rows, lse, mask=row_ok)
    o_offs = b * sob + h * soh + rows[:, None] * sot + offs_d[None, :] * sod
    tl.store(O + o_offs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
    if STORE_O32:
        tl.store(O32 + o_offs, acc, mask=row_ok[:, None] & dmask[None, :])


@triton.jit
def attn_bwd_preprocess(O, DO, DELTA, sob, soh, sot, sod, sdb, sdh, sdt, sdd, H, T,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """delta[bh, t] = sum_d dO * O, in fp32; O is the forward's fp32 output (O32) for fp16/bf16.
    dO is rounded as the dots that form dP round it, so that rowsum(P * dP) - delta cancels."""
    _, rows, row_ok, bh, b, h = _program_block(H, T, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :] * sod, mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :] * sdd, mask=mask,
                 other=0.0).to(tl.float32)
    do = _dot_operand(do, DOT_PRECISION)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqt, sdt, cols, offs_m,
                    dmask_qT, dmask_do, bh, T, lo, hi, qk_scale, dropout_p, seed,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        qT = _load(q_ptr + rows[None, :] * sqt, dmask_qT & row_ok[None, :], UPCAST,
                   DOT_PRECISION)                                                       # (D, M)
        do = _load(do_ptr + rows[:, None] * sdt, dmask_do & row_ok[:, None], UPCAST,
                   DOT_PRECISION)                                                       # (M, D)
        # rows past T get lse = +inf, hence probability 0
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale                    # (N, M)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            pT = tl.where(rows[None, :] >= cols[:, None], pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)                    # (N, M)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[None, :], cols[:, None], T, dropout_p)
            pdT = tl.where(keep, pT / (1.0 - dropout_p), 0.0)
            dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
        else:
            pdT = pT
        pdT = _dot_operand(pdT.to(do.dtype), DOT_PRECISION)
        dv = tl.dot(pdT, do, dv, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dsT = _dot_operand(dsT.to(qT.dtype), DOT_PRECISION)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, SEED,
                  sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                  sdb, sdh, sdt, sdd, sgb, sgh, sgt, sgd,
                  H, T, T_BUCKET, sm_scale, dropout_p,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """dK, dV for one block of BLOCK_N keys; sg*: strides of DK and DV (same layout)."""
    start_n, cols, col_ok, bh, b, h = _program_block(H, T, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    tile_mask = col_ok[:, None] & dmask[None, :]
    k = _load(K + b * skb + h * skh + cols[:, None] * skt + offs_d[None, :] * skd, tile_mask,
              UPCAST, DOT_PRECISION)                                                    # (N, D)
    v = _load(V + b * svb + h * svh + cols[:, None] * svt + offs_d[None, :] * svd, tile_mask,
              UPCAST, DOT_PRECISION)
    q_ptr = Q + b * sqb + h * sqh + offs_d[:, None] * sqd
    do_ptr = DO + b * sdb + h * sdh + offs_d[None, :] * sdd
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = DELTA + bh.to(tl.int64) * T
    seed, qk_scale = _seed_and_scale(SEED, sm_scale, DROPOUT)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query blocks on the diagonal, masked; then every query block below it
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqt, sdt, cols,
                             offs_m, dmask[:, None], dmask[None, :], bh, T, start_n, diag_end,
                             qk_scale, dropout_p, seed, BLOCK_M, True, DROPOUT, UPCAST,
                             DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqt, sdt, cols,
                             offs_m, dmask[:, None], dmask[None, :], bh, T, diag_end, T,
                             qk_scale, dropout_p, seed, BLOCK_M, False, DROPOUT, UPCAST,
                             DOT_PRECISION)
    out = b * sgb + h * sgh + cols[:, None] * sgt + offs_d[None, :] * sgd
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, skt, svt, rows, offs_n, dmask_T,
                  bh, T, lo, hi, qk_scale, dropout_p, seed,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_bounds = (cols < T)[None, :]
        kT = _load(k_ptr + cols[None, :] * skt, dmask_T & in_bounds, UPCAST,
                   DOT_PRECISION)                                                       # (D, N)
        vT = _load(v_ptr + cols[None, :] * svt, dmask_T & in_bounds, UPCAST,
                   DOT_PRECISION)                                                       # (D, N)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale                     # (M, N)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(cols[None, :] <= rows[:, None], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)                               # (M, N)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        ds = _dot_operand(ds.to(kT.dtype), DOT_PRECISION)
        dq = tl.dot(ds, tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, SEED,
                sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                sdb, sdh, sdt, sdd, sgb, sgh, sgt, sgd,
                H, T, T_BUCKET, sm_scale, dropout_p,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """dQ for one block of BLOCK_M queries; sg*: strides of DQ."""
    start_m, rows, row_ok, bh, b, h = _program_block(H, T, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    tile_mask = row_ok[:, None] & dmask[None, :]
    q = _load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :] * sqd, tile_mask,
              UPCAST, DOT_PRECISION)                                                    # (M, D)
    do = _load(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :] * sdd, tile_mask,
               UPCAST, DOT_PRECISION)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    k_ptr = K + b * skb + h * skh + offs_d[:, None] * skd
    v_ptr = V + b * svb + h * svh + offs_d[:, None] * svd
    seed, qk_scale = _seed_and_scale(SEED, sm_scale, DROPOUT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, skt, svt, rows, offs_n,
                       dmask[:, None], bh, T, 0, start_m, qk_scale, dropout_p, seed,
                       BLOCK_N, False, DROPOUT, UPCAST, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptr, v_ptr, skt, svt, rows, offs_n,
                       dmask[:, None], bh, T, start_m, tl.minimum(start_m + BLOCK_M, T),
                       qk_scale, dropout_p, seed, BLOCK_N, True, DROPOUT, UPCAST,
                       DOT_PRECISION)
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgt + offs_d[None, :] * sgd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_mask)


@triton.jit
def dropout_keep_mask(KEEP, SEED, T, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KEEP (B*H, T, T) int8: the keep decisions the attention kernels make (for tests)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(SEED)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p)
        tl.store(KEEP + bh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :],
                 keep.to(tl.int8), mask=(rows < T)[:, None] & (cols < T)[None, :])


def launch_configs(block_d: int, dtype: str) -> tuple[list, list]:
    """(forward configs, backward configs) shipped for this padded head dim and dtype name."""
    if dtype == "fp32":
        return FP32_FWD_CONFIGS[block_d], FP32_BWD_CONFIGS[block_d]
    return FWD_CONFIGS[block_d], BWD_CONFIGS[block_d]


# --- ahead-of-time compilation (fastgpt.tools.aot) ---

def _signature(kernel, dtype: str) -> dict:
    """Triton types for every argument, with the specialisations the JIT makes for contiguous
    fp16/bf16 inputs whose head dim is a multiple of 16: aligned pointers, unit head-dim strides,
    other strides multiples of 16."""
    pointers = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
    sig = {}
    for name in kernel.arg_names:
        if name in pointers:
            sig[name] = f"*{dtype}:16"
        elif name in ("LSE", "DELTA", "O32"):
            sig[name] = "*fp32:16"
        elif name == "SEED":
            sig[name] = "*i64:16"
        elif name in ("sm_scale", "dropout_p"):
            sig[name] = "fp32"
        elif name in ("H", "T", "T_BUCKET"):
            sig[name] = "i32"
        elif name.startswith("s"):                          # strides: (b, h, t, d)
            sig[name] = "i32:1" if name.endswith("d") else "i32:16"
        else:
            sig[name] = "constexpr"
    return sig


def aot_configs(dtypes=("fp16", "bf16", "fp32"), dropout=(False, True)) -> list:
    """(kernel, signature, constexprs, num_warps, num_stages) for every GPU launch config of the
    forward and backward kernels (fp32 with IEEE and with tf32 dots); the convention is
    fastgpt.tools.aot's."""
    out = []
    for dt, block_d, drop, precision in itertools.product(dtypes, FWD_CONFIGS, dropout,
                                                          ("ieee", "tf32")):
        if precision == "tf32" and dt != "fp32":
            continue
        fwd, bwd = launch_configs(block_d, dt)
        const = dict(HEAD_DIM=block_d, BLOCK_D=block_d, DROPOUT=drop, UPCAST=False,
                     DOT_PRECISION=precision)
        for bm, bn, warps, stages in fwd:
            out.append((attn_fwd, _signature(attn_fwd, dt),
                        dict(const, BLOCK_M=bm, BLOCK_N=bn, STORE_O32=dt != "fp32"),
                        warps, stages))
        for bm, bn, warps, stages in bwd:
            out.append((attn_bwd_dkdv, _signature(attn_bwd_dkdv, dt),
                        dict(const, BLOCK_M=bm, BLOCK_N=bn), warps, stages))
            out.append((attn_bwd_dq, _signature(attn_bwd_dq, dt),
                        dict(const, BLOCK_M=bn, BLOCK_N=bm), warps, stages))
    return out
