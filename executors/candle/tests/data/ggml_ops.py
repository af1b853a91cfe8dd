"""Records what ggml's CPU ops compute on fixed inputs, for the tests of
executors/candle/src/ggml.rs and src/q5_0.rs (the recorded values are
pasted there).

Runs the real ggml of node-llama-cpp 3.22.1 (llama.cpp tagged v0.5.0), the
AVX-512 build llama.cpp loads on this project's machines:

    npm install node-llama-cpp@3.22.1   # in DIR
    python3 ggml_ops.py DIR/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64

Each input value i of a series k is ((i * 7919 + k) % 2000) / 500 - 2,
computed in f64 and rounded to f32 (ggml.rs's tests compute the same). Each
result is printed as the f32 bits of every value (short ones) or as the
64-bit FNV-1a hash of those bits, little-endian (long ones).
"""
import ctypes as C, struct, sys

D = sys.argv[1].rstrip("/") + "/"
base = C.CDLL(D + "libggml-base.so", mode=C.RTLD_GLOBAL)
cpu = C.CDLL(D + "libggml-cpu-zen4.so", mode=C.RTLD_GLOBAL)
class P(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]
vp, i64, fl = C.c_void_p, C.c_int64, C.c_float
for n, res, args in [
    ("ggml_init", vp, [P]), ("ggml_new_tensor_1d", vp, [vp, C.c_int, i64]),
    ("ggml_new_tensor_2d", vp, [vp, C.c_int, i64, i64]), ("ggml_new_tensor_3d", vp, [vp, C.c_int, i64, i64, i64]),
    ("ggml_get_data", vp, [vp]), ("ggml_new_graph", vp, [vp]), ("ggml_build_forward_expand", None, [vp, vp]),
    ("ggml_rope_ext", vp, [vp, vp, vp, vp, C.c_int, C.c_int, C.c_int, fl, fl, fl, fl, fl, fl]),
    ("ggml_soft_max_ext", vp, [vp, vp, vp, fl, fl]), ("ggml_swiglu_split", vp, [vp, vp, vp]),
    ("ggml_rms_norm", vp, [vp, vp, fl]), ("ggml_mul_mat", vp, [vp, vp, vp]), ("ggml_mul", vp, [vp, vp, vp]),
    ("ggml_quantize_chunk", C.c_size_t, [C.c_int, vp, vp, i64, i64, i64, vp]),
]:
    f = getattr(base, n); f.restype = res; f.argtypes = args
cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, C.c_int]
cpu.ggml_cpu_init()
cpu.quantize_row_q8_K.argtypes = [vp, vp, i64]
F32, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, I32 = 0, 6, 8, 12, 13, 14, 26
ctx = base.ggml_init(P(64 << 20, None, False))

def f32(v): return struct.unpack("<f", struct.pack("<f", v))[0]
def series(n, k, scale=1.0): return [f32((((i * 7919 + k) % 2000) / 500.0 - 2.0) * scale) for i in range(n)]
def tensor(dims, vals, typ=F32):
    fn = {1: base.ggml_new_tensor_1d, 2: base.ggml_new_tensor_2d, 3: base.ggml_new_tensor_3d}[len(dims)]
    x = fn(ctx, typ, *dims)
    arr = (C.c_float * len(vals) if typ == F32 else C.c_int32 * len(vals)).from_address(base.ggml_get_data(x))
    for i, v in enumerate(vals): arr[i] = v
    return x
def run(out, n):
    g = base.ggml_new_graph(ctx); base.ggml_build_forward_expand(g, out)
    cpu.ggml_graph_compute_with_ctx(ctx, g, 2)
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in (C.c_float * n).from_address(base.ggml_get_data(out))]
def fnv(bits, raw=None):
    h = 0xcbf29ce484222325
    for b in struct.pack(f"<{len(bits)}I", *bits) if raw is None else raw:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return hex(h)
def show(name, bits): print(name, "[" + ", ".join(hex(b) for b in bits) + "]" if len(bits) <= 32 else fnv(bits))

