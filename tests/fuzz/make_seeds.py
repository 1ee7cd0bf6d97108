#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/ (deterministic).

Seeds are small valid inputs of each format, so the fuzzers start past the first checks:
a GGUF file with tokenizer metadata and F32 / Q4_1 / Q8_0 tensors, KVPKHEAD / KVPKPROJ files
(with the steering byte of checked_file_fuzz.cpp), JSON Lines task files, and byte programs for
the cache API driver. Files named regression_* are inputs that once failed (kept by hand, not
written here)."""
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, kind, payload):
    return gguf_string(key) + struct.pack("<I", kind) + payload


def gguf_file():
    tokens = ["H", "e", "l", "o", "He", "ll", "Hell", "Hello", ",", "Ġ", "w", "r", "d", "!", "1"]
    merges = ["H e", "l l", "He ll", "Hell o"]
    kv = [
        gguf_kv("general.architecture", 8, gguf_string("llama")),
        gguf_kv("general.alignment", 4, struct.pack("<I", 32)),
        gguf_kv("llama.block_count", 4, struct.pack("<I", 1)),
        gguf_kv("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        gguf_kv("tokenizer.ggml.model", 8, gguf_string("gpt2")),
        gguf_kv("tokenizer.ggml.pre", 8, gguf_string("smollm")),
        gguf_kv("tokenizer.ggml.tokens", 9,
                struct.pack("<IQ", 8, len(tokens)) + b"".join(gguf_string(t) for t in tokens)),
        gguf_kv("tokenizer.ggml.merges", 9,
                struct.pack("<IQ", 8, len(merges)) + b"".join(gguf_string(m) for m in merges)),
        gguf_kv("tokenizer.ggml.token_type", 9,
                struct.pack("<IQ", 5, len(tokens)) + struct.pack("<%di" % len(tokens),
                                                                 *([1] * len(tokens)))),
        gguf_kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 0)),
    ]
    rng = random.Random(1)
    f32 = struct.pack("<8f", *[rng.uniform(-1, 1) for _ in range(8)])
    q4_1 = b"".join(struct.pack("<ee", 0.1, -0.5) + bytes(rng.randrange(256) for _ in range(16))
                    for _ in range(2))
    q8_0 = struct.pack("<e", 0.02) + bytes(rng.randrange(256) for _ in range(32))
    tensors = [("a", [8], 0, f32), ("b", [32, 2], 3, q4_1), ("c", [32], 8, q8_0)]
    infos, data = b"", b""
    for name, dims, kind, payload in tensors:
        infos += gguf_string(name) + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", x) for x in dims)
        infos += struct.pack("<IQ", kind, len(data))
        data += payload + b"\0" * (-len(payload) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + infos
    return head + b"\0" * (-len(head) % 32) + data


def fnv1a(b):
    h = 1469598103934665603
    for x in b:
        h = ((h ^ x) * 1099511628211) % (1 << 64)
    return h


def checked(magic, body):
    b = magic + body
    return b + struct.pack("<Q", fnv1a(b))


def head_scores():
    rng = random.Random(2)
    body = struct.pack("<IIII", 1, 2, 3, 512) + struct.pack("<6f", *[rng.random() for _ in range(6)])
    return checked(b"KVPKHEAD", body)


def projections():
    layers, kv, d, r = 2, 1, 8, 2
    body = struct.pack("<IIII", 1, layers, kv, d)
    for _ in range(layers):
        body += struct.pack("<II", r, r)
        for _ in range(2):  # orthonormal columns: unit vectors
            body += struct.pack("<%df" % (kv * d * r),
                                *[1.0 if (i // r == i % r) else 0.0 for i in range(kv * d * r)])
    return checked(b"KVPKPROJ", body)


def vec(fmt, values):
    """A put_vector field: u64 element count, then the elements."""
    return struct.pack("<Q", len(values)) + struct.pack("<%d%s" % (len(values), fmt), *values)


def kivi_cache(tokens=40, quantized=32):
    """A saved KVCache<Quantize(4, 32, 32)> of shape {2 layers, 4 q heads, 2 kv heads, d 32},
    written from the layout documented in include/kvpack/backend/cpu/cache_io.hpp and the store
    formats (store_io.hpp, quantized_store_io.hpp): layer 0 holds `tokens` tokens, the first
    `quantized` in KIVI blocks (fp16 scale 2^-4, minimum -1, random 4-bit codes), layer 1 none."""
    rng = random.Random(5)
    layers, q_heads, kv_heads, d, bits, group = 2, 4, 2, 32, 4, 32
    name = b"Quantize"
    body = struct.pack("<I", 1) + struct.pack("<I", len(name)) + name
    body += struct.pack("<IIII", 0, 1, bits, group)  # kRows, DType::kF16, KIVI bits and group
    body += struct.pack("<IIII", layers, q_heads, kv_heads, d)
    # RopeConfig: style, theta, scaling, factor, original_context, low / high freq factor,
    # beta_fast, beta_slow, attention_factor, rotary_dim (defaults).
    body += struct.pack("<11d", 0, 10000.0, 0, 1.0, 8192, 1.0, 4.0, 32.0, 1.0, 0.0, 0)
    body += struct.pack("<I", 0)  # observed
    body += struct.pack("<qqq", tokens, 0, tokens - 1) + struct.pack("<qqq", 0, -1, -1)
    body += struct.pack("<Q", 0)  # no LazyLayerDrop statistics
    block = lambda: struct.pack("<HH", 0x2C00, 0xBC00) + bytes(rng.randrange(256) for _ in range(16))
    half = lambda: 0x3000 + rng.randrange(0x400)  # fp16 in [0.125, 0.25)
    for layer in range(layers):
        n, q = (tokens, quantized) if layer == 0 else (0, 0)
        for _ in range(kv_heads):
            body += struct.pack("<QQ", n, q)
            key_blocks = b"".join(block() for _ in range(q // group * d))
            value_blocks = b"".join(block() for _ in range(q * (d // group)))
            body += struct.pack("<Q", len(key_blocks)) + key_blocks
            body += struct.pack("<Q", len(value_blocks)) + value_blocks
            body += vec("H", [half() for _ in range((n - q) * d)])  # fp16 tail K
            body += vec("H", [half() for _ in range((n - q) * d)])  # fp16 tail V
            body += vec("i", list(range(n)))  # positions
            body += vec("f", [])  # no scores
    return checked(b"KVPKCACH", body)


def main():
    out("gguf", "tiny_llama", gguf_file())
    # checked_file: steering byte (bit 0: projections; 1: prepend magic; 2: append checksum;
    # 3: a saved KV cache).
    out("checked_file", "head_scores", b"\x00" + head_scores())
    out("checked_file", "projections", b"\x01" + projections())
    out("checked_file", "head_scores_body", b"\x06" + head_scores()[8:-8])
    out("checked_file", "projections_body", b"\x07" + projections()[8:-8])
    # bit 3: a saved cache (bit 4 clear: the KIVI cache this file was written for).
    out("checked_file", "kivi_cache", b"\x08" + kivi_cache())
    out("checked_file", "kivi_cache_body", b"\x0e" + kivi_cache()[8:-8])
    out("tasks", "plain.jsonl",
        b'{"context": "The pass key is 51234.", "question": "What is the pass key?", '
        b'"answer": "51234", "answer_prefix": "The pass key is"}\n')
    out("tasks", "fields.jsonl",
        b'{"id": 3, "depth": 0.05, "context": "a\\u00e9\\n", "question": "q", "answer": 7, '
        b'"meta": {"tags": ["x", null, true], "len": 1e3}}\n\n'
        b'{"context": "c", "question": "q", "answer": "a"}\r\n')
    rng = random.Random(3)
    for i in range(8):
        out("cache_api", "program_%d" % i, bytes(rng.randrange(256) for _ in range(96 + 64 * i)))


if __name__ == "__main__":
    main()
