// W8A8: y (M, N) = (q_x · q_wᵀ) · s_x · s_w with the activations' int8 quantization fused in.
//
// Activations are quantized here, per token (s_x = max|x_m| / 127, dynamic) or with one calibrated
// scale (static), exactly as tuili.quant.linear.Int8Linear.quantize_input does: q = round(x / s_x)
// to nearest even, clamped to ±127. The int32 dot products are exact, so results equal the
// torch._int_mm fallback's bit for bit.
//
// AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so activations are stored as
// q + 128 (u8) and the excess 128 · Σ_k w_nk is subtracted per output row. AVX2: both sides
// widened to int16, vpmaddwd.
#include "common.h"

namespace tuili {
namespace {

// int8 codes of each row of x (M, K) into q (M, Kp) and their scales (M); `offset` adds 128 (u8).
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, const float* static_scale, bool offset,
                   uint8_t* q, float* scales) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xm = x + m * K;
      float s;
      if (static_scale) {
        s = *static_scale;
      } else {
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xm[k]));
        s = std::max(amax, 1e-12f) / 127.f;
      }
      scales[m] = s;
      uint8_t* qm = q + m * Kp;
      const int bias = offset ? 128 : 0;
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::nearbyint(xm[k] / s);  // round half to even, as torch.round
        qm[k] = static_cast<uint8_t>(static_cast<int>(std::min(127.f, std::max(-127.f, v))) + bias);
      }
      for (int64_t k = K; k < Kp; ++k) qm[k] = static_cast<uint8_t>(bias);  // zero
    }
  });
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void rows_vnni(const uint8_t* q, int64_t Kp, const int8_t* w, int64_t K, int32_t wsum, int32_t* out) {
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1);
    const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + k);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_loadu_si512(q + r * Kp + k), wv);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_epi32(acc[r]) - 128 * wsum;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
int32_t row_sum_vnni(const int8_t* w, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1);
    acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(mask, w + k));
  }
  return _mm512_reduce_add_epi32(acc);
}

template <int R>
__attribute__((target("avx2,fma")))
void rows_avx2(const uint8_t* q, int64_t Kp, const int8_t* w, int64_t K, int32_t* out) {
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  const int64_t full = K / 16 * 16;
  for (int64_t k = 0; k < full; k += 16) {
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + k)));
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + r * Kp + k)));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(xv, wv));
    }
  }
  for (int r = 0; r < R; ++r) {
    int32_t total = hsum256_epi32(acc[r]);
    for (int64_t k = full; k < K; ++k) total += static_cast<int8_t>(q[r * Kp + k]) * w[k];
    out[r] = total;
  }
}

}  // namespace

torch::Tensor w8a8_linear(torch::Tensor x_in, torch::Tensor w, torch::Tensor weight_scale,
                          c10::optional<torch::Tensor> input_scale) {
  const torch::Tensor x = as_float(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.is_contiguous() && w.size(1) == K,
              "w must be (N, K) int8 contiguous");
  TORCH_CHECK(weight_scale.scalar_type() == torch::kFloat && weight_scale.numel() == N && weight_scale.is_contiguous(),
              "weight_scale must be (N,) fp32");
  const float* static_scale = nullptr;
  torch::Tensor s_in;
  if (input_scale.has_value()) {
    s_in = input_scale->to(torch::kFloat).contiguous();
    TORCH_CHECK(s_in.numel() == 1, "input_scale must hold one value");
    static_scale = s_in.data_ptr<float>();
  }
  const bool vnni = use_vnni();
  const int64_t Kp = (K + 63) / 64 * 64;
  auto q = torch::empty({M, Kp}, torch::kByte);
  auto sx = torch::empty({M}, torch::kFloat);
  quantize_rows(x.data_ptr<float>(), M, K, Kp, static_scale, vnni, q.data_ptr<uint8_t>(), sx.data_ptr<float>());
  auto y = torch::empty({M, N}, torch::kFloat);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float *sxp = sx.data_ptr<float>(), *swp = weight_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int32_t acc[MB];
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wn = wp + n * K;
      // Σ_k w_nk for the unsigned-activation correction. Recomputed per call on purpose: passing a
      // precomputed sum measured 2× slower at M = 1, as this pass also streams the row into L1 ahead
      // of the dependent dot-product chain.
      const int32_t wsum = vnni ? row_sum_vnni(wn, K) : 0;
      for (int64_t m = 0; m < M; m += MB) {
        const int64_t rows = std::min<int64_t>(MB, M - m);
        with_rows(rows, [&](auto R) {
          if (vnni) rows_vnni<decltype(R)::value>(qp + m * Kp, Kp, wn, K, wsum, acc);
          else rows_avx2<decltype(R)::value>(qp + m * Kp, Kp, wn, K, acc);
        });
        for (int64_t r = 0; r < rows; ++r) yp[(m + r) * N + n] = static_cast<float>(acc[r]) * sxp[m + r] * swp[n];
      }
    }
  });
  return y.to(x_in.scalar_type());
}

}  // namespace tuili
