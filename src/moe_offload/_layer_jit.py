"""numba kernels of the "rowtile" format; imported lazily by kernels_layer.py (numba is slow to import).

Layout (kernels_layer.pack_rowtile): uint8 tiles [N/16, K/group, T]. Tile (b, g) holds rows
16b..16b+15 over k in group g: group/32 steps of codes, then 16 fp16 scales, then 16 fp16 mins
(W = q * scale + min). In a step each 64-byte vector is 16 rows x 4 bytes, so that one 32-bit
lane of a `vpdpbusd` (u8 codes x s8 activations, four products summed into an int32) is one
output row: no horizontal sums, and the activations are one broadcast dword. Per step of 32 k:
  8-bit: 8 vectors, byte 4r+i of vector v = code of k = 4v+i
  4-bit: 4 vectors, low nibble k = 8v+i, high nibble k = 8v+4+i
  2-bit: 2 vectors, bits 2f..2f+1 hold k = 16v+4f+i
  3-bit: the 2-bit layout of the low two bits, then 64 bytes whose bit f (0..7) of byte 4r+i is
         bit 2 of the code of k = 4f+i.
Activations are int8 per group with one fp32 scale xs: per group and row,
  sum_k W x~ = scale * xs * sum_k q xq + min * xs * sum_k xq,   x~ = xs * xq,
the exact product of W with the rounded activations. (Taking the min term from the unrounded sum
of x instead triples the error: the codes q have a large mean, so q's share of the rounding error
no longer cancels against the min's; measured 2.6% vs 0.6% on a 4-bit [7168, 1024] matrix.)

The inner loop is written in LLVM IR (numba has no vector types): one intrinsic computes a whole
row block over a range of groups, accumulators in registers. The dot step comes in three
variants, chosen at compile time by the dtype of a zero-size `tag` array (numba compiles one
specialization per dtype, and never compiles a VNNI one on a CPU without VNNI, where LLVM could
not select it): int8 -> vpdpbusd on zmm (AVX512-VNNI), int16 -> vpdpbusd on two ymm (AVX-VNNI),
int64 -> pmaddubsw on two ymm, the pair sums of a whole step added in i16, then one pmaddwd by
ones (AVX2: exact for codes of 4 bits or fewer, whose step sums stay below 2^15; 8-bit codes take
the portable step. One pmaddwd a step instead of one per pmaddubsw: on CPUs with a single vector
multiply port, such as AMD Zen 1, the multiplies are what bounds the step), int32 -> plain integer IR
(zext/sext, mul, pairwise adds) that LLVM lowers to pmaddwd on any x86.
Every load is unaligned (align 1): the caller's buffers carry no alignment promise.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit_cache import install

install()  # before the first decorator: a change to any kernel file recompiles every kernel

_OPTS = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)

TAGS = {"vnni512": np.int8, "vnni256": np.int16, "avx2": np.int64, "portable": np.int32}
STEP_BYTES = {2: 128, 3: 192, 4: 256, 8: 512}  # bytes of codes per 32 k of 16 rows
# A layer call's phase is split into CLAIMS_PER_THREAD claims a thread: consecutive units lie next to
# each other in memory, so longer claims are longer runs of reads, which the prefetchers follow; two
# a thread rather than one leave part of a thread's share to the other when it is slowed (the
# loader's reads, another process). Within a claim, BATCH phase-1 units read their gate rows, then
# their up rows. Measured on AMD Zen 3 (AVX2), interleaved calls from RAM, median: against 4 units a
# claim with gate and up rows alternating every unit, quarter 408-438 -> 370-401 us, Qwen3-style
# 82-87 -> 68-74 us; one claim a thread was no faster on quarter, 6-8% faster on Qwen3-style.
CLAIMS_PER_THREAD = 2
BATCH = 16
# The steps prefetch the tile PREFETCH_BYTES ahead of the one they compute (the rest of its row
# block, then the next one), at the locality PREFETCH_LOCALITY gives their variant (0: non-temporal,
# 2: into L2; LLVM's llvm.prefetch levels). Measured, layer calls from RAM and decode time a token:
# - AMD Zen 1 (AVX2 only): quarter layer 1030 -> 890 us with a kept prefetch, 2 to 12 KiB ahead
#   alike; non-temporal then made quarter decode 0.81-0.92x the time a token, because weights kept in
#   the caches evict what the Python between kernel calls runs on (a few numpy/torch calls right
#   after a 12 MB layer call took 90 us instead of 11).
# - Intel Xeon with AVX-512 VNNI and AMX: non-temporal was slower than none (quarter decode 57-63
#   against 45-55 ms a token); into L2 4 KiB ahead 30-40 ms, no slower than L1 (locality 3) 4 KiB
#   ahead and faster than either 8 KiB ahead or L1 2 KiB ahead; vnni512 layer call 850-940 -> 600-760
#   us, vnni256 880-940 -> 660-810 us.
PREFETCH_BYTES = 4096
PREFETCH_LOCALITY = {"vnni512": 2, "vnni256": 2, "avx2": 0}  # the portable step does not prefetch

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32, _f16 = ir.FloatType(), ir.HalfType()
_v64i8 = ir.VectorType(_i8, 64)
_v16i32 = ir.VectorType(_i32, 16)
_v16f = ir.VectorType(_f32, 16)
_v16h = ir.VectorType(_f16, 16)


def _mask(idx):
    return ir.Constant(ir.VectorType(_i32, len(idx)), [ir.Constant(_i32, i) for i in idx])


def _splat8(c):
    return ir.Constant(_v64i8, [ir.Constant(_i8, c)] * 64)


def _variant(tag_type):
    return {types.int8: "vnni512", types.int16: "vnni256", types.int64: "avx2", types.int32: "portable"}[tag_type.dtype]


def _dot(builder, variant, acc, a, b):
    """acc [16 x i32] += sums of 4 products of u8 a [64 x i8] and s8 b [64 x i8], lane by lane."""
    if variant == "vnni512":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v16i32, [_v16i32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(a, _v16i32), builder.bitcast(b, _v16i32)])
    if variant == "vnni256":
        v8 = ir.VectorType(_i32, 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8] * 3),
                                            "llvm.x86.avx512.vpdpbusd.256")
        a32, b32 = builder.bitcast(a, _v16i32), builder.bitcast(b, _v16i32)
        halves = []
        for h in range(2):
            m = _mask(range(8 * h, 8 * h + 8))
            halves.append(builder.call(fn, [builder.shuffle_vector(acc, acc, m), builder.shuffle_vector(a32, a32, m),
                                            builder.shuffle_vector(b32, b32, m)]))
        return builder.shuffle_vector(halves[0], halves[1], _mask(range(16)))
    # portable: u8 * s8 is exact in i16 (255 * 127 < 2^15); pairwise sums in i32 (the pmaddwd pattern)
    v64i16, v32i32 = ir.VectorType(_i16, 64), ir.VectorType(_i32, 32)
    a16, b16 = builder.zext(a, v64i16), builder.sext(b, v64i16)
    even, odd = _mask(range(0, 64, 2)), _mask(range(1, 64, 2))
    p = builder.add(builder.mul(builder.sext(builder.shuffle_vector(a16, a16, even), v32i32),
                                builder.sext(builder.shuffle_vector(b16, b16, even), v32i32)),
                    builder.mul(builder.sext(builder.shuffle_vector(a16, a16, odd), v32i32),
                                builder.sext(builder.shuffle_vector(b16, b16, odd), v32i32)))
    e16, o16 = _mask(range(0, 32, 2)), _mask(range(1, 32, 2))
    return builder.add(acc, builder.add(builder.shuffle_vector(p, p, e16), builder.shuffle_vector(p, p, o16)))


_v16i16, _v32i8, _v8i32 = ir.VectorType(_i16, 16), ir.VectorType(_i8, 32), ir.VectorType(_i32, 8)


def _pair_sums(builder, a, b):
    """AVX2: u8 a x s8 b [64 x i8] -> [32 x i16], each the sum of two neighbouring products
    (pmaddubsw on two ymm; saturating, so exact only while |sum| < 2^15)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v16i16, [_v32i8, _v32i8]),
                                        "llvm.x86.avx2.pmadd.ub.sw")
    halves = [builder.call(fn, [builder.shuffle_vector(a, a, m), builder.shuffle_vector(b, b, m)])
              for m in (_mask(range(32)), _mask(range(32, 64)))]
    return builder.shuffle_vector(halves[0], halves[1], _mask(range(32)))


