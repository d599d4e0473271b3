// Quantized weights to float in one pass, for products with many rows (prefill chunks, large
// batches): there a BLAS GEMM on the float weight is compute-bound and fast, and what costs is
// making that weight. PyTorch's path (unpack the nibbles, subtract, multiply, cast) walks the
// weight five times; this walks it once, writing fp32 or bf16 (rounded to nearest even, as torch).
//
//   dequantize_w4(w (N, ceil(K/32)·16) pack_int4 bytes, scale (N, G), zs (N, G), K, group_size, flip, bf16)
//       W[n, k] = scale[n, g] · u − zs[n, g],  u the code (^ 8 with flip: signed codes), g = k / group_size
//   dequantize_w8(w (N, K) int8, scale (N, G), group_size, bf16)
//       W[n, k] = scale[n, g] · q
//
// Rows are spread over torch's threads. With AVX-512 (and AVX512-BF16 for bf16 output) whole
// groups of 32 (W4) or 16 (W8) codes take explicit vector code; the rest, and AVX2 machines
// (TUILI_ISA=avx2 forces them), a plain loop the compiler vectorizes. Products and differences are
// never fused into an FMA, so every path gives PyTorch's values bit for bit.
#pragma GCC optimize("fp-contract=off")
#include "common.h"

namespace tuili {
namespace {

inline bool use_bf16_convert() {
  static const bool yes = use_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// W4 rows with group_size a multiple of 32 and K a multiple of 32: 32 codes (16 bytes) a step.
template <bool BF16>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void w4_vector(const uint8_t* w, const float* scale,
                                                                                const float* zs, void* out, int64_t n0,
                                                                                int64_t n1, int64_t K, int64_t G,
                                                                                int64_t group, bool flip) {
  const __m128i low = _mm_set1_epi8(0x0F), x = _mm_set1_epi8(flip ? 8 : 0);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = w + n * (K / 2);
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k0 / 2));
      const __m128i lo = _mm_xor_si128(_mm_and_si128(b, low), x);
      const __m128i hi = _mm_xor_si128(_mm_and_si128(_mm_srli_epi16(b, 4), low), x);
      const int64_t g = n * G + k0 / group;
      const __m512 s = _mm512_set1_ps(scale[g]), z = _mm512_set1_ps(zs[g]);
      const __m512 r0 = _mm512_sub_ps(_mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), z);
      const __m512 r1 = _mm512_sub_ps(_mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), z);
      if constexpr (BF16) {
        auto* o = static_cast<uint16_t*>(out) + n * K + k0;
        _mm512_storeu_si512(o, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(r1, r0)));
      } else {
        float* o = static_cast<float*>(out) + n * K + k0;
        _mm512_storeu_ps(o, r0);
        _mm512_storeu_ps(o + 16, r1);
      }
    }
  }
}

// W8 rows with group_size a multiple of 16 and K a multiple of 16: 16 codes a step.
template <bool BF16>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void w8_vector(const int8_t* w, const float* scale,
                                                                                void* out, int64_t n0, int64_t n1,
                                                                                int64_t K, int64_t G, int64_t group) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * K + k0));
      const __m512 r = _mm512_mul_ps(_mm512_set1_ps(scale[n * G + k0 / group]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
      if constexpr (BF16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + n * K + k0),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r)));
      } else {
        _mm512_storeu_ps(static_cast<float*>(out) + n * K + k0, r);
      }
    }
}

template <typename Out>
__attribute__((always_inline)) inline void w4_rows(const uint8_t* w, const float* scale, const float* zs, Out* out,
                                                   int64_t n0, int64_t n1, int64_t K, int64_t G, int64_t group,
                                                   bool flip) {
  const int64_t bytes = (K + 31) / 32 * 16;
  const uint8_t x = flip ? 8 : 0;
  float row[32];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = w + n * bytes;
    Out* dst = out + n * K;
    for (int64_t c = 0; c * 32 < K; ++c) {
      const uint8_t* b = src + c * 16;
      for (int j = 0; j < 16; ++j) {
        row[j] = static_cast<float>((b[j] & 0x0F) ^ x);
        row[j + 16] = static_cast<float>((b[j] >> 4) ^ x);
      }
      const int64_t k0 = c * 32, count = std::min<int64_t>(32, K - k0);
      if (group % 32 == 0 || k0 / group == (k0 + count - 1) / group) {  // one group for the chunk
        const int64_t g = n * G + k0 / group;
        const float s = scale[g], z = zs[g];
        for (int64_t j = 0; j < count; ++j) store(dst, k0 + j, s * row[j] - z);
      } else {
        for (int64_t j = 0; j < count; ++j) {
          const int64_t g = n * G + (k0 + j) / group;
          store(dst, k0 + j, scale[g] * row[j] - zs[g]);
        }
      }
    }
  }
}

template <typename Out>
__attribute__((always_inline)) inline void w8_rows(const int8_t* w, const float* scale, Out* out, int64_t n0,
                                                   int64_t n1, int64_t K, int64_t G, int64_t group) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k0 = 0; k0 < K; k0 += group) {
      const float s = scale[n * G + k0 / group];
      const int64_t end = std::min(K, k0 + group);
      for (int64_t k = k0; k < end; ++k) store(out + n * K, k, s * static_cast<float>(w[n * K + k]));
    }
}

