// W4A8: 4-bit weights × int8 activations, the way llama.cpp decodes Q4 weights on CPUs.
//
// Activations are quantized per token and per weight group g: d = max|x_g| / 127, q = round(x / d)
// (to nearest even), so every group's product is an integer dot product:
//   y = Σ_g s_g · d_g · Σ_k u_k q_k  −  Σ_g zs_g · d_g · Σ_k q_k
// with u the unsigned weight codes and zs = scale · zero. The weights keep W4A16's layout
// (tuili.quant.primitives.pack_int4): a chunk of 32 codes in 16 bytes, low nibbles = codes 0..15,
// high nibbles = codes 16..31, so expanding a chunk to [low | high] bytes lines it up with 32
// consecutive activations. AVX-512 VNNI: vpdpbusd (u8 × s8 → i32) on 256-bit vectors; AVX2:
// vpmaddubsw + vpmaddwd (15 · 127 · 2 fits int16, no saturation).
#include "common.h"

namespace tuili {
namespace {

// q (M, C·32) int8 in natural order, zero-padded; d (M, G) and dq = d · Σq (M, G) per group.
void quantize_groups(const float* x, int64_t M, int64_t K, int64_t C, int64_t G, int64_t gs, int8_t* q, float* d,
                     float* dq) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xm = x + m * K;
      int8_t* qm = q + m * C * 32;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xm[k]));
        const float s = std::max(amax, 1e-12f) / 127.f;
        int32_t sum = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int v = static_cast<int>(std::min(127.f, std::max(-127.f, std::nearbyint(xm[k] / s))));
          qm[k] = static_cast<int8_t>(v);
          sum += v;
        }
        d[m * G + g] = s;
        dq[m * G + g] = s * static_cast<float>(sum);
      }
      for (int64_t k = K; k < C * 32; ++k) qm[k] = 0;
    }
  });
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) void rows_vnni(
    const int8_t* q, int64_t Kp, const uint8_t* w, const float* scale, const float* zs, const float* d,
    const float* dq, int64_t G, int64_t chunks_per_group, int64_t C, bool flip, float* out) {
  const __m128i nib = _mm_set1_epi8(0x0F), flipper = _mm_set1_epi8(flip ? (char)0x88 : 0);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * chunks_per_group, c1 = std::min(C, c0 + chunks_per_group);
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; ++c) {
      const __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(w + c * 16)), flipper);
      const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), nib), _mm_and_si128(b, nib));
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_dpbusd_epi32(acc[r], u, _mm256_loadu_si256((const __m256i*)(q + r * Kp + c * 32)));
    }
    for (int r = 0; r < R; ++r)
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(scale[g] * d[r * G + g]), total[r]);
  }
  for (int r = 0; r < R; ++r) {
    float corr = 0.f;
    for (int64_t g = 0; g < G; ++g) corr += zs[g] * dq[r * G + g];
    out[r] = hsum256(total[r]) - corr;
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void rows_avx2(const int8_t* q, int64_t Kp, const uint8_t* w, const float* scale,
                                                   const float* zs, const float* d, const float* dq, int64_t G,
                                                   int64_t chunks_per_group, int64_t C, bool flip, float* out) {
  const __m128i nib = _mm_set1_epi8(0x0F), flipper = _mm_set1_epi8(flip ? (char)0x88 : 0);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * chunks_per_group, c1 = std::min(C, c0 + chunks_per_group);
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; ++c) {
      const __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(w + c * 16)), flipper);
      const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), nib), _mm_and_si128(b, nib));
      for (int r = 0; r < R; ++r) {
        const __m256i pairs = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i*)(q + r * Kp + c * 32)));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int r = 0; r < R; ++r)
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(scale[g] * d[r * G + g]), total[r]);
  }
  for (int r = 0; r < R; ++r) {
    float corr = 0.f;
    for (int64_t g = 0; g < G; ++g) corr += zs[g] * dq[r * G + g];
    out[r] = hsum256(total[r]) - corr;
  }
}

}  // namespace

torch::Tensor w4a8_linear(torch::Tensor x_in, torch::Tensor w, torch::Tensor scale, torch::Tensor zs,
                          int64_t group_size, bool flip) {
  const torch::Tensor x = as_float(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1), C = (K + 31) / 32;
  TORCH_CHECK(group_size % 32 == 0, "W4A8 needs a group size that is a multiple of 32, got ", group_size);
  TORCH_CHECK(G == (K + group_size - 1) / group_size, "scale must have ceil(K / group_size) groups");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kByte && w.is_contiguous() && w.size(1) == C * 16,
              "w must be (N, ceil(K/32)*16) uint8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.size(0) == N &&
                  zs.sizes() == scale.sizes() && zs.scalar_type() == torch::kFloat && zs.is_contiguous(),
              "scale and zs must be (N, G) fp32 contiguous");
  const int64_t Kp = C * 32;
  auto q = torch::empty({M, Kp}, torch::kChar);
  auto d = torch::empty({M, G}, torch::kFloat), dq = torch::empty({M, G}, torch::kFloat);
  quantize_groups(x.data_ptr<float>(), M, K, C, G, group_size, q.data_ptr<int8_t>(), d.data_ptr<float>(),
                  dq.data_ptr<float>());
  auto y = torch::empty({M, N}, torch::kFloat);
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zs.data_ptr<float>(), *dp = d.data_ptr<float>(),
              *dqp = dq.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool vnni = use_vnni();
  const int64_t cpg = group_size / 32;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float out[MB];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wn = wp + n * C * 16;
      for (int64_t m = 0; m < M; m += MB) {
        const int64_t rows = std::min<int64_t>(MB, M - m);
        with_rows(rows, [&](auto R) {
          constexpr int r = decltype(R)::value;
          if (vnni) rows_vnni<r>(qp + m * Kp, Kp, wn, sp + n * G, zp + n * G, dp + m * G, dqp + m * G, G, cpg, C, flip, out);
          else rows_avx2<r>(qp + m * Kp, Kp, wn, sp + n * G, zp + n * G, dp + m * G, dqp + m * G, G, cpg, C, flip, out);
        });
        for (int64_t r = 0; r < rows; ++r) yp[(m + r) * N + n] = out[r];
      }
    }
  });
  return y.to(x_in.scalar_type());
}

}  // namespace tuili