def _widen_pairs(builder, acc, s):
    """acc [16 x i32] += neighbouring pairs of s [32 x i16] summed (pmaddwd by ones on two ymm)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v8i32, [_v16i16, _v16i16]),
                                        "llvm.x86.avx2.pmadd.wd")
    ones = ir.Constant(_v16i16, [ir.Constant(_i16, 1)] * 16)
    halves = [builder.call(fn, [builder.shuffle_vector(s, s, m), ones]) for m in (_mask(range(16)), _mask(range(16, 32)))]
    return builder.add(acc, builder.shuffle_vector(halves[0], halves[1], _mask(range(16))))


def _ptr(builder, base, off, ty):
    return builder.bitcast(builder.gep(base, [off]), ty.as_pointer())


def _xword(builder, xp, off):
    """The 4 activations at xp + off broadcast to every lane, as 64 bytes."""
    d = builder.load(_ptr(builder, xp, ir.Constant(_i64, off), _i32), align=1)
    v = builder.insert_element(ir.Constant(_v16i32, None), d, ir.Constant(_i32, 0))
    return builder.bitcast(builder.shuffle_vector(v, v, _mask([0] * 16)), _v64i8)


def _step(builder, variant, bits, cp, xps, accs):
    """One step (32 k of 16 rows) at codes cp for each token row j (activations xps[j], accumulator
    chains accs[j], used in turn): each unpacked code vector serves every token row."""
    ld = lambda off: builder.load(_ptr(builder, cp, ir.Constant(_i64, off), _v64i8), align=1)
    n = 0
    if variant == "avx2" and bits == 8:  # 8-bit codes would saturate pmaddubsw's i16 pair sums
        variant = "portable"

    pairs = [[None, None] for _ in xps]  # avx2: two i16 chains of pair sums per row, widened once a step

    def dot(codes, xoff):
        nonlocal n
        for j, xp in enumerate(xps):
            if variant == "avx2":
                p = _pair_sums(builder, codes, _xword(builder, xp, xoff))
                pairs[j][n % 2] = p if pairs[j][n % 2] is None else builder.add(pairs[j][n % 2], p)
            else:
                c = n % len(accs[j])
                accs[j][c] = _dot(builder, variant, accs[j][c], codes, _xword(builder, xp, xoff))
        n += 1

    if bits == 8:
        for v in range(8):
            dot(ld(64 * v), 4 * v)
    elif bits == 4:
        for v in range(4):
            w = ld(64 * v)
            dot(builder.and_(w, _splat8(15)), 8 * v)
            dot(builder.lshr(w, _splat8(4)), 8 * v + 4)
    else:
        hi = ld(128) if bits == 3 else None
        for v in range(2):
            w = ld(64 * v)
            for f in range(4):
                c = builder.and_(builder.lshr(w, _splat8(2 * f)) if f else w, _splat8(3))
                if hi is not None:  # bit 2 of the code from bit 4v+f of the high plane
                    s = 4 * v + f - 2
                    h = builder.shl(hi, _splat8(-s)) if s < 0 else (builder.lshr(hi, _splat8(s)) if s else hi)
                    c = builder.or_(c, builder.and_(h, _splat8(4)))
                dot(c, 16 * v + 4 * f)
    if variant == "avx2":  # every pair sum of the step fits i16: at most 16 x 2 x 7 x 127 or 8 x 2 x 15 x 127
        for j, (p0, p1) in enumerate(pairs):
            accs[j][0] = _widen_pairs(builder, accs[j][0], builder.add(p0, p1))


def _prefetch(builder, start, nbytes, locality):
    """Ask for the cache lines of [start, start + nbytes): a read, at that locality (0-3)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                                        "llvm.prefetch.p0i8")
    with cgutils.for_range(builder, builder.udiv(builder.add(nbytes, ir.Constant(_i64, 63)), ir.Constant(_i64, 64))) as line:
        builder.call(fn, [builder.gep(start, [builder.mul(line.index, ir.Constant(_i64, 64))]), ir.Constant(_i32, 0),
                          ir.Constant(_i32, locality), ir.Constant(_i32, 1)])


