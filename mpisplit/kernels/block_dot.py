"""One output row of x @ W.T with W's row in GGUF's quantized blocks: LLVM vector code.

`block_dot(kind)` is a numba intrinsic `dot(blocks, r, x, n, table)` = the dot product of row n
of x (float32 or float64) with row r of the weight, read straight from its blocks of 32 input
features (kernels/quant_blocks.py lists their bytes). It is written as LLVM vector IR rather than
as a numba loop because numba's loops over a block's 16 or 32 lanes do not vectorize (its small
integers widen to 64 bits; its per-block reductions become scalar code): here each block is one
or two vector loads of its quants, integer unpacking in 32-bit lanes, a conversion to x's float
type, and a multiply-add with x's 32 values into vector accumulators that are summed once per
row. The IR names no instruction set; LLVM picks the widest vectors of the CPU it compiles for
(AVX-512, AVX2, NEON).

Per block b with scale d (and m, Q4_1/Q5_1) and quants q_j, the weights are formed in registers
exactly as gguf dequantizes them, in float32 (as gguf and llama.cpp do):
    Q8_0, Q4_0, Q5_0   w_j = d * q_j        (q signed: int8, nibble - 8, 5 bits - 16)
    Q4_1, Q5_1         w_j = d * q_j + m    (q unsigned)
    Q4_K, Q5_K, Q6_K   likewise per sub-block of 32 or 16 (below)
then widened to x's type and multiplied into the lanes with x's 32 values. fp16 scales come from a table of the 65,536
fp16 values (no half-precision instructions needed). In float64 the result equals the float64
product with gguf's dequantized row to rounding. The order of the arithmetic is fixed (no
fast-math: one fused multiply-add per block and row into the lanes, the lanes summed in a fixed
tree), so a row of x gets the same bits whether it is multiplied alone or with others
(`block_dot(kind, 4)`): batch invariance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()


@dataclass(frozen=True)
class Layout:
    """Where a block keeps its parts (byte offsets) and how its quants read."""

    size: int  # bytes per block
    d: int  # fp16 scale
    q: int  # the quants: 32 int8 (Q8_0) or 16 bytes of nibbles (128 for the K-quants)
    m: int | None = None  # fp16 minimum (Q4_1, Q5_1; Q4_K's dmin)
    qh: int | None = None  # 32 fifth bits, little-endian uint32 (Q5_0, Q5_1; Q5_K's 32 bytes of fifth bits,
    #                        bit s of byte j for sub-block s; Q6_K's 64 bytes of high bits)
    offset: int = 0  # subtracted from each unsigned quant (Q4_0: 8, Q5_0: 16)
    elems: int = 32  # weights per block: 256 for the K-quants' super-blocks
    scales: int | None = None  # the K-quants' sub-block scales (Q4_K: 12 bytes of 6-bit pairs; Q6_K: 16 int8)
    int8: bool = False  # the quants are 32 signed bytes (Q8_0), not nibbles


LAYOUTS = {
    "Q8_0": Layout(size=34, d=0, q=2, int8=True),
    "Q4_0": Layout(size=18, d=0, q=2, offset=8),
    "Q4_1": Layout(size=20, d=0, m=2, q=4),
    "Q5_0": Layout(size=22, d=0, qh=2, q=6, offset=16),
    "Q5_1": Layout(size=24, d=0, m=2, qh=4, q=8),
    "Q4_K": Layout(size=144, d=0, m=2, scales=4, q=16, elems=256),
    "Q5_K": Layout(size=176, d=0, m=2, scales=4, qh=16, q=48, elems=256),
    "Q6_K": Layout(size=210, d=208, q=0, qh=128, scales=192, elems=256),
}


def _const(ty: ir.Type, value: int | list) -> ir.Constant:
    return ir.Constant(ty, value)


def _load(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, ty: ir.Type, align: int) -> ir.Value:
    """A value of type `ty` at byte `offset` of the i8 pointer `base`."""
    return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=align)


def _splat(builder: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    vec = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, _const(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), _const(ir.VectorType(I32, lanes), [0] * lanes))


def _hsum(builder: ir.IRBuilder, v: ir.Value, lanes: int) -> ir.Value:
    """The sum of a vector's lanes, halving it in a tree."""
    while lanes > 1:
        half = lanes // 2
        lo = builder.shuffle_vector(v, v, _const(ir.VectorType(I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, _const(ir.VectorType(I32, half), list(range(half, lanes))))
        v, lanes = builder.fadd(lo, hi), half
    return builder.extract_element(v, _const(I32, 0))


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a * b + c rounded once (llvm.fma: one instruction where the CPU has it)."""
    vec = a.type
    suffix = f"v{vec.count}f{32 if vec.element == ir.FloatType() else 64}"
    fn = builder.module.globals.get(f"llvm.fma.{suffix}")
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.{suffix}")
    return builder.call(fn, [a, b, c])


def _scale(builder: ir.IRBuilder, block: ir.Value, at: int, table: ir.Value) -> ir.Value:
    """The fp16 at byte `at` of the block, as a float32 (exact; the table holds x's type)."""
    bits = builder.zext(_load(builder, block, _const(I64, at), I16, 1), I64)
    value = builder.load(builder.gep(table, [bits]))
    return value if value.type == F32 else builder.fptrunc(value, F32)


def _quants(builder: ir.IRBuilder, lay: Layout, block: ir.Value, fty: ir.Type) -> ir.Value:
    """The block's 32 quants as a <32 x float>, in the order of its 32 input features."""
    v32, v16 = ir.VectorType(I32, 32), ir.VectorType(I32, 16)
    if lay.int8:
        q = builder.sext(_load(builder, block, _const(I64, lay.q), ir.VectorType(I8, 32), 1), v32)
        return builder.sitofp(q, ir.VectorType(fty, 32))
    q = builder.zext(_load(builder, block, _const(I64, lay.q), ir.VectorType(I8, 16), 1), v16)
    lo, hi = builder.and_(q, _const(v16, [15] * 16)), builder.lshr(q, _const(v16, [4] * 16))
    q = builder.shuffle_vector(lo, hi, _const(v32, list(range(32))))  # element j: lo[j], then hi[j - 16]
    if lay.qh is not None:  # bit j of qh is element j's fifth bit
        qh = _splat(builder, _load(builder, block, _const(I64, lay.qh), I32, 1), 32)
        bit = builder.and_(builder.lshr(qh, _const(v32, list(range(32)))), _const(v32, [1] * 32))
        q = builder.or_(q, builder.shl(bit, _const(v32, [4] * 32)))
    if lay.offset:
        q = builder.sub(q, _const(v32, [lay.offset] * 32))
    return builder.sitofp(q, ir.VectorType(fty, 32))


def _loop(builder: ir.IRBuilder, count: ir.Value, init: list, body) -> list:
    """for b in range(count): carried = body(b, carried); the carried values after the loop."""
    pre = builder.block
    loop, done = builder.append_basic_block("blocks"), builder.append_basic_block("blocks.done")
    builder.cbranch(builder.icmp_signed(">", count, _const(I64, 0)), loop, done)
    builder.position_at_end(loop)
    b = builder.phi(I64)
    carried = [builder.phi(v.type) for v in init]
    after = body(b, carried)
    b2 = builder.add(b, _const(I64, 1))
    end = builder.block
    builder.cbranch(builder.icmp_signed("<", b2, count), loop, done)
    for phi, first, then in zip([b, *carried], [_const(I64, 0), *init], [b2, *after]):
        phi.add_incoming(first, pre)
        phi.add_incoming(then, end)
    builder.position_at_end(done)
    out = []
    for first, then in zip(init, after):
        phi = builder.phi(first.type)
        phi.add_incoming(first, pre)
        phi.add_incoming(then, end)
        out.append(phi)
    return out


def _weights(builder: ir.IRBuilder, lay: Layout, block: ir.Value, fty: ir.Type, table: ir.Value) -> list:
    """The block's weights, 32 at a time (<32 x fty> each), gguf's dequantization bit for bit: formed
    in float32 as gguf does (the products are exact there, a minimum's addition rounds as gguf's),
    then widened to x's type."""
    if lay.elems == 256:
        ws = (_q4_k if lay.m is not None else _q6_k)(builder, lay, block, F32, table)
    else:
        w = builder.fmul(_splat(builder, _scale(builder, block, lay.d, table), 32), _quants(builder, lay, block, F32))
        if lay.m is not None:
            w = builder.fadd(w, _splat(builder, _scale(builder, block, lay.m, table), 32))
        ws = [w]
    return ws if fty == F32 else [builder.fpext(w, ir.VectorType(fty, 32)) for w in ws]


def _bits(builder: ir.IRBuilder, block: ir.Value, at: int, shift: int, mask: int) -> ir.Value:
    """(byte >> shift) & mask of the 32 bytes at `at`, as <32 x i32>."""
    v32 = ir.VectorType(I32, 32)
    q = builder.zext(_load(builder, block, _const(I64, at), ir.VectorType(I8, 32), 1), v32)
    return builder.and_(builder.lshr(q, _const(v32, [shift] * 32)), _const(v32, [mask] * 32))


def _q4_k(builder: ir.IRBuilder, lay: Layout, block: ir.Value, fty: ir.Type, table: ir.Value) -> list:
    """Q4_K and Q5_K: 8 sub-blocks of 32, w = (d * sc) * q - dmin * mn, sc and mn 6-bit pairs packed
    in 12 bytes; sub-block 2c + h is the low (h 0) or high nibbles of quant bytes 32c .. 32c + 31,
    and (Q5_K) bit s of the 32 high-bit bytes is sub-block s's fifth bit."""
    assert lay.scales is not None and lay.m is not None  # Q4_K's layout has both
    byte = [builder.zext(_load(builder, block, _const(I64, lay.scales + i), I8, 1), I32) for i in range(12)]
    d, dmin = _scale(builder, block, lay.d, table), _scale(builder, block, lay.m, table)

    def six(v, mask, shift=0):
        return builder.and_(builder.lshr(v, _const(I32, shift)), _const(I32, mask))

    out = []
    for s in range(8):
        if s < 4:
            sc, mn = six(byte[s], 63), six(byte[s + 4], 63)
        else:
            top = [builder.shl(six(byte[i], 3, 6), _const(I32, 4)) for i in (s - 4, s)]
            sc, mn = builder.or_(six(byte[s + 4], 15), top[0]), builder.or_(six(byte[s + 4], 15, 4), top[1])
        q = _bits(builder, block, lay.q + 32 * (s // 2), 4 * (s % 2), 15)
        if lay.qh is not None:
            q = builder.or_(q, builder.shl(_bits(builder, block, lay.qh, s, 1), _const(q.type, [4] * 32)))
        q = builder.sitofp(q, ir.VectorType(fty, 32))
        ds, dm = builder.fmul(d, builder.uitofp(sc, fty)), builder.fmul(dmin, builder.uitofp(mn, fty))
        out.append(builder.fsub(builder.fmul(_splat(builder, ds, 32), q), _splat(builder, dm, 32)))
    return out


def _q6_k(builder: ir.IRBuilder, lay: Layout, block: ir.Value, fty: ir.Type, table: ir.Value) -> list:
    """Q6_K: w = (d * scale) * (q - 32) with 16 int8 scales of 16 weights each; group g of 32
    (a = g / 4) takes 4 low bits from quant bytes 64a + 32 (g % 2) .., shifted by 4 ((g / 2) % 2),
    and 2 high bits from bytes 128 + 32a .., shifted by 2 (g % 4)."""
    assert lay.scales is not None and lay.qh is not None  # Q6_K's layout has both
    v32 = ir.VectorType(I32, 32)
    d = _scale(builder, block, lay.d, table)
    out = []
    for g in range(8):
        a = g // 4
        low = _bits(builder, block, lay.q + 64 * a + 32 * (g % 2), 4 * ((g // 2) % 2), 15)
        high = _bits(builder, block, lay.qh + 32 * a, 2 * (g % 4), 3)
        q = builder.sub(builder.or_(low, builder.shl(high, _const(v32, [4] * 32))), _const(v32, [32] * 32))
        ds = [builder.fmul(d, builder.sitofp(_load(builder, block, _const(I64, lay.scales + 2 * g + i), I8, 1), fty))
              for i in (0, 1)]
        halves = [_splat(builder, v, 16) for v in ds]
        scale = builder.shuffle_vector(halves[0], halves[1], _const(v32, list(range(32))))
        out.append(builder.fmul(scale, builder.sitofp(q, ir.VectorType(fty, 32))))
    return out


def _at(builder: ir.IRBuilder, base: ir.Value, b: ir.Value, lay: Layout, i: int, vec: ir.VectorType) -> ir.Value:
    """Pointer to floats 32 i .. 32 i + 31 of block b of a float row."""
    start = builder.add(builder.mul(b, _const(I64, lay.elems)), _const(I64, 32 * i))
    return builder.bitcast(builder.gep(base, [start]), vec.as_pointer())


def _row_dots(builder: ir.IRBuilder, lay: Layout, row: ir.Value, xrows: list, nb: ir.Value,
              table: ir.Value) -> list:
    """For each x row, its dot product with the weight row: per block the weights formed once
    for all the x rows, one fused multiply-add each into 32 lanes, the lanes summed at the end."""
    vec = ir.VectorType(xrows[0].type.pointee, 32)

    def block(b, accs):
        ws = _weights(builder, lay, builder.gep(row, [builder.mul(b, _const(I64, lay.size))]), vec.element, table)
        for i, w in enumerate(ws):
            accs = [_fma(builder, builder.load(_at(builder, x, b, lay, i, vec), align=4), w, acc)
                    for x, acc in zip(xrows, accs)]
        return accs

    sums = _loop(builder, nb, [ir.Constant(vec, [0.0] * 32)] * len(xrows), block)
    return [_hsum(builder, acc, 32) for acc in sums]


def _row_unpack(builder: ir.IRBuilder, lay: Layout, row: ir.Value, orow: ir.Value, nb: ir.Value,
                table: ir.Value) -> None:
    """orow[elems * b + j] = the dequantized weight j of block b, for each of the row's nb blocks."""
    vec = ir.VectorType(orow.type.pointee, 32)

    def block(b, carried):
        ws = _weights(builder, lay, builder.gep(row, [builder.mul(b, _const(I64, lay.size))]), vec.element, table)
        for i, w in enumerate(ws):
            builder.store(w, _at(builder, orow, b, lay, i, vec), align=4)
        return []

    _loop(builder, nb, [], block)


def _rows(context, builder, signature, args, count=1, elems=32):
    """(row r of the blocks as i8*, rows n.. n + count - 1 of the float array as float*, blocks
    per row, the table)."""
    barr = context.make_array(signature.args[0])(context, builder, args[0])
    farr = context.make_array(signature.args[2])(context, builder, args[2])
    tarr = context.make_array(signature.args[4])(context, builder, args[4])
    row = builder.gep(builder.bitcast(barr.data, I8.as_pointer()),
                      [builder.mul(args[1], builder.extract_value(barr.strides, 0))])
    stride = builder.extract_value(farr.strides, 0)
    frows = [builder.bitcast(builder.gep(builder.bitcast(farr.data, I8.as_pointer()),
                                         [builder.mul(builder.add(args[3], _const(I64, i)), stride)]),
                             farr.data.type) for i in range(count)]
    nb = builder.udiv(builder.extract_value(farr.shape, 1), _const(I64, elems))
    return row, frows, nb, tarr.data


def _floats(ty) -> bool:
    return isinstance(ty, types.Array) and ty.dtype in (types.float32, types.float64) and ty.ndim == 2


_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def stable_identity(fn, name: str):
    """Give a numba intrinsic or dispatcher that a cached kernel closes over a stable identity:
    numba's is a new uuid in every process, which gives the kernel a new cache key, and a new
    cache file, in every process (nothing is ever reused and the cache grows). The name and this
    file's digest instead, so that a change of the IR here is a new key too."""
    fn._set_uuid(f"mpisplit.kernels.block_dot.{name}.{_SOURCE}")
    return fn


def _intrinsic(name: str, lay: Layout, count: int, emit, result):
    """An intrinsic f(blocks, r, arr, n, table) over row r of the blocks and rows n.. n + count - 1
    of the float array arr: `emit(context, builder, signature, row, arr rows, blocks per row,
    table)` writes its IR, `result(arr's dtype)` is its numba type."""

    @intrinsic
    def fn(typingctx, blocks, r, arr, n, table):
        if not _floats(arr):
            return None

        def codegen(context, builder, signature, args):
            return emit(context, builder, signature, *_rows(context, builder, signature, args, count, lay.elems))

        return result(arr.dtype)(blocks, types.intp, arr, types.intp, table), codegen

    return stable_identity(fn, name)


def block_dot(kind: str, count: int = 1):
    """The intrinsic dot(blocks, r, x, n, table): x[n] . W[r] for blocks of `kind`, in x's type;
    with count > 1, the tuple of x[n + i] . W[r] for i < count (the row unpacked once)."""
    lay = LAYOUTS[kind]

    def emit(context, builder, signature, row, xrows, nb, table):
        sums = _row_dots(builder, lay, row, xrows, nb, table)
        return sums[0] if count == 1 else context.make_tuple(builder, signature.return_type, sums)

    return _intrinsic(f"dot.{kind}.{count}", lay, count, emit,
                      lambda dtype: dtype if count == 1 else types.UniTuple(dtype, count))


def block_unpack(kind: str):
    """The intrinsic unpack(blocks, r, out, n, table): out[n] = W[r] dequantized, in out's type."""
    lay = LAYOUTS[kind]

    def emit(context, builder, signature, row, orows, nb, table):
        _row_unpack(builder, lay, row, orows[0], nb, table)
        return context.get_dummy_value()

    return _intrinsic(f"unpack.{kind}", lay, 1, emit, lambda dtype: types.none)
