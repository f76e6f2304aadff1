"""The Triton kernel of the fused Adan step: the per-element math, the 8-bit tiles and the step's scalars,
kept apart from the multi-tensor plumbing (adan_plugin/triton_adan.py: the op, its checks, the tensor
and chunk tables and their cache), as PyTorch's fused optimizers keep their math apart from their
launchers.  The maps and the update are those of csrc/ (adan_quant.h, adan_math.h), written once more in
Triton's language because a GPU without our compiled kernels runs this one.

One program (CUDA block) updates one chunk of ``CHUNK`` elements of one tensor, found through the two
device tables that triton_adan.py builds (a row's layout is commented in ``_adan_kernel``).

Tensors whose six addresses (and Kahan buffer's) are all 16-byte aligned (every tensor the caching
allocator hands out) run in a launch compiled with alignment hints (16-byte vector loads); the others in
a launch without.  Full ``BLOCK``s run unmasked, only a chunk's tail is masked.

8-bit states: a chunk holds whole 256-element quantization blocks, and a program handles ``BLOCK`` of its
elements at a time as a [BLOCK / 256, 256] tile, one block per row: dequantize the four states, update,
take each block's new largest magnitude with a row reduction, requantize, all in registers (no
temporaries, one pass; the CPU kernel parks a block's new values in a stack buffer, the CUDA kernel gives
each block to a warp).  The maps are csrc/adan_quant.h's, operation for operation: the dequantizing
products and the quantization factor (an IEEE ``div_rn``) feed no add, the level is settled from an
``rsqrt`` estimate by one exact threshold comparison (an FMA contraction can move the estimate, well
within its slack, and cannot change the threshold), so no GPU compiler can change a code; a NaN in a
block makes its scale NaN (``tl.max`` alone may drop NaNs on a GPU).  The update's own
multiply-adds may contract on a GPU, as in the CPU kernel's AVX2/AVX-512 builds.

fp32 -> bf16 rounding is written out as integer operations (round to nearest even, as torch and
the GPU's conversion instruction round): Triton's interpreter truncates bf16 conversions, and the
same code must run in it and on the GPU.
"""
import triton
import triton.language as tl


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        # Round to nearest even by hand (the interpreter truncates), NaN kept quiet as torch does.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16)
        out = tl.where(x != x, 0x7FC0, out).to(tl.uint16)
        return out.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _lerp(start, end, w, w_rest, LOW: tl.constexpr):
    # torch.lerp's two formulas (csrc/adan_math.h adan_lerp), picked on the host by the weight.
    if LOW:
        return start + w * (end - start)
    else:
        return end - (end - start) * w_rest


@triton.jit
def _adan_math(p, g, m, n, d, neg, first, grad_mul, beta2, beta3, w1, w1_rest, w2, w2_rest, w3, step_size,
               step_size_diff, inv_bc3_sqrt, eps, decay_mul, inv_decay_div, LOW1: tl.constexpr,
               LOW2: tl.constexpr):
    # csrc/adan_math.h adan_update, operation for operation; returns p, m, n, d, neg_pre_grad and sqrt(n)
    # (what an 8-bit exp_avg_sq's code stands for).
    g = g * grad_mul
    diff = tl.where(first, 0.0, g + neg)
    m = _lerp(m, g, w1, w1_rest, LOW1)
    d = _lerp(d, diff, w2, w2_rest, LOW2)
    u = diff * beta2 + g
    n = n * beta3 + w3 * (u * u)
    sqrt_n = tl.sqrt_rn(n)
    denom = sqrt_n * inv_bc3_sqrt + eps
    p = p * decay_mul
    p = p - tl.div_rn(step_size * m + step_size_diff * d, denom)
    p = p * inv_decay_div
    return p, m, n, d, 0.0 - g, sqrt_n