# rms_norm then mul by the weight: one row of 64.
show("rms_norm", run(base.ggml_mul(ctx, base.ggml_rms_norm(ctx, tensor([64], series(64, 0)), f32(1e-5)), tensor([64], series(64, 1, 0.5))), 64))
# swiglu: silu(series 2 · 3) · series 3.
show("swiglu", run(base.ggml_swiglu_split(ctx, tensor([32], series(32, 2, 3.0)), tensor([32], series(32, 3))), 32))
# soft_max_ext, scale 1/8: two rows of 32 (series 4 · 8); row r sees 20 + 7r keys.
mask = [0.0 if j < 20 + 7 * r else float("-inf") for r in range(2) for j in range(32)]
show("softmax", run(base.ggml_soft_max_ext(ctx, tensor([32, 2], series(64, 4, 8.0)), tensor([32, 2], mask), f32(0.125), 0.0), 64))
# rope NORM, 64 dims, base 100000, positions 1 and 300 (one head each, series 5).
show("rope", run(base.ggml_rope_ext(ctx, tensor([64, 1, 2], series(128, 5)), tensor([2], [1, 300], I32), None, 64, 0, 8192, f32(100000.0), 1.0, 0.0, 1.0, 32.0, 1.0), 128))
# mul_mat F32: 4 rows of 64 (series 6) by one column (series 7): ggml_vec_dot_f32.
show("dot64", run(base.ggml_mul_mat(ctx, tensor([64, 4], series(256, 6)), tensor([64, 1], series(64, 7))), 4))
# 4 rows of 256 (series 8) by one column (series 9).
show("dot256", run(base.ggml_mul_mat(ctx, tensor([256, 4], series(1024, 8)), tensor([256, 1], series(256, 9))), 4))
# 16 rows of 64 (series 10) by two columns (series 11): tinyBLAS.
show("sgemm", run(base.ggml_mul_mat(ctx, tensor([64, 16], series(1024, 10)), tensor([64, 2], series(128, 11))), 32))
# Q8_0 weights, 4 rows of 64: block b of row r has d = f16 bits 0x2000 + 97 (4r + b) and
# quant j = ((r * 64 + 32 b + j) * 37) % 255 - 127; by one F32 column (series 12).
w = base.ggml_new_tensor_2d(ctx, Q8_0, 64, 4)
raw = bytearray()
for r in range(4):
    for b in range(2):
        raw += struct.pack("<H", 0x2000 + 97 * (4 * r + b))
        raw += bytes(((((r * 64 + 32 * b + j) * 37) % 255 - 127) & 0xFF) for j in range(32))
C.memmove(base.ggml_get_data(w), bytes(raw), len(raw))
show("q8_0", run(base.ggml_mul_mat(ctx, w, tensor([64, 1], series(64, 12))), 4))
# The same weights by two columns, series 12 then 16 (tinyBLAS for two or more).
show("q8_0 x2", run(base.ggml_mul_mat(ctx, w, tensor([64, 2], series(64, 12) + series(64, 16))), 8))
# Q5_0 weights: 12 rows of 192 (series 13 · 0.1) quantized by ggml itself, by one F32
# column (series 14: ggml_vec_dot_q5_0_q8_0) and by five (series 14 then 15: tinyBLAS).
src = (C.c_float * (12 * 192))(*series(12 * 192, 13, 0.1))
w5 = base.ggml_new_tensor_2d(ctx, Q5_0, 192, 12)
size = base.ggml_quantize_chunk(Q5_0, src, base.ggml_get_data(w5), 0, 12, 192, None)
print("q5_0 bytes", size, fnv(None, C.string_at(base.ggml_get_data(w5), size)))
show("q5_0", run(base.ggml_mul_mat(ctx, w5, tensor([192, 1], series(192, 14))), 12))
show("q5_0 x5", run(base.ggml_mul_mat(ctx, w5, tensor([192, 5], series(192, 14) + series(4 * 192, 15))), 60))
# Q8_K activations (block: f32 d, 256 quants, 16 i16 sums of 16): quantize_row_q8_K of
# three super-blocks (series 17), the second scaled by -3, the third all zero.
x8 = series(768, 17)
x8 = x8[:256] + [f32(-3.0 * v) for v in x8[256:512]] + [0.0] * 256
src = (C.c_float * 768)(*x8)
q8k = (C.c_char * (3 * 292))()
cpu.quantize_row_q8_K(src, q8k, 768)
print("q8_K bytes", fnv(None, bytes(q8k)))
# K-quant weights, 12 rows of 512 (24 super-blocks): byte i of the tensor is
# (i * 37 + 11) % 256, then each block's d (f16) set to 0x1000 + 97 b and, for Q4_K and Q5_K,
# its dmin to 0x1800 + 53 b; by one F32 column (series 19: ggml_vec_dot_qN_K_q8_K) and by
# five (series 19 then 20).
for name, typ, rb, dpos in [("q6_K", Q6_K, 210, 208), ("q4_K", Q4_K, 144, 0), ("q5_K", Q5_K, 176, 0)]:
    raw = bytearray((i * 37 + 11) % 256 for i in range(24 * rb))
    for b in range(24):
        raw[b * rb + dpos:b * rb + dpos + 2] = struct.pack("<H", 0x1000 + 97 * b)
        if typ != Q6_K:
            raw[b * rb + 2:b * rb + 4] = struct.pack("<H", 0x1800 + 53 * b)
    wk = base.ggml_new_tensor_2d(ctx, typ, 512, 12)
    C.memmove(base.ggml_get_data(wk), bytes(raw), len(raw))
    show(name, run(base.ggml_mul_mat(ctx, wk, tensor([512, 1], series(512, 19))), 12))
    show(name + " x5", run(base.ggml_mul_mat(ctx, wk, tensor([512, 5], series(512, 19) + series(4 * 512, 20))), 60))