def _rowblock_ir(builder, variant, nrows, base_a, tile_b, bits_v, g0_v, g1_v, group_v, xq_a, xs_a, xsum_a, out_a,
                 pf_v, x_stride, s_stride, out_stride):
    """The body of rowblock (nrows 1) and rowblocks (nrows token rows, their activations and outputs
    at the given byte strides): over groups g0..g1-1, the int32 sums of each step, then per group the
    tile's fp16 scales and mins (loaded once for every row) times the row's activation scale and sum."""
    p8 = _i8.as_pointer()
    row = lambda a, j, stride: builder.inttoptr(builder.add(a, builder.mul(ir.Constant(_i64, j), stride)), p8)
    base_p = builder.inttoptr(base_a, p8)
    xq_ps = [row(xq_a, j, x_stride) for j in range(nrows)]
    xs_ps = [builder.bitcast(row(xs_a, j, s_stride), _f32.as_pointer()) for j in range(nrows)]
    xsum_ps = [builder.bitcast(row(xsum_a, j, s_stride), _f32.as_pointer()) for j in range(nrows)]
    faccs = [cgutils.alloca_once_value(builder, ir.Constant(_v16f, [ir.Constant(_f32, 0.0)] * 16))
             for _ in range(nrows)]
    # four accumulator chains for one row (latency), two each for several (the rows are chains too)
    nacc = 4 if nrows == 1 else 2
    iaccs = [[cgutils.alloca_once(builder, _v16i32) for _ in range(nacc)] for _ in range(nrows)]
    steps = builder.udiv(group_v, ir.Constant(_i64, 32))
    zero = ir.Constant(_v16i32, [ir.Constant(_i32, 0)] * 16)
    ngroups = builder.sub(g1_v, g0_v)
    sw_end = builder.append_basic_block("rowtile.end")
    sw = builder.switch(bits_v, sw_end)
    for bits in (2, 3, 4, 8):
        bb = builder.append_basic_block(f"rowtile.bits{bits}")
        sw.add_case(ir.Constant(_i64, bits), bb)
        builder.position_at_end(bb)
        sb = STEP_BYTES[bits]
        with cgutils.for_range(builder, ngroups) as loop:
            g = builder.add(g0_v, loop.index)
            tile = builder.gep(base_p, [builder.mul(g, tile_b)])
            xgs = [builder.gep(xp, [builder.mul(g, group_v)]) for xp in xq_ps]
            for chains in iaccs:
                for p in chains:
                    builder.store(zero, p)
            if variant in PREFETCH_LOCALITY:
                with builder.if_then(builder.icmp_unsigned("!=", pf_v, ir.Constant(_i64, 0))):
                    _prefetch(builder, builder.gep(tile, [ir.Constant(_i64, PREFETCH_BYTES)]), tile_b,
                              PREFETCH_LOCALITY[variant])
            with cgutils.for_range(builder, steps) as sl:
                accs = [[builder.load(p) for p in chains] for chains in iaccs]
                koff = builder.mul(sl.index, ir.Constant(_i64, 32))
                _step(builder, variant, bits, builder.gep(tile, [builder.mul(sl.index, ir.Constant(_i64, sb))]),
                      [builder.gep(xg, [koff]) for xg in xgs], accs)
                for chains, vals in zip(iaccs, accs):
                    for p, v in zip(chains, vals):
                        builder.store(v, p)
            sm = builder.gep(tile, [builder.mul(steps, ir.Constant(_i64, sb))])
            scale = builder.fpext(builder.load(_ptr(builder, sm, ir.Constant(_i64, 0), _v16h), align=1), _v16f)
            mn = builder.fpext(builder.load(_ptr(builder, sm, ir.Constant(_i64, 32), _v16h), align=1), _v16f)
            splat = lambda f: builder.shuffle_vector(
                builder.insert_element(ir.Constant(_v16f, None), f, ir.Constant(_i32, 0)),
                ir.Constant(_v16f, None), _mask([0] * 16))
            for j in range(nrows):
                vals = [builder.load(p) for p in iaccs[j]]
                # summed pairwise, as the single-row code always did: the same int32 either way
                while len(vals) > 1:
                    vals = [builder.add(vals[i], vals[i + 1]) for i in range(0, len(vals), 2)]
                isum = vals[0]
                xsg = splat(builder.load(builder.gep(xs_ps[j], [g]), align=4))
                xsumg = splat(builder.load(builder.gep(xsum_ps[j], [g]), align=4))
                t = builder.fmul(builder.sitofp(isum, _v16f), builder.fmul(scale, xsg))
                builder.store(builder.fadd(builder.load(faccs[j]), builder.fadd(t, builder.fmul(mn, xsumg))), faccs[j])
        builder.branch(sw_end)
    builder.position_at_end(sw_end)
    for j in range(nrows):
        builder.store(builder.load(faccs[j]), builder.bitcast(row(out_a, j, out_stride), _v16f.as_pointer()), align=1)