@triton.jit
def _load_param(p_ptr, comp_ptr, offs, mask, HAS_COMP: tl.constexpr):
    # A Kahan-compensated parameter (kahan_sum) is p + comp in fp32 (csrc/adan_cpu_lowmem.h ParamIo).
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    if HAS_COMP:
        p = p + tl.load(comp_ptr + offs, mask=mask).to(tl.float32)
    return p


@triton.jit
def _store_param(p_ptr, comp_ptr, offs, mask, x, P_DTYPE: tl.constexpr, HAS_COMP: tl.constexpr):
    # csrc/adan_quant.h kahan_store: p = round(x), comp = round(x - p) (x - p is exact in fp32).
    p = _to_storage(x, P_DTYPE)
    tl.store(p_ptr + offs, p, mask=mask)
    if HAS_COMP:
        tl.store(comp_ptr + offs, _to_storage(x - p.to(tl.float32), P_DTYPE), mask=mask)


@triton.jit
def _adan_elements(p_ptr, g_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, comp_ptr, offs, mask, first, grad_mul,
                   beta2, beta3, w1, w1_rest, w2, w2_rest, w3, step_size, step_size_diff, inv_bc3_sqrt, eps,
                   decay_mul, inv_decay_div, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, HAS_COMP: tl.constexpr,
                   LOW1: tl.constexpr, LOW2: tl.constexpr):
    p = _load_param(p_ptr, comp_ptr, offs, mask, HAS_COMP)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    n = tl.load(n_ptr + offs, mask=mask).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=mask).to(tl.float32)
    neg = tl.load(neg_ptr + offs, mask=mask).to(tl.float32)
    p, m, n, d, neg, _ = _adan_math(p, g, m, n, d, neg, first, grad_mul, beta2, beta3, w1, w1_rest, w2, w2_rest,
                                    w3, step_size, step_size_diff, inv_bc3_sqrt, eps, decay_mul, inv_decay_div, LOW1,
                                    LOW2)
    _store_param(p_ptr, comp_ptr, offs, mask, p, P_DTYPE, HAS_COMP)
    tl.store(m_ptr + offs, _to_storage(m, S_DTYPE), mask=mask)
    tl.store(n_ptr + offs, _to_storage(n, S_DTYPE), mask=mask)
    tl.store(d_ptr + offs, _to_storage(d, S_DTYPE), mask=mask)
    tl.store(neg_ptr + offs, _to_storage(neg, S_DTYPE), mask=mask)


# 8-bit states: the maps of csrc/adan_quant.h (spec in adan_plugin/lowmem.py).  A tile is [rows, QBLOCK]:
# one row per quantization block, so a block's new maximum is a row reduction in registers.  No FMA
# contraction can change a code on any backend (module docstring).
@triton.jit
def _div_by(x, c: tl.constexpr):
    return tl.div_rn(x, tl.full(x.shape, c, tl.float32))


@triton.jit
def _dequant_signed(codes, scale, CMAX: tl.constexpr):
    # adan_quant.h dequantize_signed: float(c * |c|) * (A / cmax^2).
    c = codes.to(tl.int32)
    return (c * tl.abs(c)).to(tl.float32) * _div_by(scale, CMAX * CMAX)[:, None]


@triton.jit
def _dequant_sq(codes, scale, CMAX: tl.constexpr):
    # adan_quant.h dequantize_sq: u = float(c * c) * (A / cmax^2), n = u * u.
    c = codes.to(tl.int32)
    u = (c * c).to(tl.float32) * _div_by(scale, CMAX * CMAX)[:, None]
    return u * u


@triton.jit
def _row_max(mag, mask):
    # The largest of each row's non-negative magnitudes (lanes outside the tensor count as 0); NaN when
    # the row holds one, as csrc/adan_quant.h's max_nan (tl.max alone may drop NaNs on a GPU).
    if mask is not None:
        mag = tl.where(mask, mag, 0.0)
    has_nan = tl.max((mag != mag).to(tl.int32), axis=1)
    return tl.where(has_nan != 0, float("nan"), tl.max(mag, axis=1))


