"""Softmax cross-entropy over rows of logits: one Triton program per row.

Forward (``cross_entropy_fwd_kernel``): one pass over the row in blocks of BLOCK_V columns keeps a
running maximum ``m`` and a running sum ``s`` of exp(z - m) (the online log-sum-exp), so any
vocabulary size works with a fixed block. It writes, per row, in fp32:

    lse  = log sum_j exp(z_j) = m + log s,    m,  s
    loss = (1 - eps) * (lse - z_t) + eps * (lse - mean_j z_j)     (eps = label smoothing)

where z = x, or z = cap * tanh(x / cap) with soft-capping. Rows whose target equals
``ignore_index`` get loss 0; a target outside [0, V) that is not ignored gets NaN, so a bad target
is never silently used (the dispatch layer also reports it, see fastgpt.ops.cross_entropy).

Backward (``cross_entropy_bwd_kernel``): one pass that re-reads the row and writes

    dx_j = (a * softmax_j - b * ((1 - eps) * [j == t] + eps / V)) * dz/dx

with per-row coefficients ``a`` and ``b`` computed by the caller: b is the gradient of the row's
loss (0 for ignored rows) and a adds whatever flows into lse (z-loss, or the lse output of the
op). Keeping the reduction and z-loss outside the kernel keeps the kernel small; they cost O(N).
``dx`` may alias ``x`` (each element is read, then written, by the same program), which is how
the fused linear+cross-entropy turns a chunk of logits into its gradient without a new buffer.

Precision: every load is upcast to fp32 at once (also the interpreter's bf16 workaround), all
arithmetic is fp32, the gradient is rounded once to the output dtype on store. softmax_j is
exp(z_j - m) / s from the forward's m and s, not exp(z_j - lse): lse rounded to fp32 is off by up
to half a unit at its own magnitude, which scales a whole row's gradient (by a few units in the
last place at |logits| ~ 10, by up to 5e-4 at |logits| ~ 1e4). Float64 logits
compute in float64 (ACC, chosen from the pointer type), which lets gradcheck run on the op;
GPUs are only sent fp32/fp16/bf16.
Limits: V < 2**31; logits may be strided (row and column strides are arguments).
tanh is evaluated by ``_tanh`` (Triton has no tanh of its own that its interpreter runs): within
2 units in the last place everywhere, where 2 * sigmoid(2y) - 1 loses all relative precision as
y -> 0.
"""

import triton
import triton.language as tl


@triton.jit
def _k(value, like):
    """``value`` in ``like``'s dtype at full precision (a bare float literal is fp32 in Triton)."""
    return tl.full([], value, like.dtype)


@triton.jit
def _tanh(y):
    """tanh(y) for fp32 or float64 y, within 2 units in the last place."""
    a = tl.abs(y)
    limit = 0.2 if y.dtype == tl.float64 else 0.55
    # near 0: tanh's odd Taylor series (coefficients 2^2n (2^2n - 1) B_2n / (2n)!) to y^17,
    # where (1 - e) / (1 + e) would cancel; below 0.55 (fp32) or 0.2 (float64) it is exact to
    # rounding. Evaluated at 0 elsewhere, so that large |y| cannot overflow it.
    ys = tl.where(a < limit, y, 0.0)
    y2 = ys * ys
    p = _k(6404582 / 10854718875, y)
    p = _k(-929569 / 638512875, y) + y2 * p
    p = _k(21844 / 6081075, y) + y2 * p
    p = _k(-1382 / 155925, y) + y2 * p
    p = _k(62 / 2835, y) + y2 * p
    p = _k(-17 / 315, y) + y2 * p
    p = _k(2 / 15, y) + y2 * p
    p = _k(-1 / 3, y) + y2 * p
    small = ys + ys * y2 * p
    # elsewhere: tanh|y| = (1 - e) / (1 + e), e = exp(-2|y|) <= 1, which never overflows
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(y < 0, -big, big)
    return tl.where(a < limit, small, big)


