"""
GGUF's block types read back as float32 with numpy: how llama.cpp packs weights into small
integers and scales. gguf_reader.py reads the file; this module reads the numbers in it.

    x = dequantize(raw, "Q4_K", count)   # raw: a tensor's bytes (uint8); count: values in it

A quantized tensor is cut (flattened, row by row) into blocks of equal size, each stored in a fixed
number of bytes: BLOCKS[type] = (values per block, bytes per block). Each block keeps one or two
floats (a scale d, sometimes a min m) and a small integer q per value: x = d q, or d q + m. Numbers
are little-endian; fp16 is IEEE half precision. Bits are packed low first: in a "4-bit" field the
low nibble of byte j comes before the high nibble, in a "1-bit" field bit 0 before bit 1.

Blocks of 32 values (llama.cpp's first formats):
  Q8_0  34 bytes  fp16 d | 32 int8 q                                      x = d q
  Q4_0  18 bytes  fp16 d | 16 bytes: values 0-15 low nibbles, 16-31 high  x = d (q - 8)
  Q4_1  20 bytes  fp16 d | fp16 m | 16 bytes of nibbles as Q4_0           x = d q + m
  Q5_0  22 bytes  fp16 d | 4 bytes qh (bit j: q_j's 5th bit) | nibbles    x = d (q - 16)
  Q5_1  24 bytes  fp16 d | fp16 m | qh | nibbles                          x = d q + m

Super-blocks of 256 values, the k-quants (llama.cpp PR 1684; a Q4_K_M file is mostly Q4_K, with
Q6_K for the most sensitive matrices). Two levels of scale: the 256 values fall into sub-blocks of
16 or 32, each with a small integer scale sc (and min mn), and one fp16 d (and dmin) per
super-block turns those integers into floats, so a sub-block's scale costs 4-8 bits, not 16:
  Q2_K   84 bytes  16 bytes: sc (low nibble) and mn (high) of 16 sub-blocks of 16
                   | 64 bytes of 2-bit q | fp16 d | fp16 dmin           x = d sc q - dmin mn
  Q3_K  110 bytes  32 bytes hmask (q's 3rd bit) | 64 bytes of 2-bit q
                   | 12 bytes: 16 6-bit sc | fp16 d                      x = d (sc - 32) q,
                   where q = the 2 bits, minus 4 where the hmask bit is 0 (-4..3)
  Q4_K  144 bytes  fp16 d | fp16 dmin | 12 bytes: 8 6-bit sc, 8 6-bit mn (sub-blocks of 32)
                   | 128 bytes of 4-bit q                                x = d sc q - dmin mn
  Q5_K  176 bytes  as Q4_K, with 32 bytes qh (q's 5th bit) before the nibbles
  Q6_K  210 bytes  128 bytes: q's low 4 bits | 64 bytes: its high 2 bits
                   | 16 int8 sc (sub-blocks of 16) | fp16 d              x = d sc (q - 32)
  Q8_K  292 bytes  float32 d | 256 int8 q | 16 int16 sums of q (for dot products; unused)
                                                                         x = d q
Each function below spells out how the bit fields of a block map to its values. Each does
llama.cpp's float operations in llama.cpp's order (d * sc first, then * q), so the values are bit
for bit those of the `gguf` package's own dequantizers.
"""
import numpy as np

BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
          "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84),
          "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
          "Q8_K": (256, 292)}
CHUNK = 1 << 18  # values dequantized at a time: the temporaries stay a few MB, not tensor-sized


