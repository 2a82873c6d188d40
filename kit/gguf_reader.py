"""
GGUF, llama.cpp's single-file format, read with numpy: a header, typed metadata (a model's config
and its tokenizer), tensor infos, then the aligned tensor data. pretrained.py turns a file's llama
metadata into our GPTConfig; tokenizer.py reads its tokenizer.

    meta, tensors, buf = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # {key: value}, {name: info}
    w = dequantize(raw_bytes, "Q4_K", count)   # float32 values (gguf_quants.py: the block types)

Layout (GGUF v2/v3): magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count;
metadata entries (string key, uint32 type, value); per tensor: name, uint32 n_dims, uint64 dims
(fastest first: the reverse of torch's shape), uint32 ggml type, uint64 offset; the data starts at
the next multiple of general.alignment (32).
"""
import math
import mmap
import os
import struct

from kit.gguf_quants import BLOCKS, dequantize  # noqa: F401  the reader's users dequantize too

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                11: "<q", 12: "<d"}
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}


MAX_DEPTH = 100  # arrays of arrays, at most (as JSON's, task_files.DEPTH)


class Reader:
    """Little-endian values from a memory-mapped file, with a clear error when the file ends too
    soon."""

    def __init__(self, buf, file):
        self.buf, self.pos, self.file = buf, 0, file

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.file} is truncated or not a GGUF file "
                             f"(it ends at byte {len(self.buf):,}): download it again")
        out, self.pos = self.buf[self.pos:self.pos + n], self.pos + n
        return out

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, kind, depth=0):
        if kind in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:  # an array: element type, count, elements
            inner, count = self.scalar("<I"), self.scalar("<Q")
            if count > len(self.buf):
                raise ValueError(f"{self.file}: an array of {count:,} elements "
                                 f"can't fit in the file")
            if depth >= MAX_DEPTH:  # each level is a call: 100,000 would be a RecursionError
                raise ValueError(f"{self.file}: its metadata nests arrays more than {MAX_DEPTH} "
                                 f"deep: not a real GGUF file, or a damaged one")
            return [self.value(inner, depth + 1) for _ in range(count)]
        raise ValueError(f"{self.file}: unknown metadata type {kind}: "
                         f"not a GGUF file, or a newer version")


def read_gguf(file):
    """(metadata {key: value}, {name: (torch shape, ggml type name, byte offset, byte count)},
    mapped bytes)."""
    with open(file, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(file) else b""
    r = Reader(buf, file)
    if r.take(4) != b"GGUF":
        raise ValueError(f"{file} is not a GGUF file (it does not start with 'GGUF')")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{file} is GGUF version {version}; versions 2 and 3 are read")
    n_tensors, n_meta = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors > 1 << 20 or n_meta > 1 << 20:
        raise ValueError(f"{file}: {n_tensors:,} tensors and {n_meta:,} metadata entries: "
                         f"not a real GGUF file")
    meta = {}
    for _ in range(n_meta):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.scalar("<I")
        if n_dims > 4:
            raise ValueError(f"{file}: tensor {name} has {n_dims} dimensions")
        dims = [r.scalar("<Q") for _ in range(n_dims)]
        # GGUF lists dims fastest first
        infos.append((name, tuple(reversed(dims)), r.scalar("<I"), r.scalar("<Q")))
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1):
        raise ValueError(f"{file}: general.alignment is {align!r}; GGUF needs a power of two")
    start = (r.pos + align - 1) // align * align
    tensors, spans = {}, []
    for name, shape, kind, offset in infos:
        if name in tensors:
            raise ValueError(f"{file}: the tensor {name} is listed twice: the file is damaged")
        if offset % align:
            raise ValueError(f"{file}: tensor {name}'s data starts at offset {offset:,}, which is "
                             f"not a multiple of the alignment {align}: the file is damaged")
        kind = GGML_TYPES.get(kind, f"type {kind}")
        if kind not in BLOCKS:
            raise ValueError(f"{file}: tensor {name} is {kind}; only {', '.join(BLOCKS)} are read")
        per, nbytes = BLOCKS[kind]
        count = math.prod(shape)
        if count % per:
            raise ValueError(f"{file}: tensor {name} has {count} values, not whole blocks of {per}")
        size = count // per * nbytes
        if start + offset + size > len(buf):
            raise ValueError(f"{file} is truncated: tensor {name}'s data ends past the end of "
                             f"the file")
        tensors[name] = (shape, kind, start + offset, size)
        spans.append((offset, offset + size, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:  # two tensors would read the same bytes
            raise ValueError(f"{file}: the data of tensors {a} and {b} overlap: the file is "
                             f"damaged")
    return meta, tensors, buf


def unpermute(w, n_head):
    """Undo llama.cpp's row order of q and k, (n x hs, in): its converter put each head's rows i and
    hs/2 + i side by side (pairs, for its interleaved rotation); the hub's rotate-half layout keeps
    the two halves apart."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