@triton.jit
def _cap(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """(z, tanh(x / cap)) with soft-capping, else (x, unused)."""
    if HAS_SOFTCAP:
        th = _tanh(x / softcap)
        return softcap * th, th
    else:
        return x, x


@triton.jit
def cross_entropy_fwd_kernel(
    x_ptr, stride_xn, stride_xv,        # logits (N, V), any dtype
    t_ptr,                              # targets (N,), int64
    loss_ptr, lse_ptr, max_ptr, sum_ptr,    # outputs (N,), in ACC: loss, lse, m, s
    V, ignore_index, label_smoothing, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    ACC = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    t = tl.load(t_ptr + row)

    # running max (finite after the first block, which always has a column), running sum of
    # exp(z - max), and the sum of z for label smoothing
    m = tl.full([], float("-inf"), ACC)
    s = tl.full([], 0.0, ACC)
    zsum = tl.full([], 0.0, ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols * stride_xv, mask=mask, other=0.0).to(ACC)
        z, _ = _cap(x, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(mask, z, 0.0), 0)
    log_s = tl.log(s)
    lse = m + log_s

    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    x_t = tl.load(x_row + tl.where(in_range, t, 0) * stride_xv).to(ACC)
    z_t, _ = _cap(x_t, softcap, HAS_SOFTCAP)
    # (m - z) first, then log(s): at |logits| ~ 1e4 this keeps the digits that m + log(s) loses
    loss = (m - z_t) + log_s
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * ((m - zsum / V) + log_s)
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)


@triton.jit
def cross_entropy_bwd_kernel(
    x_ptr, stride_xn, stride_xv,        # logits (N, V)
    t_ptr, max_ptr, sum_ptr, a_ptr, b_ptr,  # (N,) each; m, s, a, b in ACC
    dx_ptr, stride_dn, stride_dv,       # gradient (N, V); may alias x
    V, label_smoothing, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    ACC = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    dx_row = dx_ptr + row * stride_dn
    t = tl.load(t_ptr + row)
    m = tl.load(max_ptr + row)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    a_s = a / tl.load(sum_ptr + row)      # a * softmax_j = a_s * exp(z_j - m)
    b_hit = b * (1.0 - label_smoothing)   # weight of the one-hot target
    b_all = b * label_smoothing / V       # weight of the uniform smoothing target
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        # masked columns read -inf so that their exp is 0, not an overflow
        x = tl.load(x_row + cols * stride_xv, mask=mask, other=float("-inf")).to(ACC)
        z, th = _cap(x, softcap, HAS_SOFTCAP)
        dz = a_s * tl.exp(z - m) - tl.where(cols == t, b_hit, 0.0)
        if HAS_SMOOTHING:
            dz -= b_all
        if HAS_SOFTCAP:
            dz *= 1.0 - th * th
        tl.store(dx_row + cols * stride_dv, dz.to(dx_ptr.dtype.element_ty), mask=mask)


def block_v(V: int, max_block: int = 4096) -> int:
    """Columns per block: the whole row when it is short, else ``max_block``."""
    return min(triton.next_power_of_2(V), max_block)


def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4


def aot_configs(dtypes=("fp32", "bf16", "fp16")):
    """The launches shipped on GPU (see fastgpt.tools.aot): fp32/bf16/fp16 logits, the small block
    (V=65 -> 128) and the large-vocab block, plain and with soft-capping plus smoothing.
    Hints are what Triton specialises at launch: 16-byte-aligned pointers, contiguous rows.
    Each is a plain (kernel, signature, constexprs, num_warps, num_stages) tuple: kernels import
    nothing from fastgpt."""
    configs = []
    for dtype in dtypes:
        for block in (128, 4096):
            for cap, smooth in ((False, False), (True, True)):
                flags = {"HAS_SOFTCAP": cap, "HAS_SMOOTHING": smooth, "BLOCK_V": block}
                fwd = {"x_ptr": f"*{dtype}:16", "stride_xn": "i32", "stride_xv": "i32:1",
                       "t_ptr": "*i64:16", "loss_ptr": "*fp32:16", "lse_ptr": "*fp32:16",
                       "max_ptr": "*fp32:16", "sum_ptr": "*fp32:16", "V": "i32",
                       "ignore_index": "i32", "label_smoothing": "fp32", "softcap": "fp32"}
                bwd = {"x_ptr": f"*{dtype}:16", "stride_xn": "i32", "stride_xv": "i32:1",
                       "t_ptr": "*i64:16", "max_ptr": "*fp32:16", "sum_ptr": "*fp32:16",
                       "a_ptr": "*fp32:16", "b_ptr": "*fp32:16", "dx_ptr": f"*{dtype}:16",
                       "stride_dn": "i32", "stride_dv": "i32:1", "V": "i32",
                       "label_smoothing": "fp32", "softcap": "fp32"}
                for kernel, sig in ((cross_entropy_fwd_kernel, fwd), (cross_entropy_bwd_kernel, bwd)):
                    sig = {**sig, **{k: "constexpr" for k in flags}}
                    configs.append((kernel, sig, dict(flags), num_warps_for(block), 1))
    return configs