template <typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void w4_avx512(const uint8_t* w, const float* s, const float* z,
                                                                     Out* o, int64_t n0, int64_t n1, int64_t K,
                                                                     int64_t G, int64_t group, bool flip) {
  w4_rows(w, s, z, o, n0, n1, K, G, group, flip);
}

template <typename Out>
__attribute__((target("avx2,fma"))) void w4_avx2(const uint8_t* w, const float* s, const float* z, Out* o, int64_t n0,
                                                 int64_t n1, int64_t K, int64_t G, int64_t group, bool flip) {
  w4_rows(w, s, z, o, n0, n1, K, G, group, flip);
}

template <typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void w8_avx512(const int8_t* w, const float* s, Out* o,
                                                                     int64_t n0, int64_t n1, int64_t K, int64_t G,
                                                                     int64_t group) {
  w8_rows(w, s, o, n0, n1, K, G, group);
}

template <typename Out>
__attribute__((target("avx2,fma"))) void w8_avx2(const int8_t* w, const float* s, Out* o, int64_t n0, int64_t n1,
                                                 int64_t K, int64_t G, int64_t group) {
  w8_rows(w, s, o, n0, n1, K, G, group);
}

void check_scales(const torch::Tensor& scale, int64_t N, int64_t K, int64_t group) {
  TORCH_CHECK(group > 0, "group_size must be positive");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == (K + group - 1) / group &&
                  scale.scalar_type() == torch::kFloat && scale.is_contiguous(),
              "scale must be (N, ceil(K / group_size)) fp32, contiguous");
}

}  // namespace

namespace {
// The output: `out` where given (a caller's reused workspace: fresh pages cost more than the pass), else new.
torch::Tensor output(const c10::optional<torch::Tensor>& out, int64_t N, int64_t K, bool bf16) {
  const auto kind = bf16 ? torch::kBFloat16 : torch::kFloat;
  if (!out.has_value()) return torch::empty({N, K}, kind);
  TORCH_CHECK(out->dim() == 2 && out->size(0) == N && out->size(1) == K && out->scalar_type() == kind &&
                  out->is_contiguous(),
              "out must be a contiguous (N, K) tensor of the requested dtype");
  return *out;
}
}  // namespace

torch::Tensor dequantize_w4(torch::Tensor w, torch::Tensor scale, torch::Tensor zs, int64_t K, int64_t group_size,
                            bool flip, bool bf16, c10::optional<torch::Tensor> out_) {
  const int64_t N = w.size(0), G = scale.size(1);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kByte && w.is_contiguous() && w.size(1) == (K + 31) / 32 * 16,
              "w must be (N, ceil(K/32)·16) packed uint8 codes, contiguous");
  check_scales(scale, N, K, group_size);
  TORCH_CHECK(zs.sizes() == scale.sizes() && zs.scalar_type() == torch::kFloat && zs.is_contiguous(),
              "zs must be like scale");
  auto out = output(out_, N, K, bf16);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zs.data_ptr<float>();
  const bool wide = use_avx512();
  const bool vector = wide && K % 32 == 0 && (group_size % 32 == 0 || group_size >= K) && (!bf16 || use_bf16_convert());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (vector) {
      bf16 ? w4_vector<true>(wp, sp, zp, out.data_ptr(), n0, n1, K, G, group_size, flip)
           : w4_vector<false>(wp, sp, zp, out.data_ptr(), n0, n1, K, G, group_size, flip);
    } else if (bf16) {
      auto* o = out.data_ptr<at::BFloat16>();
      wide ? w4_avx512(wp, sp, zp, o, n0, n1, K, G, group_size, flip)
           : w4_avx2(wp, sp, zp, o, n0, n1, K, G, group_size, flip);
    } else {
      auto* o = out.data_ptr<float>();
      wide ? w4_avx512(wp, sp, zp, o, n0, n1, K, G, group_size, flip)
           : w4_avx2(wp, sp, zp, o, n0, n1, K, G, group_size, flip);
    }
  });
  return out;
}

torch::Tensor dequantize_w8(torch::Tensor w, torch::Tensor scale, int64_t group_size, bool bf16,
                            c10::optional<torch::Tensor> out_) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.is_contiguous(), "w must be (N, K) int8, contiguous");
  const int64_t N = w.size(0), K = w.size(1), G = scale.size(1);
  check_scales(scale, N, K, group_size);
  auto out = output(out_, N, K, bf16);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const bool wide = use_avx512();
  const bool vector = wide && K % 16 == 0 && (group_size % 16 == 0 || group_size >= K) && (!bf16 || use_bf16_convert());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (vector) {
      bf16 ? w8_vector<true>(wp, sp, out.data_ptr(), n0, n1, K, G, group_size)
           : w8_vector<false>(wp, sp, out.data_ptr(), n0, n1, K, G, group_size);
    } else if (bf16) {
      auto* o = out.data_ptr<at::BFloat16>();
      wide ? w8_avx512(wp, sp, o, n0, n1, K, G, group_size) : w8_avx2(wp, sp, o, n0, n1, K, G, group_size);
    } else {
      auto* o = out.data_ptr<float>();
      wide ? w8_avx512(wp, sp, o, n0, n1, K, G, group_size) : w8_avx2(wp, sp, o, n0, n1, K, G, group_size);
    }
  });
  return out;
}

}  // namespace tuili
