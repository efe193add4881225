"""The CMD per-block kernel fused into a few cache-resident passes (numba).

:func:`fit_block_fused` computes what :func:`pipeline.kernels.cmd.fit_block` computes (same
fields, flags, tie rule and conventions for constant, non-finite and reference rows), from the
*time-major* block ``xt`` (Tw, S) the fit task holds, without a float64 copy of the block.

The rows are processed in sub-blocks of :data:`SUB_ROWS` columns of ``xt``: the sub-block's
Tw x rows input values stay in L1/L2 across three passes, and every hot loop either has the
row index innermost (unit stride, vectorised by LLVM, no selects) or is written as LLVM vector
code (:func:`_pack8`, :func:`_project8`):

1. per row: float64 sum (in epoch order, as numpy's ``sum(axis=0)``: the same mean bits) and,
   for float64 input only, ``sum |x - x(0)|`` (zero iff the row is constant; narrower input
   has exact sums for constant rows, which are found after pass 2 from ``sum xc^2 == 0``);
   ``finite = isfinite(sum)``;
2. the rows packed in groups of 8 with their epochs contiguous (NaN/Inf rows zeroed first, in
   a copy of the sub-block made only when there are any; the last group padded with zero
   rows), then per group, with ``xc = x - mean`` (constant rows: ``x - x(0) = 0``) formed in
   registers: per row ``|xc|^2`` and the M projections ``unit_m . xc`` on the unit centred
   references (register blocks of 8 rows x 5 modes, fused multiply-adds in epoch order), per
   epoch ``sum xc^2`` (spread_t) and ``sum x^2`` over finite rows (energy_t), in 4 lanes
   added up at the end of the block; then per row: argmax of ``|proj|`` (ties to the lowest id), a, b, the anchor and level
   (a binary search in the sorted reference, as :func:`pipeline.kernels.cmd.anchor_rows`),
   corr, residual, flags and the reference-row overrides, exactly the formulas of
   ``fit_block``;
3. per epoch: ``residual_t = sum_i (xc_it - a_i rc_(m_i)t)^2`` summed directly, as in
   ``fit_block``, four epochs per pass over the rows, the row's centred reference values
   gathered from the (M, Tw) centred references (the per-mode expansion
   ``spread_t - 2 sum_m rc_mt A_mt + sum_m rc_mt^2 C_m`` would cost one dot product per mode
   and lose every digit when the rows follow their modes closely).

All accumulation is float64, and no fastmath flag is used except ``reassoc`` on the small
sum-over-rows helpers of pass 3 (``_residual_sum``, ``_residual_sum4``), so that LLVM keeps
vector partial sums; their order is fixed by the compiled code, so a run is bit-for-bit
deterministic. The sums of pass 2 use ``llvm.fma`` (one rounding per multiply-add, the same
bits on every CPU: a library call where the CPU has no FMA unit), in a fixed order, and every
row goes through the same vector code wherever it lies in a block (the padded last group
included), so a row's results do not depend on its position. The floats agree with ``fit_block`` to rounding (sums taken in another order).
float16 and bfloat16 blocks (bfloat16 as its ``uint16`` bit pattern with
``dtype_code="bfloat16"``) are upcast exactly to float32 one sub-block at a time.

:func:`stored_coefficients_fused` is :func:`pipeline.kernels.cmd.stored_coefficients` (the
float32 a and level a study stores) row by row, bit for bit the same.

Import this module only where the numba kernel is wanted; :func:`available` says whether numba
can be imported at all.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.config import FIT_KERNEL, FIT_KERNEL_ENV
from pipeline.kernels.cmd import (
    FLAG_CONSTANT,
    FLAG_NONFINITE,
    FLAG_REFERENCE,
    BlockFit,
    References,
)

try:  # numba is optional: the numpy kernel is the fallback
    import numba
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cg
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None  # type: ignore[assignment]
    _HAVE_NUMBA = False

__all__ = [
    "SUB_ROWS",
    "available",
    "fit_block_fused",
    "group_sums_fused",
    "stored_coefficients_fused",
    "use_fused",
    "warm_up",
]

#: rows (columns of the time-major block) per sub-block: at Tw = 100, 512 float32 rows are
#: 200 KB of input (L2) and the M = 10 projection accumulators 40 KB
SUB_ROWS = 512
_V = 4  # float64 lanes of a vector (AVX2)
_R = 2  # vectors of rows per register block: 8 rows (a group of the packed tile)
_G = 5  # modes per register block: 2 x 5 accumulators, two centred vectors, a broadcast

#: float32 rows of fewer epochs than this have exact float64 sums when constant (24-bit
#: significands times counts below 2^29 fit in 53 bits)
_EXACT_SUM_EPOCHS = 1 << 29

_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


def available() -> bool:
    """Whether numba can be imported (the fused kernel can run)."""
    return _HAVE_NUMBA


def use_fused() -> bool:
    """Whether the fit runs this kernel on the CPU: :data:`pipeline.config.FIT_KERNEL`, or the
    environment variable it names (``auto``: when numba imports; ``numba``; ``numpy``)."""
    choice = os.environ.get(FIT_KERNEL_ENV, FIT_KERNEL).strip().lower() or FIT_KERNEL
    if choice not in ("auto", "numba", "numpy"):
        raise ValueError(f"{FIT_KERNEL_ENV}={choice!r}: expected auto, numba or numpy")
    if choice == "numba" and not _HAVE_NUMBA:
        raise RuntimeError(f"{FIT_KERNEL_ENV}=numba but numba is not installed")
    return _HAVE_NUMBA and choice != "numpy"


if _HAVE_NUMBA:

    @_intrinsic
    def _bits_to_f32(typingctx, bits):
        """Reinterpret a uint32 bit pattern as float32."""
        sig = _types.float32(_types.uint32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.FloatType())

        return sig, codegen

    @_intrinsic
    def _f32_to_bits(typingctx, x):
        """Reinterpret a float32 as its int32 bit pattern."""
        sig = _types.int32(_types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.IntType(32))

        return sig, codegen

    _jit = numba.njit(cache=True, nogil=True)

    def _i64(value):
        return _ir.Constant(_ir.IntType(64), value)

    def _arrays(context, builder, sig, args, which):
        return [context.make_array(sig.args[i])(context, builder, args[i]) for i in which]

    def _at(builder, base, offset, ty):
        """``ty*`` at ``offset`` bytes from the ``i8*`` ``base``."""
        return builder.bitcast(builder.gep(base, [offset]), ty.as_pointer())

    def _bytes(builder, data):
        return builder.bitcast(data, _ir.IntType(8).as_pointer())

    def _emit_pack(context, builder, sig, args):
        xa, pa = _arrays(context, builder, sig, args, (0, 3))
        c0, n8 = args[1], args[2]
        isz = _i64(sig.args[0].dtype.bitwidth // 8)
        v8 = _ir.VectorType(context.get_value_type(sig.args[0].dtype), 8)
        n_t = _cg.unpack_tuple(builder, xa.shape, 2)[0]
        xstr = _cg.unpack_tuple(builder, xa.strides, 2)[0]
        xb = _bytes(builder, xa.data)
        pb = _bytes(builder, pa.data)
        step = builder.mul(_i64(8), isz)  # bytes of one epoch of a group
        gbytes = builder.mul(n_t, step)  # bytes of a group
        with _cg.for_range(builder, n_t) as lt:
            t = lt.index
            src0 = builder.add(builder.mul(t, xstr), builder.mul(c0, isz))
            dst0 = builder.mul(t, step)
            with _cg.for_range(builder, builder.udiv(n8, _i64(8))) as lg:
                g = lg.index
                value = builder.load(
                    _at(builder, xb, builder.add(src0, builder.mul(g, step)), v8), align=1
                )
                dst = builder.add(dst0, builder.mul(g, gbytes))
                builder.store(value, _at(builder, pb, dst, v8), align=1)
        return context.get_dummy_value()

    @_intrinsic
    def _pack8(typingctx, x, c0, n8, pack):
        """Columns ``[c0, c0 + n8)`` of ``x`` (Tw, *) into ``pack`` (n8 // 8, Tw, 8): each group
        of 8 rows with its epochs contiguous (``n8``: a multiple of 8; vector loads and
        stores). The projections then walk a group's epochs in one stream of cache lines
        (the block's own epoch rows lie in as many mappings: one page each per epoch)."""
        return _types.void(x, c0, n8, pack), _emit_pack

    def _emit_projections(context, builder, sig, args):
        pk, mva, ua, pa, sa, la = _arrays(context, builder, sig, args, range(6))
        n8 = args[6]
        ety = sig.args[0].dtype
        wide = ety.bitwidth == 64
        isz = _i64(ety.bitwidth // 8)
        f64 = _ir.DoubleType()
        vin = _ir.VectorType(context.get_value_type(ety), _V)
        v4 = _ir.VectorType(f64, _V)
        fma = _cg.get_or_insert_function(
            builder.module, _ir.FunctionType(v4, [v4, v4, v4]), "llvm.fma.v4f64"
        )
        n_t = _cg.unpack_tuple(builder, pk.shape, 3)[1]
        n_m = _cg.unpack_tuple(builder, ua.shape, 2)[0]
        ustr = _cg.unpack_tuple(builder, ua.strides, 2)[0]
        pstr = _cg.unpack_tuple(builder, pa.strides, 2)[0]
        kb, mb, ub, pb, sb, lb = (_bytes(builder, a.data) for a in (pk, mva, ua, pa, sa, la))
        step = builder.mul(_i64(8), isz)
        gbytes = builder.mul(n_t, step)
        zero = _ir.Constant(v4, [0.0] * _V)
        undef = _ir.Constant(v4, _ir.Undefined)
        lane0 = _ir.Constant(_ir.IntType(32), 0)
        splat = _ir.Constant(_ir.VectorType(_ir.IntType(32), _V), [0] * _V)
        # the accumulators (promoted to registers by LLVM: 2 x 5 of 16 ymm registers)
        accs = [[_cg.alloca_once(builder, v4) for _ in range(_R)] for _ in range(_G)]

        def block(g, m0, k):
            """Modes [m0, m0 + k) of group g (k = 0: the group's sums of squares)."""
            for m in range(max(k, 1)):
                for r in range(_R):
                    builder.store(zero, accs[m][r])
            j0 = builder.mul(g, _i64(8))
            row = [builder.mul(builder.add(j0, _i64(_V * r)), _i64(8)) for r in range(_R)]
            mvv = [builder.load(_at(builder, mb, row[r], v4), align=8) for r in range(_R)]
            urow = [builder.mul(builder.add(m0, _i64(m)), ustr) for m in range(k)]
            base = builder.mul(g, gbytes)
            with _cg.for_range(builder, n_t) as lt:
                t = lt.index
                off = builder.add(base, builder.mul(t, step))
                raw = []
                xc = []
                for r in range(_R):
                    src = builder.add(off, builder.mul(_i64(_V * r), isz))
                    value = builder.load(_at(builder, kb, src, vin), align=1)
                    if not wide:
                        value = builder.fpext(value, v4)
                    raw.append(value)
                    xc.append(builder.fsub(value, mvv[r]))
                if k == 0:  # per row sum xc^2; per epoch (4 lanes) sum xc^2 and sum x^2
                    for r in range(_R):
                        acc = builder.load(accs[0][r])
                        builder.store(builder.call(fma, [xc[r], xc[r], acc]), accs[0][r])
                    lo = builder.mul(t, _i64(64))  # lanes[t]: (2, 4) float64
                    sp_at = _at(builder, lb, lo, v4)
                    en_at = _at(builder, lb, builder.add(lo, _i64(32)), v4)
                    s = builder.load(sp_at, align=8)
                    e = builder.load(en_at, align=8)
                    for r in range(_R):
                        s = builder.call(fma, [xc[r], xc[r], s])
                        e = builder.call(fma, [raw[r], raw[r], e])
                    builder.store(s, sp_at, align=8)
                    builder.store(e, en_at, align=8)
                else:
                    toff = builder.mul(t, _i64(8))
                    for m in range(k):
                        u = builder.load(_at(builder, ub, builder.add(urow[m], toff), f64), align=8)
                        uv = builder.shuffle_vector(
                            builder.insert_element(undef, u, lane0), undef, splat
                        )
                        for r in range(_R):
                            acc = builder.load(accs[m][r])
                            builder.store(builder.call(fma, [uv, xc[r], acc]), accs[m][r])
            if k == 0:
                for r in range(_R):
                    builder.store(builder.load(accs[0][r]), _at(builder, sb, row[r], v4), align=8)
            for m in range(k):
                prow = builder.mul(builder.add(m0, _i64(m)), pstr)
                for r in range(_R):
                    dst = _at(builder, pb, builder.add(prow, row[r]), v4)
                    builder.store(builder.load(accs[m][r]), dst, align=8)

        g5 = _i64(_G)
        n_full = builder.mul(builder.udiv(n_m, g5), g5)
        rest = builder.sub(n_m, n_full)
        with _cg.for_range(builder, builder.udiv(n8, _i64(8))) as lg:
            g = lg.index
            block(g, _i64(0), 0)
            with _cg.for_range_slice(builder, _i64(0), n_full, g5, inc=True) as (m0, _):
                block(g, m0, _G)
            for k in range(1, _G):
                with builder.if_then(builder.icmp_signed("==", rest, _i64(k))):
                    block(g, n_full, k)
        return context.get_dummy_value()

    @_intrinsic
    def _project8(typingctx, pack, mv, unit, proj, sp, lanes, n8):
        """From the packed rows ``pack`` (n8 // 8, Tw, 8) and their centres ``mv``, for every
        row j < n8 (``xc = x - mv[j]``, float64):

        - ``proj[m, j] = sum_t unit[m, t] xc_t`` for every mode m;
        - ``sp[j] = sum_t xc_t^2``;
        - ``lanes[t, 0, l] += sum xc_t^2`` and ``lanes[t, 1, l] += sum x_t^2`` over the rows
          of lane l (j % 4 == l), to be added up per epoch by the caller.

        Every sum runs in epoch order (over t) or group order (over rows) with fused
        multiply-adds (``llvm.fma``: one rounding, the same bits on every CPU), in register
        blocks of 8 rows x 5 modes (2 x 5 vector accumulators: two multiply-adds per load
        of a broadcast reference value, where a mode at a time needs a load and a store of
        the row's accumulator for every multiply-add)."""
        return _types.void(pack, mv, unit, proj, sp, lanes, n8), _emit_projections


    @_jit
    def _ordered32(x):
        """A float32's position on the number line (as :func:`pipeline.kernels.cmd._ordered`)."""
        i = np.int64(_f32_to_bits(np.float32(x)))  # type: ignore[call-arg]
        return -(i & 0x7FFFFFFF) if i < 0 else i

    @_jit
    def _step32(x, k):
        """``x`` (float32) moved ``k`` values along the number line (as ``cmd._step``)."""
        if k == 0:
            return np.float32(x)
        o = _ordered32(x) + k
        bits = np.uint32(((-o) | 0x80000000) if o < 0 else o)
        return _bits_to_f32(bits)  # type: ignore[call-arg]

    @_jit
    def _line_ulps(moved, ca, cl, want):
        """The worst distance in float32 steps, over the epochs, between the line stored as
        ``(ca, cl)`` (as read back) and ``want``, and the number of epochs beyond 1 step (one
        branch-free pass over the epochs)."""
        worst = np.int64(0)
        over = np.int64(0)
        a64 = np.float64(ca)
        l64 = np.float64(cl)
        for t in range(moved.shape[0]):
            far = abs(_ordered32(np.float32(l64 + a64 * moved[t])) - want[t])
            worst = max(worst, far)
            over += np.int64(far > 1)
        return worst, over

    @_jit
    def _store_rows(mode, a, level, anchor, rraw, rsorted, a32, l32):
        """:func:`pipeline.kernels.cmd.stored_coefficients` row by row (the same candidates
        in the same order, the same float64 and float32 operations, the same score)."""
        n_t = rraw.shape[1]
        big = np.iinfo(np.int64).max
        moved = np.empty(n_t)
        want = np.empty(n_t, dtype=np.int64)
        for i in range(a.shape[0]):
            a32[i] = np.float32(a[i])
            l32[i] = np.float32(level[i])
            k = mode[i]
            r0 = rraw[k, anchor[i]]
            lo = level[i] + a[i] * (rsorted[k, 0] - r0)
            hi = level[i] + a[i] * (rsorted[k, n_t - 1] - r0)
            if not ((lo < 0 and hi > 0) or (lo > 0 and hi < 0)):
                continue
            # the row's epochs relative to its anchor and the float64 line rounded to float32,
            # once for all candidates
            li = level[i]
            ai = a[i]
            for t in range(n_t):  # (no view of the row: a view costs two atomic refcounts)
                moved[t] = rraw[k, t] - r0
                want[t] = _ordered32(np.float32(li + ai * moved[t]))
            a0 = a32[i]
            l0 = l32[i]
            best = big
            for c in range(9):  # (da, dl) in the order of cmd._STEPS
                da = (0, -1, 1)[c // 3]
                dl = (0, -1, 1)[c % 3]
                ca = _step32(a0, da)
                cl = _step32(l0, dl)
                worst, over = _line_ulps(moved, ca, cl, want)
                score = worst * (n_t + 1) + over
                if score < best:
                    best = score
                    a32[i] = ca
                    l32[i] = cl
                # the nearest roundings within 1 ulp everywhere: kept; later, nothing beats 0
                if (c == 0 and best <= n_t + 1) or best == 0:
                    break

    @_jit
    def _f16_to_f32(h):
        """Exact float16 (as uint16 bits) to float32."""
        hu = np.uint32(h)
        sign = (hu & np.uint32(0x8000)) << np.uint32(16)
        e = (hu >> np.uint32(10)) & np.uint32(0x1F)
        man = hu & np.uint32(0x3FF)
        if e == np.uint32(0x1F):  # Inf / NaN (payload kept)
            return _bits_to_f32(sign | np.uint32(0x7F800000) | (man << np.uint32(13)))  # type: ignore[call-arg]
        if e == np.uint32(0):  # zero / subnormal: man * 2**-24, exact in float32
            v = np.float32(man) * np.float32(5.960464477539063e-08)
            return -v if sign else v
        return _bits_to_f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (man << np.uint32(13)))  # type: ignore[call-arg]

    @_jit
    def _upcast_tile(src, s0, n, code, dst):
        """Columns [s0, s0 + n) of a uint16 block (float16 or bfloat16 bits) into ``dst``."""
        n_t = src.shape[0]
        if code == 3:
            for t in range(n_t):
                for j in range(n):
                    dst[t, j] = _bits_to_f32(np.uint32(src[t, s0 + j]) << np.uint32(16))  # type: ignore[call-arg]
        else:
            for t in range(n_t):
                for j in range(n):
                    dst[t, j] = _f16_to_f32(src[t, s0 + j])

    # The only fastmath flag in this module: reassociation of the sums over rows, so that LLVM
    # keeps vector partial sums. The order is fixed by the compiled code: deterministic.
    _jit_sum = numba.njit(cache=True, nogil=True, fastmath={"reassoc"})

    @_jit_sum
    def _residual_sum(xr, mv, av, at, rcf, t):
        """sum_j ((xr_j - mv_j) - av_j rcf[at_j + t])^2 over the ``av.shape[0]`` rows
        (``at_j + t``: the row's centred reference value of epoch t in ``rcf``; vectorised;
        reassociated)."""
        s = 0.0
        for j in range(av.shape[0]):
            e = (np.float64(xr[j]) - mv[j]) - av[j] * rcf[at[j] + t]
            s += e * e
        return s

    @_jit_sum
    def _residual_sum4(x0, x1, x2, x3, mv, av, at, rcf, t):
        """:func:`_residual_sum` of the four epochs t .. t + 3 in one pass over the rows: the
        row's mean, a and reference position loaded once for the four (vectorised;
        reassociated)."""
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        one = np.uint64(1)
        for j in range(av.shape[0]):
            q = at[j] + t
            m = mv[j]
            aj = av[j]
            e0 = (np.float64(x0[j]) - m) - aj * rcf[q]
            e1 = (np.float64(x1[j]) - m) - aj * rcf[q + one]
            e2 = (np.float64(x2[j]) - m) - aj * rcf[q + one + one]
            e3 = (np.float64(x3[j]) - m) - aj * rcf[q + one + one + one]
            s0 += e0 * e0
            s1 += e1 * e1
            s2 += e2 * e2
            s3 += e3 * e3
        return s0, s1, s2, s3

    @_jit
    def _sub_block(
        x, c0, o0, n, unit, rnorm, rmean, rcf, rsorted, rorder, ranchor, rraw, ref_pos, ref_ids,
        mode, a, b, anchor, level, corr, residual, energy, spread, flags,
        residual_t, energy_t, spread_t,
        tot, dif, mm, kind, proj, ssq, bestv, ib, clean, pack, lanes, exact,
    ):  # fmt: skip
        """Fit columns [c0, c0 + n) of ``x`` (Tw, *), results at [o0, o0 + n).

        ``exact``: the values are float32 (or narrower) and Tw < 2^29, so that a row's float64
        sum is exact when the row is constant: its mean is then its value, its centred values
        are 0 and its ``sum xc^2`` is 0, and (the converse) a row whose ``sum xc^2`` is 0 is
        constant. Constant rows are then told from their ``sum xc^2`` after pass 2, instead of
        a second accumulator ``sum |x - x(0)|`` in pass 1.

        Every hot loop indexes 1-D contiguous views with the loop variable only and has no
        branch or select (numba's negative-index handling, and the masked loads/stores LLVM
        makes of selects, would stop or slow the vectorisation). Rows with NaN/Inf are zeroed
        in a copy of the sub-block (``clean``) instead, only when there are any."""
        n_t = x.shape[0]
        n_m = unit.shape[0]
        c1 = c0 + n
        md = mode[o0 : o0 + n]
        av = a[o0 : o0 + n]
        sp = spread[o0 : o0 + n]
        tv = tot[:n]
        dv = dif[:n]
        mv = mm[:n]
        kv = kind[:n]
        bv = bestv[:n]
        # ---- pass 1: sum (in epoch order, as numpy), and sum |x - x(0)| (zero iff constant)
        x0 = x[0, c0:c1]
        for j in range(n):
            tv[j] = np.float64(x0[j])
            dv[j] = 0.0
        if exact:  # four epochs per pass over the rows, added in epoch order (the same bits)
            t = 1
            while t + 4 <= n_t:
                xa = x[t, c0:c1]
                xb = x[t + 1, c0:c1]
                xc = x[t + 2, c0:c1]
                xd = x[t + 3, c0:c1]
                for j in range(n):
                    v = tv[j] + np.float64(xa[j])
                    v += np.float64(xb[j])
                    v += np.float64(xc[j])
                    tv[j] = v + np.float64(xd[j])
                t += 4
            while t < n_t:
                xr = x[t, c0:c1]
                for j in range(n):
                    tv[j] += np.float64(xr[j])
                t += 1
        else:
            for t in range(1, n_t):
                xr = x[t, c0:c1]
                for j in range(n):
                    v = np.float64(xr[j])
                    tv[j] += v
                    dv[j] += abs(v - np.float64(x0[j]))
        # per row: the value subtracted to centre. Varying finite rows: their mean; constant
        # rows: their value (centred values exactly 0, x^2 its square; with ``exact``, their
        # mean is their value, and they are found after pass 2); NaN/Inf rows: 0 (their
        # values are zeroed in ``clean``)
        inv = np.float64(n_t)
        dirty = False
        for j in range(n):
            if not np.isfinite(tv[j]):
                kv[j] = 2
                mv[j] = 0.0
                dirty = True
            elif not exact and dv[j] == 0.0:
                kv[j] = 1
                mv[j] = np.float64(x0[j])
            else:
                kv[j] = 0
                mv[j] = tv[j] / inv
        if dirty:
            for t in range(n_t):
                xr = x[t, c0:c1]
                cr = clean[t, :n]
                for j in range(n):
                    cr[j] = 0 if kv[j] == 2 else xr[j]
            x = clean
            c0 = 0
            c1 = n
        # ---- pass 2: per row sum xc^2 and the M projections, per epoch spread and energy,
        # on the rows packed in groups of 8 (the last group padded with zero rows whose
        # centres are 0: they add nothing to the epochs' sums)
        n8 = (n + 7) // 8 * 8
        full = n - n % 8
        _pack8(x, c0, full, pack)  # type: ignore[call-arg]
        if full < n:
            g = full // 8
            for t in range(n_t):
                for r in range(8):
                    j = full + r
                    pack[g, t, r] = x[t, c0 + j] if j < n else 0
            for j in range(n, n8):
                mm[j] = 0.0
        _project8(pack, mm, unit, proj, ssq, lanes, n8)
        for j in range(n):
            sp[j] = ssq[j]
        if exact:  # constant rows: their mean is their value, their sum xc^2 is 0 (exact)
            for j in range(n):
                if kv[j] == 0 and sp[j] == 0.0:
                    kv[j] = 1
        # ---- per row: argmax |proj| (ties: lowest id), a, b, corr, residual, flags
        pr = proj[0, :n]
        for j in range(n):
            bv[j] = pr[j]
            md[j] = 0
        for m in range(1, n_m):
            pr = proj[m, :n]
            for j in range(n):
                p = pr[j]
                q = bv[j]
                c = abs(p) > abs(q)
                bv[j] = p if c else q
                old = md[j]
                md[j] = old + (m - old) * np.int64(c)  # (no select: it would be a masked store)
        for j in range(n):
            i = o0 + j
            ssx = sp[j]
            kj = kv[j]
            if kj == 0:
                k = md[j]
                pm = bv[j]
                a_s = pm / rnorm[k]
                av[j] = a_s
                b[i] = mv[j] - a_s * rmean[k]
                # the line's root in r, for the anchor's search below (NaN: no search)
                tv[j] = rmean[k] - mv[j] / a_s if a_s != 0.0 else np.nan
                nrm = np.sqrt(ssx)
                corr[i] = pm / nrm if nrm > 0 else 0.0
                residual[i] = max(ssx - pm * pm, 0.0)
                energy[i] = ssx + n_t * (mv[j] * mv[j])
                flags[i] = 0
            else:
                md[j] = 0
                av[j] = 0.0
                corr[i] = 0.0
                residual[i] = 0.0
                anchor[i] = 0
                tv[j] = np.nan
                if kj == 1:
                    b[i] = mv[j]
                    level[i] = mv[j]
                    energy[i] = ssx + n_t * (mv[j] * mv[j])
                    flags[i] = FLAG_CONSTANT
                else:
                    b[i] = np.nan
                    level[i] = np.nan
                    energy[i] = ssx
                    flags[i] = FLAG_NONFINITE
        # ---- the anchors (as cmd.anchor_rows): per row, the lower bound of the root in the
        # sorted reference (the number of values below it), branch-free, all rows of the
        # sub-block step by step (independent rows overlap), then the nearer of its two
        # neighbours in |fitted value| (ties: the smaller reference value)
        # (flat tables and unsigned indices: no negative-index handling in the gathers)
        sflat = rsorted.ravel()
        oflat = rorder.ravel()
        for j in range(n):
            ib[j] = np.uint64(md[j]) * np.uint64(n_t)  # the row's reference in sflat
        size = n_t
        while size > 1:
            half = np.uint64(size // 2)
            for j in range(n):
                bj = np.uint64(ib[j])
                ib[j] = bj + half if sflat[bj + half] < tv[j] else bj
            size -= size // 2
        top = np.uint64(n_t - 1)
        for j in range(n):
            if kv[j] != 0:  # constant or NaN/Inf: anchored at 0, level set above
                continue
            i = o0 + j
            a_s = av[j]
            ku = np.uint64(md[j])
            first = ku * np.uint64(n_t)
            bj = np.uint64(ib[j])
            lo = bj + np.uint64(1) if sflat[bj] < tv[j] else bj  # the lower bound, in sflat
            p0 = lo - np.uint64(1) if lo > first else first
            p1 = lo if lo < first + top else first + top
            y0 = mv[j] + a_s * (sflat[p0] - rmean[ku])
            y1 = mv[j] + a_s * (sflat[p1] - rmean[ku])
            take1 = abs(y1) < abs(y0)
            pos = p1 if take1 else p0
            flat = a_s == 0.0
            anchor[i] = 0 if flat else oflat[pos]
            level[i] = mv[j] if flat else (y1 if take1 else y0)
        for r in range(ref_pos.shape[0]):  # rows that are references (the last one wins)
            p = ref_pos[r]
            if p >= o0 and p < o0 + n:
                k = ref_ids[r]
                mode[p] = k
                a[p] = 1.0
                b[p] = 0.0
                anchor[p] = ranchor[k]
                level[p] = rraw[k, ranchor[k]]
                corr[p] = 1.0
                residual[p] = 0.0
                flags[p] |= FLAG_REFERENCE
        # ---- pass 3: per epoch, the residual of the sub-block's rows summed directly,
        # sum_j (xc_tj - a_j rc_(m_j)t)^2 (constant and NaN/Inf rows: a = 0, xc = 0; reference
        # rows: a = 1 on their own mode), four epochs per pass over the rows (the row's mean,
        # a and place in ``rcf`` loaded once for the four), the mode's centred reference
        # gathered per row from the flat (M, Tw) ``rcf`` (in L1)
        for j in range(n):
            ib[j] = np.uint64(md[j]) * np.uint64(n_t)  # the row's reference in rcf
        t = 0
        while t + 4 <= n_t:
            r0, r1, r2, r3 = _residual_sum4(
                x[t, c0:c1], x[t + 1, c0:c1], x[t + 2, c0:c1], x[t + 3, c0:c1],
                mv, av, ib, rcf, np.uint64(t),
            )  # fmt: skip
            residual_t[t] += r0
            residual_t[t + 1] += r1
            residual_t[t + 2] += r2
            residual_t[t + 3] += r3
            t += 4
        while t < n_t:
            residual_t[t] += _residual_sum(x[t, c0:c1], mv, av, ib, rcf, np.uint64(t))
            t += 1

    @_jit
    def _workspace(n_t, n_m, w, dtype):
        """The per-call work buffers of :func:`_sub_block` for sub-blocks of ``w`` rows (those
        the packed groups use rounded up to a multiple of 8 rows), and the per-epoch lanes
        :func:`_project8` adds to (zeroed)."""
        w8 = (w + 7) // 8 * 8
        return (
            np.empty(w), np.empty(w), np.empty(w8), np.empty(w, dtype=np.uint8),
            np.empty((n_m, w8)), np.empty(w8), np.empty(w), np.empty(w, dtype=np.uint64),
            np.empty((w8 // 8, n_t, 8), dtype=dtype), np.zeros((n_t, 2, 4)),
        )  # fmt: skip

    @_jit
    def _fold_lanes(lanes, spread_t, energy_t):
        """Add the per-epoch lanes of :func:`_project8` to ``spread_t`` and ``energy_t``."""
        for t in range(lanes.shape[0]):
            spread_t[t] += (lanes[t, 0, 0] + lanes[t, 0, 1]) + (lanes[t, 0, 2] + lanes[t, 0, 3])
            energy_t[t] += (lanes[t, 1, 0] + lanes[t, 1, 1]) + (lanes[t, 1, 2] + lanes[t, 1, 3])

    @_jit
    def _fit_direct(
        xt, sub, unit, rnorm, rmean, rcf, rsorted, rorder, ranchor, rraw, ref_pos, ref_ids,
        mode, a, b, anchor, level, corr, residual, energy, spread, flags,
        residual_t, energy_t, spread_t,
    ):  # fmt: skip
        """All sub-blocks of a float32/float64 ``xt``; work buffers allocated once per call."""
        n_t, n_s = xt.shape
        n_m = unit.shape[0]
        w = max(1, min(sub, n_s))
        tot, dif, mm, kind, proj, ssq, bestv, ib, pack, lanes = _workspace(n_t, n_m, w, xt.dtype)
        clean = np.empty((n_t, w), dtype=xt.dtype)
        exact = xt.itemsize <= 4 and n_t < _EXACT_SUM_EPOCHS
        for s0 in range(0, n_s, w):
            n = min(w, n_s - s0)
            _sub_block(
                xt, s0, s0, n, unit, rnorm, rmean, rcf, rsorted, rorder, ranchor, rraw,
                ref_pos, ref_ids, mode, a, b, anchor, level, corr, residual, energy, spread, flags,
                residual_t, energy_t, spread_t,
                tot, dif, mm, kind, proj, ssq, bestv, ib, clean, pack, lanes, exact,
            )  # fmt: skip
        _fold_lanes(lanes, spread_t, energy_t)

    @_jit
    def _fit_upcast(
        xt, code, sub, unit, rnorm, rmean, rcf, rsorted, rorder, ranchor, rraw, ref_pos, ref_ids,
        mode, a, b, anchor, level, corr, residual, energy, spread, flags,
        residual_t, energy_t, spread_t,
    ):  # fmt: skip
        """All sub-blocks of a float16/bfloat16 (uint16 bits) ``xt``, each upcast to float32."""
        n_t, n_s = xt.shape
        n_m = unit.shape[0]
        w = max(1, min(sub, n_s))
        tot, dif, mm, kind, proj, ssq, bestv, ib, pack, lanes = _workspace(
            n_t, n_m, w, np.float32
        )
        tile = np.empty((n_t, w), dtype=np.float32)
        exact = n_t < _EXACT_SUM_EPOCHS
        for s0 in range(0, n_s, w):
            n = min(w, n_s - s0)
            _upcast_tile(xt, s0, n, code, tile)
            _sub_block(
                tile, 0, s0, n, unit, rnorm, rmean, rcf, rsorted, rorder, ranchor, rraw,
                ref_pos, ref_ids, mode, a, b, anchor, level, corr, residual, energy, spread, flags,
                residual_t, energy_t, spread_t,
                tot, dif, mm, kind, proj, ssq, bestv, ib, tile, pack, lanes, exact,
            )  # fmt: skip
        _fold_lanes(lanes, spread_t, energy_t)


if _HAVE_NUMBA:

    @_jit
    def _group_sums(groups, flags, corr, residual, energy, spread, out):
        """:func:`pipeline.kernels.cmd.group_sums` in one pass (each sum in row order)."""
        bad = FLAG_CONSTANT | FLAG_NONFINITE
        for i in range(groups.shape[0]):
            g = groups[i]
            f = flags[i]
            valid = (f & bad) == 0
            out[g, 0] += 1.0
            out[g, 1] += 1.0 if valid else 0.0
            out[g, 2] += abs(corr[i]) if valid else 0.0
            out[g, 3] += residual[i]
            out[g, 4] += energy[i]
            out[g, 5] += 1.0 if (f & FLAG_NONFINITE) != 0 else 0.0
            out[g, 6] += spread[i]


def group_sums_fused(
    groups: Any, n: int, flags: Any, corr: Any, residual: Any, energy: Any, spread: Any
) -> np.ndarray:
    """:func:`pipeline.kernels.cmd.group_sums` compiled: one pass over the rows instead of
    seven ``bincount`` passes, the same bits (every sum in row order)."""
    if not _HAVE_NUMBA:
        raise RuntimeError("numba is not installed: use pipeline.kernels.cmd.group_sums")
    g = np.ascontiguousarray(groups, dtype=np.int64)
    if g.size and (g.min() < 0 or g.max() >= n):
        raise IndexError(f"group ids must lie in [0, {n})")
    out = np.zeros((n, 7))
    _group_sums(
        g,
        np.ascontiguousarray(flags, dtype=np.uint8),
        np.ascontiguousarray(corr, dtype=np.float64),
        np.ascontiguousarray(residual, dtype=np.float64),
        np.ascontiguousarray(energy, dtype=np.float64),
        np.ascontiguousarray(spread, dtype=np.float64),
        out,
    )
    return out


def _as_kernel_input(xt: Any, dtype_code: str | None) -> tuple[np.ndarray, int]:
    """The C-contiguous (Tw, S) array the kernel reads, and its dtype code."""
    x = np.asarray(xt)
    if x.ndim != 2:
        raise ValueError(f"xt must be a 2-D time-major block (Tw, S), got shape {x.shape}")
    if dtype_code is None:
        if x.dtype.name == "bfloat16":  # ml_dtypes / torch-numpy bfloat16
            dtype_code = "bfloat16"
        elif x.dtype in (np.float32, np.float64, np.float16):
            dtype_code = x.dtype.name
        else:
            raise TypeError(
                f"unsupported block dtype {x.dtype}; bfloat16 bits as uint16 need "
                'dtype_code="bfloat16"'
            )
    if dtype_code not in _CODES:
        raise ValueError(f"dtype_code must be one of {sorted(_CODES)}, got {dtype_code!r}")
    code = _CODES[dtype_code]
    if code >= 2:
        if x.dtype.itemsize != 2:
            raise TypeError(f"{dtype_code} block must hold 2-byte values, got {x.dtype}")
        x = x.view(np.uint16)
    elif x.dtype != np.dtype(dtype_code):
        raise TypeError(f"dtype_code {dtype_code!r} does not match the block dtype {x.dtype}")
    if x.shape[0] < 1:
        raise ValueError("the window must hold at least one epoch")
    return np.ascontiguousarray(x), code


def fit_block_fused(
    xt: Any,
    refs: References,
    ref_rows: Any = None,
    *,
    dtype_code: str | None = None,
    alloc: Any = None,
) -> BlockFit:
    """:func:`pipeline.kernels.cmd.fit_block` of ``xt.T``, fused (see the module docstring).

    Parameters
    ----------
    xt
        The time-major block (Tw, S): float32, float64, float16, or bfloat16 given as its
        ``uint16`` bit pattern with ``dtype_code="bfloat16"`` (an ``ml_dtypes`` bfloat16 array
        is recognised by itself). A non-contiguous block is copied first.
    refs
        The mode references (numpy arrays).
    ref_rows
        Optional ``(row positions, mode ids)`` of rows that are references themselves.
    dtype_code
        ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``; inferred when omitted.
    alloc
        Optional ``alloc(field, n, dtype)`` giving the per-row result arrays (1-D, contents
        undefined), e.g. buffers a thread reuses from one block to the next: a fresh 1 MB
        array can come from new pages, faulted in on every call (35 against 29 ms per
        131,072-row block where they did, in a benchmark). Default: new arrays.

    Returns
    -------
    BlockFit
        The same fields and semantics as :func:`~pipeline.kernels.cmd.fit_block`. The floats
        agree with it to rounding (the sums are taken in another order); flags are equal and
        modes too, except where two modes' |corr| are equal to rounding.
    """
    if not _HAVE_NUMBA:
        raise RuntimeError("numba is not installed: use pipeline.kernels.cmd.fit_block")
    x, code = _as_kernel_input(xt, dtype_code)
    n_t, n_s = x.shape
    unit = np.ascontiguousarray(refs.unit, dtype=np.float64)
    if unit.ndim != 2 or unit.shape[1] != n_t or unit.shape[0] < 1:
        raise ValueError(f"references of shape {unit.shape} do not fit a window of {n_t} epochs")
    rnorm = np.ascontiguousarray(refs.norm, dtype=np.float64)
    rmean = np.ascontiguousarray(refs.mean, dtype=np.float64)
    rcf = np.ascontiguousarray(refs.centred, dtype=np.float64).ravel()  # (M, Tw), mode-major
    rsorted = np.ascontiguousarray(refs.sorted, dtype=np.float64)
    rorder = np.ascontiguousarray(refs.order, dtype=np.int64)
    ranchor = np.ascontiguousarray(refs.anchor, dtype=np.int64)
    rraw = np.ascontiguousarray(refs.raw, dtype=np.float64)
    if ref_rows is None:
        ref_pos = np.zeros(0, dtype=np.int64)
        ref_ids = np.zeros(0, dtype=np.int64)
    else:
        ref_pos = np.ascontiguousarray(ref_rows[0], dtype=np.int64).ravel()
        ref_ids = np.ascontiguousarray(ref_rows[1], dtype=np.int64).ravel()
        if ref_pos.shape != ref_ids.shape:
            raise ValueError("ref_rows: positions and mode ids differ in length")
        # positions outside [0, S) are ignored, as fit_block (which matches them per sub-block)
        if ref_ids.size and (ref_ids.min() < 0 or ref_ids.max() >= unit.shape[0]):
            raise IndexError("ref_rows mode id out of range")
    if alloc is None:
        alloc = _new_array
    flags = alloc("flags", n_s, np.uint8)
    flags.fill(0)
    out = BlockFit(
        mode=alloc("mode", n_s, np.int64),
        a=alloc("a", n_s, np.float64),
        b=alloc("b", n_s, np.float64),
        anchor=alloc("anchor", n_s, np.int64),
        level=alloc("level", n_s, np.float64),
        corr=alloc("corr", n_s, np.float64),
        residual=alloc("residual", n_s, np.float64),
        energy=alloc("energy", n_s, np.float64),
        spread=alloc("spread", n_s, np.float64),
        flags=flags,
        residual_t=np.zeros(n_t),
        energy_t=np.zeros(n_t),
        spread_t=np.zeros(n_t),
    )
    outs = (
        out.mode, out.a, out.b, out.anchor, out.level, out.corr, out.residual, out.energy,
        out.spread, out.flags, out.residual_t, out.energy_t, out.spread_t,
    )  # fmt: skip
    ins = (unit, rnorm, rmean, rcf, rsorted, rorder, ranchor, rraw, ref_pos, ref_ids)
    if code >= 2:
        _fit_upcast(x, code, SUB_ROWS, *ins, *outs)
    else:
        _fit_direct(x, SUB_ROWS, *ins, *outs)
    return out


def _new_array(_field: str, n: int, dtype: Any) -> np.ndarray:
    return np.empty(n, dtype=dtype)


def stored_coefficients_fused(
    mode: Any, a: Any, level: Any, anchor: Any, refs: References, *, alloc: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pipeline.kernels.cmd.stored_coefficients` compiled (numba), row by row: the same
    float32 ``a`` and ``level`` bit for bit, without its (rows, Tw) work arrays. ``alloc``: as
    :func:`fit_block_fused`'s (fields ``a32`` and ``level32``)."""
    if not _HAVE_NUMBA:
        raise RuntimeError("numba is not installed: use pipeline.kernels.cmd.stored_coefficients")
    n = int(np.asarray(a).shape[0])
    if alloc is None:
        alloc = _new_array
    a32 = alloc("a32", n, np.float32)
    l32 = alloc("level32", n, np.float32)
    _store_rows(
        np.ascontiguousarray(mode, dtype=np.int64),
        np.ascontiguousarray(a, dtype=np.float64),
        np.ascontiguousarray(level, dtype=np.float64),
        np.ascontiguousarray(anchor, dtype=np.int64),
        np.ascontiguousarray(refs.raw, dtype=np.float64),
        np.ascontiguousarray(refs.sorted, dtype=np.float64),
        a32,
        l32,
    )
    return a32, l32


def warm_up(dtypes: tuple[str, ...] = tuple(_CODES)) -> None:
    """Compile (or load from numba's cache) the kernel for ``dtypes`` on a tiny block.

    The first compilation takes tens of seconds and is cached on disk (numba's cache: beside
    this module, or ``NUMBA_CACHE_DIR``); later processes load it in about a second.
    """
    if not _HAVE_NUMBA:
        return
    refs = References.from_profiles(np.array([[0.0, 1.0, 3.0], [2.0, 1.0, 0.5]]))
    x64 = np.array([[1.0, 2.0, 5.0, 1.0], [0.0, 2.0, 1.0, 1.0], [2.0, 2.0, -1.0, 1.0]])
    rows = (np.array([0]), np.array([1]))
    got = fit_block_fused(x64, refs, rows)
    stored_coefficients_fused(got.mode, got.a, got.level, got.anchor, refs)
    group_sums_fused(got.mode, 2, got.flags, got.corr, got.residual, got.energy, got.spread)
    if "float64" in dtypes:
        fit_block_fused(x64, refs, rows)
    if "float32" in dtypes:
        fit_block_fused(x64.astype(np.float32), refs, rows)
    if "float16" in dtypes:
        fit_block_fused(x64.astype(np.float16), refs, rows)
    if "bfloat16" in dtypes:
        bf = (x64.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        fit_block_fused(bf, refs, rows, dtype_code="bfloat16")