def dequantize(raw, kind, count):
    """A tensor's bytes (a uint8 array) as `count` float32 values, a chunk of blocks at a time into
    one output array: memory holds the result and a few MB more, never float64 or a second copy."""
    per, nbytes = BLOCKS[kind]
    if count % per or raw.size != count // per * nbytes:
        raise ValueError(f"{raw.size:,} bytes are not {count:,} values of {kind}")
    blocks = raw.reshape(-1, nbytes)  # (n_blocks, bytes per block)
    out = np.empty((len(blocks), per), np.float32)
    step = max(1, CHUNK // per)
    for i in range(0, len(blocks), step):
        out[i:i + step] = DEQUANTIZERS[kind](blocks[i:i + step])
    return out.reshape(-1)


def fp16(b):
    """(n, 2) bytes -> (n, 1) float32."""
    return b.view(np.float16).astype(np.float32)


def unpack(b, width):
    """Fields of `width` bits, low bits first: (..., k) bytes -> (..., 8 // width, k), where [f, j]
    is field f of byte j. Two 4-bit fields give the low nibbles, then the high ones."""
    shifts = np.arange(0, 8, width, dtype=np.uint8)[:, None]  # (8 // width, 1)
    return (b[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


# --- plain floats ------------------------------------------------------------------------------

def f32(b):
    return b.view(np.float32)


def bf16(b):  # bfloat16 is the high half of a float32
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- blocks of 32 ------------------------------------------------------------------------------

def q8_0(b):
    return fp16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def nibbles32(qs):
    """(n, 16) bytes -> (n, 32) q: values 0-15 in the low nibbles, 16-31 in the high ones."""
    return unpack(qs, 4).reshape(len(qs), 32)


def high_bits32(qh):
    """(n, 4) bytes -> (n, 32): bit j of the little-endian uint32 qh, shifted to be q's 5th bit."""
    return np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4)


def q4_0(b):
    return fp16(b[:, :2]) * (nibbles32(b[:, 2:]).astype(np.float32) - 8)


def q4_1(b):
    return fp16(b[:, :2]) * nibbles32(b[:, 4:]).astype(np.float32) + fp16(b[:, 2:4])


def q5_0(b):
    q = nibbles32(b[:, 6:]) | high_bits32(b[:, 2:6])
    return fp16(b[:, :2]) * (q.astype(np.float32) - 16)


def q5_1(b):
    q = nibbles32(b[:, 8:]) | high_bits32(b[:, 4:8])
    return fp16(b[:, :2]) * q.astype(np.float32) + fp16(b[:, 2:4])


# --- super-blocks of 256 -----------------------------------------------------------------------
# Each takes (n, bytes per block) and returns (n, 256); scaled() applies the two levels of scale.

def scaled(q, d, sc, dmin=None, mn=None):
    """d sc q (- dmin mn) per sub-block: q (n, 256) ints, sc and mn (n, s) ints for s sub-blocks."""
    n, s = sc.shape
    x = (d * sc.astype(np.float32))[:, :, None] * q.reshape(n, s, -1).astype(np.float32)
    if dmin is not None:
        x -= (dmin * mn.astype(np.float32))[:, :, None]
    return x.reshape(n, 256)


def crumbs(qs):
    """2-bit q of Q2_K/Q3_K: (n, 64) bytes -> (n, 256). Two halves of 128 values, 32 bytes each;
    in a half, the bits 0-1 of its 32 bytes are values 0-31, bits 2-3 values 32-63, and so on."""
    return unpack(qs.reshape(-1, 2, 32), 2).reshape(-1, 256)


def bit_planes(h):
    """1 bit per value, (n, 32) bytes -> (n, 256): bit f of byte j belongs to value 32 f + j."""
    return unpack(h, 1).reshape(-1, 256)


def q2_k(b):
    scales = b[:, :16]  # sub-blocks of 16 values: sc in the low nibble, mn in the high one
    return scaled(crumbs(b[:, 16:80]), fp16(b[:, 80:82]), scales & np.uint8(15),
                  fp16(b[:, 82:84]), scales >> np.uint8(4))


def q3_k(b):
    n = len(b)
    # 16 6-bit scales in 12 bytes: the low 4 bits of scale i in byte i % 8 (low nibble for i < 8,
    # high for i >= 8); its high 2 bits in byte 8 + i % 4, at bits 2 (i // 4)
    low = unpack(b[:, 96:104], 4).reshape(n, 16)
    high = unpack(b[:, 104:108], 2).reshape(n, 16)
    sc = (low | (high << np.uint8(4))).astype(np.float32) - 32  # stored + 32: signed
    # q = the 2 low bits, minus 4 where the hmask bit is 0: values -4..3
    minus4 = (bit_planes(b[:, :32]) ^ np.uint8(1)) << np.uint8(2)
    q = crumbs(b[:, 32:96]).astype(np.int8) - minus4.astype(np.int8)
    return scaled(q, fp16(b[:, 108:110]), sc)


def scales_mins_k(b):
    """Q4_K/Q5_K's 12 bytes -> 8 scales and 8 mins of 6 bits, (n, 8) each. Sub-blocks 0-3: the low
    6 bits of bytes 0-3 (scales) and 4-7 (mins). Sub-blocks 4-7: the nibbles of bytes 8-11 (low:
    scale, high: min) are their low 4 bits, the top 2 bits of bytes 0-3 / 4-7 their high 2."""
    low6, top2 = b[:, :8] & np.uint8(63), (b[:, :8] >> np.uint8(6)) << np.uint8(4)  # (n, 8) each
    sc = np.concatenate([low6[:, :4], (b[:, 8:12] & np.uint8(15)) | top2[:, :4]], 1)
    mn = np.concatenate([low6[:, 4:], (b[:, 8:12] >> np.uint8(4)) | top2[:, 4:]], 1)
    return sc, mn


def nibbles256(qs):
    """4-bit q of Q4_K/Q5_K: (n, 128) bytes -> (n, 256). Four runs of 32 bytes, 64 values each: the
    low nibbles of a run are its sub-block 2r, the high nibbles sub-block 2r + 1."""
    return unpack(qs.reshape(-1, 4, 32), 4).reshape(-1, 256)


def q4_k(b):
    sc, mn = scales_mins_k(b[:, 4:16])
    return scaled(nibbles256(b[:, 16:]), fp16(b[:, :2]), sc, fp16(b[:, 2:4]), mn)


def q5_k(b):  # Q4_K's layout, and a 5th bit for each value from 32 bytes of bit planes
    sc, mn = scales_mins_k(b[:, 4:16])
    q = nibbles256(b[:, 48:]) | (bit_planes(b[:, 16:48]) << np.uint8(4))
    return scaled(q, fp16(b[:, :2]), sc, fp16(b[:, 2:4]), mn)


def q6_k(b):
    n = len(b)
    # two halves of 128 values. Low 4 bits: 64 bytes a half, its values 0-63 in the low nibbles and
    # 64-127 in the high ones. High 2 bits: 32 bytes a half, bits 2f and 2f + 1 of byte j for its
    # value 32 f + j.
    low = unpack(b[:, :128].reshape(n, 2, 64), 4).reshape(n, 256)
    high = unpack(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 256)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return scaled(q, fp16(b[:, 208:210]), b[:, 192:208].view(np.int8))


def q8_k(b):
    return b[:, :4].view(np.float32) * b[:, 4:260].view(np.int8).astype(np.float32)


DEQUANTIZERS = {"F32": f32, "F16": fp16, "BF16": bf16, "Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1,
                "Q5_0": q5_0, "Q5_1": q5_1, "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k,
                "Q5_K": q5_k, "Q6_K": q6_k, "Q8_K": q8_k}
