"""GGUF's block types (kit/gguf_quants.py) on blocks built here by hand: known scales and known quants
packed bit by bit as llama.cpp's layout says, and the values they stand for worked out from the
formula, value by value. Every scale and quant is chosen so that each value is exact in float32: the
expected values do not depend on the order of the float operations. An unknown type is one line."""
import struct

import numpy as np
import pytest

from kit import gguf_quants
from kit.gguf_quants import BLOCKS, dequantize
from kit.gguf_reader import read_gguf


def fp16(v):
    return struct.pack("<e", v)


def pack_bits(q, width, groups):
    """Values -> bytes, the inverse of the layouts: `groups` runs of bytes; in a run of k bytes,
    byte j holds, from its low bits up, the values j, k + j, 2k + j, ... of the run's part of q."""
    q = list(q)
    per_byte = 8 // width
    run = len(q) // groups  # values per run
    k = run // per_byte     # bytes per run
    out = bytearray()
    for g in range(groups):
        part = q[g * run:(g + 1) * run]
        for j in range(k):
            out.append(sum(part[f * k + j] << (width * f) for f in range(per_byte)))
    return bytes(out)


def block_q8_0():
    q = [i * 8 - 128 for i in range(32)]  # -128 .. 120
    return fp16(0.5) + struct.pack("<32b", *q), [0.5 * v for v in q]


def block_q4_0():
    q = [i % 16 for i in range(32)]
    return fp16(2.0) + pack_bits(q, 4, 1), [2.0 * (v - 8) for v in q]


def block_q4_1():
    q = [(3 * i + 1) % 16 for i in range(32)]
    return fp16(0.25) + fp16(-1.5) + pack_bits(q, 4, 1), [0.25 * v - 1.5 for v in q]


def q5_high_bits(q):  # 4 bytes, a little-endian uint32 whose bit j is q_j's 5th bit
    return struct.pack("<I", sum((v >> 4) << j for j, v in enumerate(q)))


def block_q5_0():
    q = [(5 * i + 1) % 32 for i in range(32)]
    low = pack_bits([v & 15 for v in q], 4, 1)
    return fp16(0.5) + q5_high_bits(q) + low, [0.5 * (v - 16) for v in q]


def block_q5_1():
    q = [(7 * i + 3) % 32 for i in range(32)]
    low = pack_bits([v & 15 for v in q], 4, 1)
    return fp16(0.125) + fp16(2.0) + q5_high_bits(q) + low, [0.125 * v + 2.0 for v in q]


