"""Requantizes a GGUF file with llama.cpp's own quantizer (llama_model_quantize
of node-llama-cpp 3.22.1's libllama, through ctypes), for docs/CANDLE.md's
Q5_0 and Q4_K_M figures:

    npm install node-llama-cpp@3.22.1   # in DIR
    L=DIR/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
    python3 requantize.py $L SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.Q4_K_M.gguf 15
    python3 requantize.py $L SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.Q5_0.gguf 8

FTYPE is llama.cpp's llama_ftype (15 Q4_K_M, 8 MOSTLY_Q5_0); quantized
tensors are requantized (allow_requantize), from their dequantized values.
"""
import ctypes as C, sys

D = sys.argv[1].rstrip("/") + "/"
C.CDLL(D + "libggml-base.so", mode=C.RTLD_GLOBAL)
C.CDLL(D + "libggml.v0.5.0.so", mode=C.RTLD_GLOBAL)
ll = C.CDLL(D + "libllama.v0.5.0.so", mode=C.RTLD_GLOBAL)

class Params(C.Structure):  # llama_model_quantize_params, llama.h at v0.5.0
    _fields_ = [("nthread", C.c_int32), ("ftype", C.c_int), ("output_tensor_type", C.c_int),
                ("token_embedding_type", C.c_int), ("allow_requantize", C.c_bool),
                ("quantize_output_tensor", C.c_bool), ("only_copy", C.c_bool), ("pure", C.c_bool),
                ("keep_split", C.c_bool), ("dry_run", C.c_bool), ("imatrix", C.c_void_p),
                ("kv_overrides", C.c_void_p), ("tt_overrides", C.c_void_p),
                ("prune_layers", C.c_void_p), ("max_buf_size", C.c_size_t)]

ll.llama_model_quantize_default_params.restype = Params
ll.llama_model_quantize.argtypes = [C.c_char_p, C.c_char_p, C.POINTER(Params)]
ll.llama_model_quantize.restype = C.c_uint32
ll.llama_backend_init()
p = ll.llama_model_quantize_default_params()
p.nthread, p.ftype, p.allow_requantize = 2, int(sys.argv[4]), True
sys.exit(ll.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), C.byref(p)))