@intrinsic
def rowblock(typingctx, tag, base, tile_bytes, bits, g0, g1, group, xq, xs, xsum, out, pf):
    """out[0:16] (fp32, at address out) = rows of one row block (tiles at address base) times the
    activations of groups g0..g1-1 (xq int8, xs/xsum fp32 per group, at those addresses). pf != 0:
    prefetch ahead (see PREFETCH_BYTES); 0 where the caller runs the same tiles again, whose
    prefetches would only cost instructions."""
    sig = types.void(tag, base, tile_bytes, bits, g0, g1, group, xq, xs, xsum, out, pf)
    variant = _variant(tag)

    def codegen(context, builder, signature, args):
        a = [context.cast(builder, v, t, types.int64) for v, t in zip(args[1:], signature.args[1:])]
        zero = ir.Constant(_i64, 0)
        _rowblock_ir(builder, variant, 1, *a, zero, zero, zero)
        return context.get_dummy_value()

    return sig, codegen


# Token rows rowblocks computes in one pass over a row block's tiles: ROWS_AT_ONCE, and the rest of
# a batch one at a time (each body is compiled into every caller for every variant: with 2-row
# passes too, compiling every variant took 65 s instead of 54).
ROWS_AT_ONCE = 4


@intrinsic
def rowblocks(typingctx, tag, base, tile_bytes, bits, g0, g1, group, xq, xs, xsum, out, pf, x_stride, s_stride,
              out_stride, n):
    """rowblock for n (ROWS_AT_ONCE or 1) token rows at once: row j's activations at xq + j x_stride,
    its scales and sums at xs/xsum + j s_stride, its outputs at out + j out_stride (bytes). Each code
    vector is loaded and unpacked once for all n rows, and each group's scales and mins converted
    once: prefill's token rows share the weights (same floats as n calls of rowblock)."""
    sig = types.void(tag, base, tile_bytes, bits, g0, g1, group, xq, xs, xsum, out, pf, x_stride, s_stride,
                     out_stride, n)
    variant = _variant(tag)

    def codegen(context, builder, signature, args):
        a = [context.cast(builder, v, t, types.int64) for v, t in zip(args[1:], signature.args[1:])]
        *rb_args, n_v = a
        if variant == "portable":  # the fallback keeps one body (compile time): row after row
            base_a, tile_b, bits_v, g0_v, g1_v, group_v, xq_a, xs_a, xsum_a, out_a, pf_v, xst, sst, ost = rb_args
            zero = ir.Constant(_i64, 0)
            with cgutils.for_range(builder, n_v) as loop:
                at = lambda ptr, stride: builder.add(ptr, builder.mul(loop.index, stride))
                _rowblock_ir(builder, variant, 1, base_a, tile_b, bits_v, g0_v, g1_v, group_v, at(xq_a, xst),
                             at(xs_a, sst), at(xsum_a, sst), at(out_a, ost), pf_v, zero, zero, zero)
            return context.get_dummy_value()
        end = builder.append_basic_block("rowblocks.end")
        sw = builder.switch(n_v, end)
        for nrows in (ROWS_AT_ONCE, 1):
            bb = builder.append_basic_block(f"rowblocks.n{nrows}")
            sw.add_case(ir.Constant(_i64, nrows), bb)
            builder.position_at_end(bb)
            _rowblock_ir(builder, variant, nrows, *rb_args)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def atomic_add(typingctx, arr, i, v):
    """arr[i] += v atomically (sequentially consistent); returns the old value. arr: int64 array."""
    sig = types.int64(arr, i, v)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.int64)
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", builder.gep(ary.data, [idx]), val, "seq_cst")

    return sig, codegen