def block_q2_k():
    sc, mn = [(i * 5 + 1) % 16 for i in range(16)], [(i * 3 + 2) % 16 for i in range(16)]
    q = [(i * 7 + i // 64) % 4 for i in range(256)]
    scales = bytes(s | (m << 4) for s, m in zip(sc, mn))  # sub-blocks of 16
    raw = scales + pack_bits(q, 2, 2) + fp16(0.5) + fp16(0.25)
    return raw, [0.5 * sc[i // 16] * q[i] - 0.25 * mn[i // 16] for i in range(256)]


def block_q3_k():
    s = [-32, -7, -1, 0, 1, 5, 16, 31, 20, -20, 9, -9, 2, -2, 30, -30]  # signed 6-bit scales
    q = [(i * 5 + i // 32) % 8 - 4 for i in range(256)]                # -4 .. 3
    stored = [v + 32 for v in s]
    # low nibbles: scale i in byte i % 8 (low nibble for i < 8, high for i >= 8); high 2 bits: byte
    # 8 + i % 4, at bits 2 (i // 4)
    scales = pack_bits([v & 15 for v in stored], 4, 1) + pack_bits([v >> 4 for v in stored], 2, 1)
    hmask = pack_bits([int(v >= 0) for v in q], 1, 1)  # 1: the value is the 2 low bits as they are
    low = pack_bits([v & 3 for v in q], 2, 2)          # -4 .. -1 are stored as 0 .. 3, hmask 0
    return hmask + low + scales + fp16(0.25), [0.25 * s[i // 16] * q[i] for i in range(256)]


def scales_mins_k(sc, mn):
    """8 6-bit scales and mins into Q4_K/Q5_K's 12 bytes."""
    first = bytes((sc[i] & 63) | ((sc[i + 4] >> 4) << 6) for i in range(4))
    second = bytes((mn[i] & 63) | ((mn[i + 4] >> 4) << 6) for i in range(4))
    third = bytes((sc[i + 4] & 15) | ((mn[i + 4] & 15) << 4) for i in range(4))
    return first + second + third


K_SC, K_MN = [1, 20, 33, 63, 5, 40, 17, 60], [62, 3, 48, 16, 0, 63, 31, 9]  # high bits set too


def block_q4_k(d=0.5):
    q = [(i * 11 + i // 32) % 16 for i in range(256)]
    raw = fp16(d) + fp16(0.125) + scales_mins_k(K_SC, K_MN) + pack_bits(q, 4, 4)
    return raw, [d * K_SC[i // 32] * q[i] - 0.125 * K_MN[i // 32] for i in range(256)]


def block_q5_k():
    q = [(i * 13 + i // 32) % 32 for i in range(256)]
    qh = pack_bits([v >> 4 for v in q], 1, 1)  # bit f of byte j: value 32 f + j
    raw = fp16(0.25) + fp16(0.5) + scales_mins_k(K_SC, K_MN) + qh + pack_bits([v & 15 for v in q], 4, 4)
    return raw, [0.25 * K_SC[i // 32] * q[i] - 0.5 * K_MN[i // 32] for i in range(256)]


def block_q6_k():
    q = [(i * 29 + i // 16) % 64 for i in range(256)]
    sc = [-128, -3, 0, 1, 7, 127, -64, 33, 12, -12, 100, -100, 5, -5, 64, -1]
    low = pack_bits([v & 15 for v in q], 4, 2)  # halves of 128: 0-63 low nibbles, 64-127 high
    high = pack_bits([v >> 4 for v in q], 2, 2)
    raw = low + high + struct.pack("<16b", *sc) + fp16(0.5)
    return raw, [0.5 * sc[i // 16] * (q[i] - 32) for i in range(256)]


def block_q8_k():
    q = [(i * 37) % 256 - 128 for i in range(256)]
    sums = [sum(q[16 * i:16 * i + 16]) for i in range(16)]
    raw = struct.pack("<f", 0.0625) + struct.pack("<256b", *q) + struct.pack("<16h", *sums)
    return raw, [0.0625 * v for v in q]


def floats(kind):
    v = [0.0, -0.0, 1.0, -2.5, 3.140625, 2.0 ** -24] + {
        "F32": [-1e-3, 1e30], "F16": [65504.0, -1.0], "BF16": [2.0 ** 100, -65280.0]}[kind]
    raw = {"F32": lambda: struct.pack("<8f", *v), "F16": lambda: struct.pack("<8e", *v),
           # bfloat16: a float32's high 16 bits (these values have zeros in the low 16)
           "BF16": lambda: b"".join(struct.pack("<f", x)[2:] for x in v)}[kind]()
    return raw, v


BUILT = {"Q8_0": block_q8_0, "Q4_0": block_q4_0, "Q4_1": block_q4_1, "Q5_0": block_q5_0,
         "Q5_1": block_q5_1, "Q2_K": block_q2_k, "Q3_K": block_q3_k, "Q4_K": block_q4_k,
         "Q5_K": block_q5_k, "Q6_K": block_q6_k, "Q8_K": block_q8_k,
         **{k: (lambda k=k: floats(k)) for k in ("F32", "F16", "BF16")}}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_a_block_built_by_hand_gives_the_values_its_formula_says(kind):
    raw, expected = BUILT[kind]()
    per, nbytes = BLOCKS[kind]
    assert len(raw) % nbytes == 0 and len(expected) == len(raw) // nbytes * per
    x = dequantize(np.frombuffer(raw, np.uint8), kind, len(expected))
    assert x.dtype == np.float32 and x.shape == (len(expected),)
    assert x.tolist() == [np.float32(e) for e in expected]
    if kind == "F32":  # -0.0 keeps its sign
        assert np.signbit(x[1])


def test_a_tensor_of_many_blocks_is_read_a_chunk_at_a_time_without_mixing_blocks(monkeypatch):
    monkeypatch.setattr(gguf_quants, "CHUNK", 256)  # one super-block a chunk
    blocks = [block_q4_k(0.5), block_q4_k(1.0), block_q4_k(-2.0)]
    raw = b"".join(r for r, _ in blocks)
    x = dequantize(np.frombuffer(raw, np.uint8), "Q4_K", 3 * 256)
    assert x.tolist() == [np.float32(e) for _, expected in blocks for e in expected]
    monkeypatch.setattr(gguf_quants, "CHUNK", 64)  # two blocks of 32 a chunk, the last one alone
    raw, expected = block_q4_0()
    other = fp16(-1.0) + raw[2:]  # the same quants, another scale
    x = dequantize(np.frombuffer(raw + other + raw, np.uint8), "Q4_0", 96)
    assert x.tolist() == expected + [-v / 2 for v in expected] + expected


def test_bytes_that_are_not_whole_blocks_are_one_line():
    with pytest.raises(ValueError, match=r"^140 bytes are not 256 values of Q4_K$"):
        dequantize(np.zeros(140, np.uint8), "Q4_K", 256)


def tiny_gguf(path, ggml_type, count, data):
    """A GGUF v3 file of one tensor 'w' of `count` values of the given type id, no metadata."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    head += struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, count, ggml_type, 0)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return str(path)


def test_an_unknown_block_type_is_one_line_naming_it_and_the_tensor(tmp_path):
    for ggml_type, name in [(9, "Q8_1"), (99, "type 99")]:  # Q8_1: llama.cpp's, never in a file
        path = tiny_gguf(tmp_path / "x.gguf", ggml_type, 32, b"\0" * 64)
        with pytest.raises(ValueError) as err:
            read_gguf(path)
        message = str(err.value)
        assert message.startswith(f"{path}: tensor w is {name}; only F32, F16, BF16, Q8_0")
        assert message.endswith(" are read") and "\n" not in message and "Q6_K" in message
    raw, expected = block_q6_k()  # a known type is read through the file
    meta, tensors, buf = read_gguf(tiny_gguf(tmp_path / "k.gguf", 14, 256, raw))
    shape, kind, offset, size = tensors["w"]
    assert (shape, kind, size) == ((256,), "Q6_K", 210)
    x = dequantize(np.frombuffer(buf, np.uint8, count=size, offset=offset), kind, 256)
    assert x.tolist() == expected
