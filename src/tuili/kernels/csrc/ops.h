// Every kernel's C++ entry point, for the bindings and for kernels that call other kernels
// (decode_step.cpp runs a whole decode step through them).
#pragma once
#include "common.h"

namespace tuili {
torch::Tensor w4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zs, int64_t group_size,
                        bool flip);
torch::Tensor w8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t group_size);
torch::Tensor w4_linear_bf16(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zs, int64_t N,
                             int64_t group_size);
torch::Tensor w8_linear_i16(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t N, int64_t group_size);
std::vector<torch::Tensor> w8_linear_i16_multi(torch::Tensor x, std::vector<torch::Tensor> packed,
                                               std::vector<torch::Tensor> scale, std::vector<int64_t> N,
                                               std::vector<int64_t> group_size);
bool use_bf16();
bool use_amx();  // qgemm_nmajor.cpp: tile products for W4 batches
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t gemv_rows);
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor weight_scale,
                          c10::optional<torch::Tensor> input_scale);
torch::Tensor w8a8_linear_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor weight_scale,
                               c10::optional<torch::Tensor> input_scale);
std::vector<torch::Tensor> w8a8_pack(torch::Tensor w);
torch::Tensor w8a8_linear_packed(torch::Tensor x, torch::Tensor packed, torch::Tensor row_sum,
                                 torch::Tensor weight_scale, c10::optional<torch::Tensor> input_scale, int64_t N);
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor zs,
                          int64_t group_size, bool flip);
torch::Tensor w4a8_linear_nmajor(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zs,
                                 int64_t N, int64_t group_size, bool symmetric);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor context_lens, double sm_scale,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                              int64_t window, double softcap);
void paged_write(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v,
                 c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor dequantize_w4(torch::Tensor w, torch::Tensor scale, torch::Tensor zs, int64_t K, int64_t group_size,
                            bool flip, bool bf16, c10::optional<torch::Tensor> out);
torch::Tensor dequantize_w8(torch::Tensor w, torch::Tensor scale, int64_t group_size, bool bf16,
                            c10::optional<torch::Tensor> out);
torch::Tensor dequantize_nmajor(torch::Tensor packed, torch::Tensor scale, c10::optional<torch::Tensor> zs, int64_t N,
                                int64_t K, int64_t group_size, bool bf16, c10::optional<torch::Tensor> out);
// Rows [n0, n1) of a W4 or W8 weight (the layouts of dequantize_w4 / dequantize_w8) as fp32 into out
// ((n1 − n0) × K): dequant.cpp's pass, for the panels of qgemv.cpp's batched AVX2 kernel.
void dequant_w4_rows(const uint8_t* w, const float* scale, const float* zs, float* out, int64_t n0, int64_t n1,
                     int64_t K, int64_t G, int64_t group, bool flip);
void dequant_w8_rows(const int8_t* w, const float* scale, float* out, int64_t n0, int64_t n1, int64_t K, int64_t G,
                     int64_t group);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor argmax_rows(torch::Tensor x);
torch::Tensor silu_mul_(torch::Tensor gate, torch::Tensor up);
}  // namespace tuili

