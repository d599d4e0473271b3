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
//
// On AVX2 without VNNI, `w4a8_linear_nmajor` reads the N-major packing of the 16-bit dot-product
// kernels instead (tuili.kernels.repack.pack_w4_bf16, one stream for a block of 16 outputs): each
// 32-byte load holds 16 outputs × 4 consecutive k, so one vpmaddubsw against a broadcast pair of
// activations adds 2 products to each of 16 outputs, with no horizontal sums. Four such steps
// (16 k, |sum| ≤ 8 · 15 · 127 < 2^15) accumulate in int16 before widening. The row kernel above
// decodes one output row at a time and its per-group float work and horizontal sums bound it:
// on a Zen 3 core, a 128256 × 2048 g32 layer at one row ran 2.6 weights a cycle there and 5.5-6.7
// here, where reading the weights from memory is the bound.
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

__attribute__((target("avx2"))) inline __m256i broadcast_pair(const int8_t* p) {
  int16_t v;
  std::memcpy(&v, p, 2);
  return _mm256_set1_epi16(v);
}

// 16 int16 sums (one per output) widened and added, times scale · d, into two fp32 halves.
__attribute__((target("avx2,fma"))) inline void widen_into(__m256i& sums, const __m256 sd[2], __m256 total[2]) {
  const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sums));
  const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sums, 1));
  total[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), sd[0], total[0]);
  total[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), sd[1], total[1]);
  sums = _mm256_setzero_si256();
}

// One block of 16 outputs (packed: its (Kp/4, 32) bytes; scale, zs: its (G, 16)) against R rows of
// int8 activations q (stride Kq). y = Σ_g scale_g · d_g · Σ_k u_k q_k − Σ_g zs_g · dq_g, zs = 8 · scale
// where `symmetric` (then zs is not read).
template <int R>
__attribute__((target("avx2,fma"))) void block_avx2(const int8_t* q, int64_t Kq, int64_t Kp, const uint8_t* packed,
                                                    const float* scale, const float* zs, const float* d,
                                                    const float* dq, int64_t G, int64_t gs, bool symmetric, float* y,
                                                    int64_t N, int64_t n0) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int64_t D = Kp / 4;
  __m256 total[R][2];
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 s0 = _mm256_loadu_ps(scale + g * 16), s1 = _mm256_loadu_ps(scale + g * 16 + 8);
    __m256 sd[R][2];
    for (int r = 0; r < R; ++r) {
      const __m256 dr = _mm256_set1_ps(d[r * G + g]);
      sd[r][0] = _mm256_mul_ps(s0, dr);
      sd[r][1] = _mm256_mul_ps(s1, dr);
    }
    const int64_t d0 = g * gs / 4, d1 = std::min(D, d0 + gs / 4);
    for (int64_t db = d0; db < d1; db += 4) {
      __m256i sums[R];
      for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
      for (int64_t dd = db; dd < std::min(d1, db + 4); ++dd) {
        if (!(dd & 1)) prefetch_stream(packed + dd * 32 + 4096);  // a line per two steps, 4 KiB ahead
        const __m256i b = _mm256_loadu_si256((const __m256i*)(packed + dd * 32));
        const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        for (int r = 0; r < R; ++r) {
          const int8_t* qr = q + r * Kq + dd * 4;
          sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(lo, broadcast_pair(qr)));
          sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(hi, broadcast_pair(qr + 2)));
        }
      }
      for (int r = 0; r < R; ++r) widen_into(sums[r], sd[r], total[r]);
    }
  }
  const float* z = symmetric ? scale : zs;
  const float times = symmetric ? 8.f : 1.f;
  const int64_t width = std::min<int64_t>(16, N - n0);
  for (int r = 0; r < R; ++r) {
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m256 dqg = _mm256_set1_ps(times * dq[r * G + g]);
      c0 = _mm256_fmadd_ps(_mm256_loadu_ps(z + g * 16), dqg, c0);
      c1 = _mm256_fmadd_ps(_mm256_loadu_ps(z + g * 16 + 8), dqg, c1);
    }
    alignas(32) float out[16];
    _mm256_store_ps(out, _mm256_sub_ps(total[r][0], c0));
    _mm256_store_ps(out + 8, _mm256_sub_ps(total[r][1], c1));
    for (int64_t j = 0; j < width; ++j) y[r * N + n0 + j] = out[j];
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

torch::Tensor w4a8_linear_nmajor(torch::Tensor x_in, torch::Tensor packed, torch::Tensor scale, torch::Tensor zs,
                                 int64_t N, int64_t group_size, bool symmetric) {
  const torch::Tensor x = as_float(x_in);
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 3) / 4 * 4, B = (N + 15) / 16;
  const int64_t G = (K + group_size - 1) / group_size, C = (K + 31) / 32, Kq = C * 32;
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0, "W4A8 needs a group size that is a multiple of 4, got ", group_size);
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == B && packed.size(1) == Kp / 4 && packed.size(2) == 32,
              "packed must be (ceil(N/16), ceil(K/4), 32) uint8 (tuili.kernels.repack.pack_w4_bf16) for N=", N,
              ", K=", K);
  for (const auto* t : {&scale, &zs})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == B &&
                    t->size(1) == G && t->size(2) == 16,
                "scale and zs must be (ceil(N/16), ceil(K/group_size), 16) fp32");
  auto q = torch::empty({M, Kq}, torch::kChar);
  auto d = torch::empty({M, G}, torch::kFloat), dq = torch::empty({M, G}, torch::kFloat);
  quantize_groups(x.data_ptr<float>(), M, K, C, G, group_size, q.data_ptr<int8_t>(), d.data_ptr<float>(),
                  dq.data_ptr<float>());
  auto y = torch::empty({M, N}, torch::kFloat);
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zs.data_ptr<float>(), *dp = d.data_ptr<float>(),
              *dqp = dq.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)  // the block's weights stay in L1/L2 while every 4 rows meet them
      for (int64_t m = 0; m < M; m += MB)
        with_rows(std::min<int64_t>(MB, M - m), [&](auto R) {
          block_avx2<decltype(R)::value>(qp + m * Kq, Kq, Kp, wp + b * Kp * 8, sp + b * G * 16, zp + b * G * 16,
                                         dp + m * G, dqp + m * G, G, group_size, symmetric, yp + m * N, N, b * 16);
        });
  });
  return y.to(x_in.scalar_type());
}

}  // namespace tuili