# Q4_K weights as llama.cpp loads them on this CPU: in the CPU "repack" buffer (block_q4_Kx8,
# ggml_gemv_q4_K_8x8_q8_K for one column, ggml_gemm_q4_K_8x8_q8_K for four at a time):
# 16 rows of 512 (the recorded bytes above, 32 super-blocks), by one column (series 19),
# by five (series 19 then 20) and by eight (series 19 then 21).
for n, res, args in [("ggml_backend_alloc_ctx_tensors_from_buft", vp, [vp, vp]),
                     ("ggml_backend_tensor_set", None, [vp, vp, C.c_size_t, C.c_size_t]),
                     ("ggml_backend_tensor_get", None, [vp, vp, C.c_size_t, C.c_size_t]),
                     ("ggml_backend_graph_compute", C.c_int, [vp, vp])]:
    f = getattr(base, n); f.restype = res; f.argtypes = args
repack = getattr(cpu, "_Z35ggml_backend_cpu_repack_buffer_typev"); repack.restype = vp
cpu.ggml_backend_cpu_buffer_type.restype = vp
cpu.ggml_backend_cpu_init.restype = vp
cpu.ggml_backend_cpu_set_n_threads.argtypes = [vp, C.c_int]
backend = cpu.ggml_backend_cpu_init(); cpu.ggml_backend_cpu_set_n_threads(backend, 2)
def repacked(name, typ, rb, dpos, rows=16):
    raw = bytearray((i * 37 + 11) % 256 for i in range(2 * rows * rb))
    for b in range(2 * rows):
        raw[b * rb + dpos:b * rb + dpos + 2] = struct.pack("<H", 0x1000 + 97 * b)
        if typ != Q6_K:
            raw[b * rb + 2:b * rb + 4] = struct.pack("<H", 0x1800 + 53 * b)
    cw = base.ggml_init(P(1 << 20, None, True))
    w = base.ggml_new_tensor_2d(cw, typ, 512, rows)
    assert base.ggml_backend_alloc_ctx_tensors_from_buft(cw, repack())
    base.ggml_backend_tensor_set(w, bytes(raw), 0, len(raw))
    for m, cols in [(1, series(512, 19)), (5, series(512, 19) + series(4 * 512, 20)), (8, series(512, 19) + series(7 * 512, 21))]:
        cc = base.ggml_init(P(1 << 20, None, True))
        x = base.ggml_new_tensor_2d(cc, F32, 512, m)
        out = base.ggml_mul_mat(cc, w, x)
        g = base.ggml_new_graph(cc); base.ggml_build_forward_expand(g, out)
        assert base.ggml_backend_alloc_ctx_tensors_from_buft(cc, cpu.ggml_backend_cpu_buffer_type())
        base.ggml_backend_tensor_set(x, struct.pack(f"<{len(cols)}f", *cols), 0, 4 * len(cols))
        assert base.ggml_backend_graph_compute(backend, g) == 0
        res = (C.c_float * (rows * m))()
        base.ggml_backend_tensor_get(out, res, 0, 4 * rows * m)
        show(f"{name} repacked x{m}", [struct.unpack("<I", struct.pack("<f", v))[0] for v in res])
repacked("q4_K", Q4_K, 144, 0)