@intrinsic
def atomic_load(typingctx, arr, i):
    sig = types.int64(arr, i)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.load_atomic(builder.gep(ary.data, [idx]), "seq_cst", 8)

    return sig, codegen


@intrinsic
def yield_cpu(typingctx):
    """sched_yield(): a waiting thread gives its core away. On a shared machine the thread it
    waits for may be queued behind it on the same core; a plain spin then burns a whole
    timeslice (measured: 16 ms stalls on calls of 0.5 ms under load). Returns at once when
    nothing else is runnable."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_i32, []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------- activations

@njit(inline="always", **{k: v for k, v in _OPTS.items() if k not in ("nogil", "cache")})
def _quant_group(src, dst, xs, xsum, g, group):
    """dst[g*group ...] = int8 codes of src's group g, one scale amax/127 (0 for an all-zero group),
    and the sum of the rounded group (scale * sum of codes, exact in fp32 below 2^24 / 127)."""
    amax = np.float32(0)
    for k in range(g * group, (g + 1) * group):
        amax = max(amax, abs(src[k]))
    sc = amax / np.float32(127)
    s = 0
    for k in range(g * group, (g + 1) * group):
        q = np.int8(np.rint(src[k] / sc)) if sc > 0 else np.int8(0)
        dst[k] = q
        s += np.int32(q)
    xs[g] = sc
    xsum[g] = sc * np.float32(s)


@njit(inline="always", error_model="numpy", boundscheck=False)
def quant_groups(x, group, xq, xs, xsum):
    """_quant_group for every group of the vector x."""
    for g in range(x.shape[0] // group):
        _quant_group(x, xq, xs, xsum, g, group)


@njit(parallel=True, **_OPTS)
def quant_rows(x, group, xq, xs, xsum):
    """Per token row b: int8 codes xq[b], scales xs[b, g] and sums xsum[b, g] of each rounded group
    (rows over threads: a 128-token prompt's dense inputs took 4% of its prefill on one)."""
    for b in prange(x.shape[0]):
        for g in range(x.shape[1] // group):
            _quant_group(x[b], xq[b], xs[b], xsum[b], g, group)


@njit(inline="always")
def _pass_rows(left):
    """Rows of the next rowblocks pass: ROWS_AT_ONCE, or 1 for the rest."""
    return ROWS_AT_ONCE if left >= ROWS_AT_ONCE else 1


# ---------------------------------------------------------------- one matrix

@njit(parallel=True, **_OPTS)
def linear(tag, tiles, bits, group, xq, xs, xsum, y):
    """y[b, :N16] = W @ x[b] for every token row (row blocks over threads); y is [B, N16] fp32; xs and
    xsum [B, groups] alike."""
    nb, ng, tb = tiles.shape
    base = tiles.ctypes.data
    B = xq.shape[0]
    for r in prange(nb):
        b = 0
        while b < B:
            n = _pass_rows(B - b)
            rowblocks(tag, base + r * ng * tb, tb, bits, 0, ng, group, xq[b].ctypes.data, xs[b].ctypes.data,
                      xsum[b].ctypes.data, y[b].ctypes.data + r * 64, b == 0, xq.strides[0], xs.strides[0],
                      y.strides[0], n)
            b += n


# ---------------------------------------------------------------- one MoE layer, one token

@njit(inline="always", fastmath=True, error_model="numpy", boundscheck=False)
def _silu(v):
    return v / (np.float32(1) + np.exp(-v))


@njit(inline="always", error_model="numpy", boundscheck=False)
def _views(x, addrs, meta, inter, bbuf, fbuf, nthreads):
    """The scratch arrays inside bbuf and fbuf (see layer)."""
    H = x.shape[0]
    E = addrs.shape[1]
    ng1 = H // meta[1]
    ng2 = inter // meta[4]
    hw = max(2 * BATCH * meta[4], 16)
    o = 2 * ng1 + 2 * E * ng2
    return (bbuf[:H], bbuf[H:H + E * inter].reshape((E, inter)), fbuf[:ng1], fbuf[ng1:2 * ng1],
            fbuf[2 * ng1:2 * ng1 + E * ng2].reshape((E, ng2)), fbuf[2 * ng1 + E * ng2:o].reshape((E, ng2)),
            fbuf[o:o + nthreads * hw].reshape((nthreads, hw)), fbuf[o + nthreads * hw:])


@njit(inline="always", error_model="numpy", boundscheck=False)
def _prologue(x, meta, xq, xs, xsum, counters):
    quant_groups(x, meta[1], xq, xs, xsum)
    counters[:] = 0


@njit(inline="always", error_model="numpy", boundscheck=False)
def _claim(total, nthreads):
    """Units a thread claims at once in a phase of `total` units: CLAIMS_PER_THREAD claims a thread."""
    return max(1, -(-total // (CLAIMS_PER_THREAD * nthreads)))


@njit(inline="always", fastmath={"contract"}, error_model="numpy", boundscheck=False)
def _gate_up_units(tag, addrs, meta, inter, xq, hq, xs, xsum, hs, hsum, hb, H, u0, u1):
    """Phase-1 units u0..u1-1 of a layer call (see layer): gate and up rows, silu * up, the down input."""
    b1, g1, t1, g2 = meta[0], meta[1], meta[2], meta[4]
    ng1 = H // g1
    ng2 = inter // g2
    a = u0
    while a < u1:
        # BATCH units' gate rows, then their up rows: two runs of consecutive tiles instead of
        # 2 x BATCH short ones (hb: the gate values of each unit, then the up values)
        b = min(a + BATCH, u1)
        for half in range(2):
            for u in range(a, b):
                e = u // ng2
                c = u - e * ng2
                for r in range(g2 // 16):
                    rb = (half * inter + c * g2) // 16 + r
                    rowblock(tag, addrs[0, e] + rb * ng1 * t1, t1, b1, 0, ng1, g1, xq.ctypes.data, xs.ctypes.data,
                             xsum.ctypes.data, hb.ctypes.data + ((half * BATCH + u - a) * g2 + r * 16) * 4, 1)
        for u in range(a, b):
            e = u // ng2
            c = u - e * ng2
            gate = hb[(u - a) * g2:(u - a + 1) * g2]
            up = hb[(BATCH + u - a) * g2:(BATCH + u - a + 1) * g2]
            for j in range(g2):
                gate[j] = _silu(gate[j]) * up[j]
            _quant_group(gate, hq[e, c * g2:(c + 1) * g2], hs[e, c:c + 1], hsum[e, c:c + 1], 0, g2)
        a = b


@njit(inline="always", fastmath={"contract"}, error_model="numpy", boundscheck=False)
def _down_units(tag, wts, addrs, meta, inter, hq, hs, hsum, acc, y, u0, u1):
    """Phase-2 units u0..u1-1 of a layer call (see layer): output row blocks, every expert's down rows
    weighted and summed in expert order."""
    b2, g2, t2 = meta[3], meta[4], meta[5]
    ng2 = inter // g2
    y[u0 * 16:u1 * 16] = 0
    # one expert's rows of the claim, then the next one's (runs of consecutive tiles); every
    # output still adds its experts in order
    for e in range(addrs.shape[1]):
        w = wts[e]
        for u in range(u0, u1):
            rowblock(tag, addrs[1, e] + u * ng2 * t2, t2, b2, 0, ng2, g2, hq[e].ctypes.data, hs[e].ctypes.data,
                     hsum[e].ctypes.data, acc.ctypes.data, 1)
            out = y[u * 16:u * 16 + 16]
            for j in range(16):
                out[j] += w * acc[j]


@njit(inline="always", fastmath={"contract"}, error_model="numpy", boundscheck=False)
def _thread(tag, x, wts, addrs, meta, inter, xq, hq, xs, xsum, hs, hsum, hb, y, counters, nthreads):
    """One thread's share of a layer call: it claims units until none are left (see layer)."""
    H = x.shape[0]
    total1 = addrs.shape[1] * (inter // meta[4])
    total2 = (H + 15) // 16
    c1 = _claim(total1, nthreads)
    while True:
        u0 = atomic_add(counters, 0, c1)
        if u0 >= total1:
            break
        u1 = min(u0 + c1, total1)
        _gate_up_units(tag, addrs, meta, inter, xq, hq, xs, xsum, hs, hsum, hb, H, u0, u1)
        atomic_add(counters, 1, u1 - u0)
    while atomic_load(counters, 1) < total1:
        yield_cpu()
    c2 = _claim(total2, nthreads)
    while True:
        u0 = atomic_add(counters, 2, c2)
        if u0 >= total2:
            break
        _down_units(tag, wts, addrs, meta, inter, hq, hs, hsum, hb[:16], y, u0, min(u0 + c2, total2))


@njit(parallel=True, **_OPTS)
def layer(tag, x, wts, addrs, meta, inter, bbuf, fbuf, counters, nthreads):
    """Writes sum_e wts[e] * down_e(silu(gate_e(x)) * up_e(x)) to fbuf[-ceil(H/16)*16:] for the
    experts whose tile buffers start at addresses addrs[0, e] (gate_up [2I, H]: gate rows, then up
    rows) and addrs[1, e] (down [H, I]).

    meta = (bits, group, tile bytes) of gate_up, then of down. Scratch (few arguments: each costs
    dispatch time): bbuf int8 [H + E*I] (x, then the down inputs, as int8 codes); fbuf fp32
    [scales and sums of both, nthreads x max(2 * BATCH * down group, 16), output].
    One parallel region, two phases:
    1. units (expert, chunk of one down group of intermediate rows): gate and up rows of the chunk,
       silu * up, quantized to int8 (the down input of that group);
    2. units (row block of the output): every expert's down rows, weighted sum.
    Threads claim runs of units (_claim) with an atomic counter, so a thread that starts late (or
    never: a thread pool that runs the iterations one after another) leaves its units to the
    others; phase 2 waits until every phase-1 unit is done, which only waits on units already
    claimed by a running thread: it cannot deadlock.
    """
    xq, hq, xs, xsum, hs, hsum, hbuf, y = _views(x, addrs, meta, inter, bbuf, fbuf, nthreads)
    _prologue(x, meta, xq, xs, xsum, counters)
    for t in prange(nthreads):
        _thread(tag, x, wts, addrs, meta, inter, xq, hq, xs, xsum, hs, hsum, hbuf[t], y, counters, nthreads)


@njit(**_OPTS)
def layer_serial(tag, x, wts, addrs, meta, inter, bbuf, fbuf, counters):
    """layer() on the calling thread alone: no parallel launch (a thread pool's fork and join)."""
    xq, hq, xs, xsum, hs, hsum, hbuf, y = _views(x, addrs, meta, inter, bbuf, fbuf, 1)
    _prologue(x, meta, xq, xs, xsum, counters)
    _thread(tag, x, wts, addrs, meta, inter, xq, hq, xs, xsum, hs, hsum, hbuf[0], y, counters, 1)


# ---------------------------------------------------------------- one MoE layer, many token rows

@njit(inline="always", error_model="numpy", boundscheck=False)
def _expert_rows(tag, base, tb, bits, ng, group, lo, hi, q, qs, qsum, dst, rb):
    """Row block rb of one expert's matrix (tiles at address base) for its assignments lo..hi-1:
    dst[a, 16rb:16rb+16] from the activations of assignment a (codes q[a], scales qs[a], sums
    qsum[a]), up to ROWS_AT_ONCE assignments per pass over the tiles."""
    a = lo
    while a < hi:
        n = _pass_rows(hi - a)
        rowblocks(tag, base, tb, bits, 0, ng, group, q[a].ctypes.data, qs[a].ctypes.data, qsum[a].ctypes.data,
                  dst[a].ctypes.data + rb * 64, a == lo, q.strides[0], qs.strides[0], dst.strides[0], n)
        a += n


@njit(parallel=True, **_OPTS)
def layer_rows(tag, x, rows, wts, offs, addrs, meta, inter, out):
    """Prefill: out[rows[a]] += wts[a] * down_e(silu(gate_e(x)) * up_e(x))(x[rows[a]]) for every
    assignment a of expert e, offs[e] <= a < offs[e + 1] (assignments grouped by expert, in the
    order the caller wants them summed), out [T, >= H] fp32 not zeroed here (chunks of experts add
    up in the same order as one call). x [T, H] fp32; addrs as in layer().

    Each expert's weights are read once for all its rows, and each code vector unpacked once for up
    to ROWS_AT_ONCE of them (rowblocks). Parallel loops over rows or (expert, row block) units: the
    token rows quantized once and copied per assignment, gate and up rows, silu * up quantized per
    down group, down rows; then the weighted sum over output columns, assignments in order."""
    T, H = x.shape
    E = addrs.shape[1]
    A = rows.shape[0]
    b1, g1, t1, b2, g2, t2 = meta[0], meta[1], meta[2], meta[3], meta[4], meta[5]
    ng1 = H // g1
    ng2 = inter // g2
    nb1 = (2 * inter + 15) // 16
    nb2 = (H + 15) // 16
    xq = np.empty((T, H), np.int8)
    xs = np.empty((T, ng1), np.float32)
    xsum = np.empty((T, ng1), np.float32)
    for t in prange(T):
        for g in range(ng1):
            _quant_group(x[t], xq[t], xs[t], xsum[t], g, g1)
    # each assignment's copy of its token row, so that an expert's rows lie at one stride
    aq = np.empty((A, H), np.int8)
    as_ = np.empty((A, ng1), np.float32)
    asum = np.empty((A, ng1), np.float32)
    for a in prange(A):
        aq[a] = xq[rows[a]]
        as_[a] = xs[rows[a]]
        asum[a] = xsum[rows[a]]
    h = np.empty((A, nb1 * 16), np.float32)
    for u in prange(E * nb1):
        e, rb = u // nb1, u % nb1
        _expert_rows(tag, addrs[0, e] + rb * ng1 * t1, t1, b1, ng1, g1, offs[e], offs[e + 1], aq, as_, asum, h, rb)
    hq = np.empty((A, inter), np.int8)
    hs = np.empty((A, ng2), np.float32)
    hsum = np.empty((A, ng2), np.float32)
    for a in prange(A):
        ha = h[a]
        for j in range(inter):
            ha[j] = _silu(ha[j]) * ha[inter + j]
        for g in range(ng2):
            _quant_group(ha, hq[a], hs[a], hsum[a], g, g2)
    y = np.empty((A, nb2 * 16), np.float32)
    for u in prange(E * nb2):
        e, rb = u // nb2, u % nb2
        _expert_rows(tag, addrs[1, e] + rb * ng2 * t2, t2, b2, ng2, g2, offs[e], offs[e + 1], hq, hs, hsum, y, rb)
    for cb in prange(nb2):
        for a in range(A):
            t = rows[a]
            w = wts[a]
            for j in range(cb * 16, min(cb * 16 + 16, H)):
                out[t, j] += w * y[a, j]


def fbuf_size(H, inter, E, g1, g2, nthreads):
    return 2 * (H // g1) + 2 * E * (inter // g2) + nthreads * max(2 * BATCH * g2, 16) + (H + 15) // 16 * 16
