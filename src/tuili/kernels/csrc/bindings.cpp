// The Python face of tuili's kernels: one extension module, one function per kernel.
#include <torch/extension.h>  // pybind11: this file binds to Python

#include "ops.h"

namespace tuili {
void bind_decode_plan(py::module_& m);  // decode_step.cpp

std::string isa() {
  if (use_vnni()) return "avx512-vnni";
  if (use_avx512()) return "avx512";
  return __builtin_cpu_supports("avx2") ? "avx2" : "none";
}
}  // namespace tuili

// Every kernel lets go of the GIL while it runs: a server's event loop (another thread) can then
// stream the previous step's tokens while the engine computes, instead of stalling it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("w4_linear", &tuili::w4_linear, "x · dequant(W4)ᵀ for small M", release());
  m.def("w8_linear", &tuili::w8_linear, "x · dequant(W8)ᵀ for small M", release());
  m.def("w4_linear_bf16", &tuili::w4_linear_bf16, "bf16(x) · dequant(W4)ᵀ on N-major packed weights, vdpbf16ps, 1-64 rows",
        release());
  m.def("w8_linear_i16", &tuili::w8_linear_i16,
        "int16(x, per token) · W8ᵀ on N-major packed weights, vpdpwssd, 1-64 rows", release());
  m.def("w8_linear_i16_multi", &tuili::w8_linear_i16_multi,
        "w8_linear_i16 of several layers on one input, in one parallel loop; one output each", release());
  m.def("f32_linear", &tuili::f32_linear, "x · Wᵀ (+ b) in fp32 for small M, AVX-512", release());
  m.def("linear", &tuili::linear, "a float layer: f32_linear up to gemv_rows fp32 rows, PyTorch's linear otherwise",
        release());
  m.def("w8a8_linear", &tuili::w8a8_linear, "int8(x) · W8ᵀ with per-token (or static) activation scales", release());
  m.def("w8a8_linear_gemm", &tuili::w8a8_linear_gemm,
        "W8A8 for large batches: rows quantized, torch._int_mm, scaled in one pass", release());
  m.def("w8a8_pack", &tuili::w8a8_pack, "W8A8 weights repacked for the batched VNNI kernel, and their row sums",
        release());
  m.def("w8a8_linear_packed", &tuili::w8a8_linear_packed, "W8A8 on packed weights: outer-product VNNI for batches",
        release());
  m.def("w4a8_linear", &tuili::w4a8_linear, "int8(x, per token and group) · W4ᵀ, VNNI", release());
  m.def("w4a8_linear_nmajor", &tuili::w4a8_linear_nmajor,
        "int8(x, per token and group) · W4ᵀ on N-major packed weights, AVX2, 1-64 rows", release());
  m.def("paged_attention", &tuili::paged_attention, "decode attention over a paged KV cache (fp32/bf16/int8, GQA)",
        release());
  m.def("paged_write", &tuili::paged_write, "store keys and values at slots of a paged cache (int8: per token and head)",
        release());
  m.def("rms_norm", &tuili::rms_norm, "w · x / sqrt(mean(x²) + eps) over the last dim", release());
  m.def("dequantize_w4", &tuili::dequantize_w4, "packed W4 codes to an fp32 or bf16 weight, one pass", release());
  m.def("dequantize_w8", &tuili::dequantize_w8, "int8 codes to an fp32 or bf16 weight, one pass", release());
  m.def("dequantize_nmajor", &tuili::dequantize_nmajor,
        "N-major packed W4 (with zs) or W8 codes to an fp32 or bf16 weight, one pass", release());
  m.def("rope", &tuili::rope, "rotary embedding of (B, T, H, D) by cos/sin (B, T, D), half-split layout", release());
  m.def("silu_mul_", &tuili::silu_mul_, "gate <- silu(gate) · up in place (SwiGLU), fp32 or bf16", release());
  m.def("argmax_rows", &tuili::argmax_rows, "each row's first largest value's index (NaN largest), as torch.argmax",
        release());
  m.def("isa", &tuili::isa, "the SIMD path this CPU takes");
  tuili::bind_decode_plan(m);
  m.def("bf16", &tuili::use_bf16, "whether this CPU takes the 16-bit dot-product kernels (AVX512-BF16 and VNNI)");
  m.def("amx", &tuili::use_amx, "whether W4 batches of 4+ rows take AMX tile products (TUILI_ISA=avx512: never)");
}