@triton.jit
def _quant_level(mag, absmax, CMAX: tl.constexpr):
    # adan_quant.h quant_factor + quant_level: s = cmax^2 / A (0 when A < kMinAbsmax, NaN included),
    # v = min(mag * s, cmax^2) (NaN: cmax^2), and the c with (c - 1/2)^2 <= v < (c + 1/2)^2, settled
    # with one comparison from e = v * rsqrt(v), an estimate of sqrt(v) within kLevelSlack = 1/8 (on a
    # GPU the approximate rsqrt, far closer; the argument is in adan_quant.h): c0 = floor(e + 3/8) is
    # c or c - 1, and c = c0 + [v >= c0^2 + (c0 + 1/4)], exact in fp32 whether contracted or not.
    ok = absmax >= 1e-30
    s = tl.where(ok, tl.div_rn(tl.full(absmax.shape, CMAX * CMAX, tl.float32), tl.where(ok, absmax, 1.0)), 0.0)
    prod = mag * s[:, None]
    v = tl.where(prod < CMAX * CMAX, prod, CMAX * CMAX)
    c0 = tl.floor(v * tl.math.rsqrt(tl.maximum(v, 1e-30)) + 0.375)
    return tl.where(v >= c0 * c0 + (c0 + 0.25), c0 + 1.0, c0).to(tl.int32)


@triton.jit
def _quant_signed(x, absmax):
    # adan_quant.h quantize_signed: x's sign, the level of |x|.
    c = _quant_level(tl.abs(x), absmax, 127)
    return tl.where(x < 0.0, -c, c).to(tl.int8)


@triton.jit
def _adan_q8_tile(p_ptr, g_ptr, comp_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, sm_ptr, sn_ptr, sd_ptr, se_ptr,
                  rows, offs, mask, row_mask, first, grad_mul, beta2, beta3, w1, w1_rest, w2, w2_rest, w3,
                  step_size, step_size_diff, inv_bc3_sqrt, eps, decay_mul, inv_decay_div,
                  P_DTYPE: tl.constexpr, HAS_COMP: tl.constexpr, LOW1: tl.constexpr, LOW2: tl.constexpr):
    # Dequantize -> update -> block maxima -> requantize, all in registers (the CPU kernel,
    # csrc/adan_cpu_lowmem.h, parks each block's new values in a stack buffer before requantizing).
    p = _load_param(p_ptr, comp_ptr, offs, mask, HAS_COMP)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = _dequant_signed(tl.load(m_ptr + offs, mask=mask), tl.load(sm_ptr + rows, mask=row_mask), 127)
    n = _dequant_sq(tl.load(n_ptr + offs, mask=mask), tl.load(sn_ptr + rows, mask=row_mask), 255)
    d = _dequant_signed(tl.load(d_ptr + offs, mask=mask), tl.load(sd_ptr + rows, mask=row_mask), 127)
    neg = _dequant_signed(tl.load(neg_ptr + offs, mask=mask), tl.load(se_ptr + rows, mask=row_mask), 127)
    p, m, _, d, neg, u = _adan_math(p, g, m, n, d, neg, first, grad_mul, beta2, beta3, w1, w1_rest, w2, w2_rest,
                                    w3, step_size, step_size_diff, inv_bc3_sqrt, eps, decay_mul, inv_decay_div, LOW1,
                                    LOW2)
    _store_param(p_ptr, comp_ptr, offs, mask, p, P_DTYPE, HAS_COMP)

    am, ad, ae = _row_max(tl.abs(m), mask), _row_max(tl.abs(d), mask), _row_max(tl.abs(neg), mask)
    tl.store(m_ptr + offs, _quant_signed(m, am), mask=mask)
    tl.store(d_ptr + offs, _quant_signed(d, ad), mask=mask)
    tl.store(neg_ptr + offs, _quant_signed(neg, ae), mask=mask)
    # exp_avg_sq: the code is that of u = sqrt(n), A = max sqrt(n) = sqrt(max n), and never 0 for n > 0.
    an = _row_max(u, mask)
    cn = _quant_level(u, an, 255)
    tl.store(n_ptr + offs, tl.where((cn == 0) & (u > 0.0), 1, cn).to(tl.uint8), mask=mask)
    tl.store(sm_ptr + rows, am, mask=row_mask)
    tl.store(sn_ptr + rows, an, mask=row_mask)
    tl.store(sd_ptr + rows, ad, mask=row_mask)
    tl.store(se_ptr + rows, ae, mask=row_mask)


@triton.jit
def _one_minus_pow(beta, e):
    # 1 - beta**e in float64 by repeated squaring (e a non-negative integer): only multiplications,
    # which every Triton backend has in float64; csrc/adan_math.h uses pow() in double.
    r = tl.full([], 1.0, tl.float64)
    b = beta
    while e > 0:
        r = tl.where((e & 1) != 0, r * b, r)
        b = b * b
        e = e >> 1
    return 1.0 - r


@triton.jit(do_not_specialize=["chunk_base", "host_step"])
def _adan_kernel(tensor_table, chunk_table, chunk_base,
                 step_ptr, grad_coef_ptr, grad_scale_ptr, found_inf_ptr, host_step,
                 lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo, beta3_hi, beta3_lo,
                 beta2, beta3, w1, w1_rest, w2, w2_rest, w3, eps, decay_mul, inv_decay_div,
                 FIRST: tl.constexpr, HAS_PARAM_STEPS: tl.constexpr, ALIGNED: tl.constexpr,
                 LOW1: tl.constexpr, LOW2: tl.constexpr, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                 Q8: tl.constexpr, HAS_COMP: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr, QBLOCK: tl.constexpr):
    c = chunk_base + tl.program_id(0)
    t = tl.load(chunk_table + 2 * c).to(tl.int64)
    start = tl.load(chunk_table + 2 * c + 1).to(tl.int64) * CHUNK
    row = tensor_table + ROW * t
    n = tl.minimum(tl.load(row + 7) - start, CHUNK)
    if found_inf_ptr is not None:  # AMP overflow: write nothing
        n = tl.where(tl.load(found_inf_ptr) != 0.0, 0, n)

    # Step-dependent scalars in float64 (hi + lo recovers the double the host holds).
    if step_ptr is not None:
        step = tl.load(step_ptr)
        k = step.to(tl.int64)
        first = step == 1.0
    else:
        k = tl.cast(host_step, tl.int64)
        first = k == 1
    if FIRST:
        first = first | True
    if HAS_PARAM_STEPS:
        first = first | (tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32))) == 1.0)
    lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
    b1 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
    b2 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
    b3 = tl.cast(beta3_hi, tl.float64) + tl.cast(beta3_lo, tl.float64)
    step_size = (lr / _one_minus_pow(b1, k)).to(tl.float32)
    step_size_diff = (lr * b2 / _one_minus_pow(b2, k)).to(tl.float32)
    inv_bc3_sqrt = (1.0 / tl.sqrt(_one_minus_pow(b3, k))).to(tl.float32)  # float64: IEEE sqrt
    grad_mul = tl.full([], 1.0, tl.float32)
    if grad_coef_ptr is not None:
        grad_mul = tl.load(grad_coef_ptr)
    if grad_scale_ptr is not None:
        grad_mul = tl.div_rn(grad_mul, tl.load(grad_scale_ptr))

    # A row of the tensor table: p, g, m, n, d, neg_pre_grad, step count, numel, then (8-bit states) the
    # four scale lists' addresses and (kahan_sum) the compensation's.
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    if Q8:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.int8))
        n_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        d_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int8))
        neg_ptr = tl.load(row + 5).to(tl.pointer_type(tl.int8))
    else:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(S_DTYPE))
        n_ptr = tl.load(row + 3).to(tl.pointer_type(S_DTYPE))
        d_ptr = tl.load(row + 4).to(tl.pointer_type(S_DTYPE))
        neg_ptr = tl.load(row + 5).to(tl.pointer_type(S_DTYPE))
    comp_ptr = p_ptr  # unused unless HAS_COMP
    if HAS_COMP:
        comp_ptr = tl.load(row + 12).to(tl.pointer_type(P_DTYPE))
    if ALIGNED:  # checked on the host for all of them: lets the compiler use 16-byte loads
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        n_ptr = tl.multiple_of(n_ptr, 16)
        d_ptr = tl.multiple_of(d_ptr, 16)
        neg_ptr = tl.multiple_of(neg_ptr, 16)
        comp_ptr = tl.multiple_of(comp_ptr, 16)
    p_ptr += start
    g_ptr += start
    m_ptr += start
    n_ptr += start
    d_ptr += start
    neg_ptr += start
    comp_ptr += start

    full = n // BLOCK
    if Q8:
        # Chunks hold whole quantization blocks (CHUNK % QBLOCK == 0, checked on the host): a tile is
        # BLOCK // QBLOCK of them, one per row.
        qstart = start // QBLOCK
        sm_ptr = tl.load(row + 8).to(tl.pointer_type(tl.float32)) + qstart
        sn_ptr = tl.load(row + 9).to(tl.pointer_type(tl.float32)) + qstart
        sd_ptr = tl.load(row + 10).to(tl.pointer_type(tl.float32)) + qstart
        se_ptr = tl.load(row + 11).to(tl.pointer_type(tl.float32)) + qstart
        r = tl.arange(0, BLOCK // QBLOCK)
        e = tl.arange(0, QBLOCK)
        for b in range(0, full):
            rows = b * (BLOCK // QBLOCK) + r
            offs = rows[:, None] * QBLOCK + e[None, :]
            _adan_q8_tile(p_ptr, g_ptr, comp_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, sm_ptr, sn_ptr, sd_ptr, se_ptr,
                          rows, offs, None, None, first, grad_mul, beta2, beta3, w1, w1_rest, w2, w2_rest, w3,
                          step_size, step_size_diff, inv_bc3_sqrt, eps, decay_mul, inv_decay_div,
                          P_DTYPE, HAS_COMP, LOW1, LOW2)
        if full * BLOCK < n:
            rows = full * (BLOCK // QBLOCK) + r
            offs = rows[:, None] * QBLOCK + e[None, :]
            _adan_q8_tile(p_ptr, g_ptr, comp_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, sm_ptr, sn_ptr, sd_ptr, se_ptr,
                          rows, offs, offs < n, rows * QBLOCK < n, first, grad_mul, beta2, beta3, w1, w1_rest,
                          w2, w2_rest, w3, step_size, step_size_diff, inv_bc3_sqrt, eps, decay_mul,
                          inv_decay_div, P_DTYPE, HAS_COMP, LOW1, LOW2)
    else:
        for b in range(0, full):
            offs = b * BLOCK + tl.arange(0, BLOCK)
            _adan_elements(p_ptr, g_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, comp_ptr, offs, None, first, grad_mul,
                           beta2, beta3, w1, w1_rest, w2, w2_rest, w3, step_size, step_size_diff, inv_bc3_sqrt,
                           eps, decay_mul, inv_decay_div, P_DTYPE, S_DTYPE, HAS_COMP, LOW1, LOW2)
        if full * BLOCK < n:
            offs = full * BLOCK + tl.arange(0, BLOCK)
            _adan_elements(p_ptr, g_ptr, m_ptr, n_ptr, d_ptr, neg_ptr, comp_ptr, offs, offs < n, first,
                           grad_mul, beta2, beta3, w1, w1_rest, w2, w2_rest, w3, step_size, step_size_diff,
                           inv_bc3_sqrt, eps, decay_mul, inv_decay_div, P_DTYPE, S_DTYPE, HAS_COMP, LOW1, LOW2)
