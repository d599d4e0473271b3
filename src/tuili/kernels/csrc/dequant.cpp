// Quantized weights to float in one pass, for products with many rows (prefill chunks, large
// batches): there a BLAS GEMM on the float weight is compute-bound and fast, and what costs is
// making that weight. PyTorch's path (unpack the nibbles, subtract, multiply, cast) walks the
// weight five times; this walks it once, writing fp32 or bf16 (rounded to nearest even, as torch).
//
//   dequantize_w4(w (N, ceil(K/32)·16) pack_int4 bytes, scale (N, G), zs (N, G), K, group_size, flip, bf16)
//       W[n, k] = scale[n, g] · u − zs[n, g],  u the code (^ 8 with flip: signed codes), g = k / group_size
//   dequantize_w8(w (N, K) int8, scale (N, G), group_size, bf16)
//       W[n, k] = scale[n, g] · q
//   dequantize_nmajor(packed, scale (N/16, G, 16), zs like scale or None, N, K, group_size, bf16)
//       the same from the N-major packing of the 16-bit dot-product kernels (csrc/qgemm_nmajor.cpp):
//       W4 (zs given) scale · u − zs, W8 scale · q. A layer that keeps only that packing (bf16 dot
//       products; W4A8 on AVX2) makes its prefill weight here.
//
// Rows are spread over torch's threads. With AVX-512 (and AVX512-BF16 for bf16 output) whole
// groups of 32 (W4) or 16 (W8) codes take explicit vector code; the rest, and AVX2 machines
// (TUILI_ISA=avx2 forces them), a plain loop the compiler vectorizes. Products and differences are
// never fused into an FMA, so every path gives PyTorch's values bit for bit.
#pragma GCC optimize("fp-contract=off")
#include "ops.h"

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

// The same W4 rows in fp32 with AVX2 (the compiler's vectorization of w4_rows runs ~1 ns a code).
__attribute__((target("avx2,fma"))) void w4_vector_avx2(const uint8_t* w, const float* scale, const float* zs,
                                                       float* out, int64_t n0, int64_t n1, int64_t K, int64_t G,
                                                       int64_t group, bool flip) {
  const __m128i low = _mm_set1_epi8(0x0F), x = _mm_set1_epi8(flip ? 8 : 0);
  const int64_t step = std::min(group, K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = w + n * (K / 2);
    for (int64_t k0 = 0, g = n * G; k0 < K; k0 += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k0 / 2));
      const __m128i lo = _mm_xor_si128(_mm_and_si128(b, low), x);
      const __m128i hi = _mm_xor_si128(_mm_and_si128(_mm_srli_epi16(b, 4), low), x);
      if (k0 >= (g - n * G + 1) * step) ++g;  // the next group (a multiple of 32 codes): no division a step
      const __m256 s = _mm256_set1_ps(scale[g]), z = _mm256_set1_ps(zs[g]);
      float* o = out + n * K + k0;
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int i = 0; i < 4; ++i)
        _mm256_storeu_ps(o + 8 * i,
                         _mm256_sub_ps(_mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]))), z));
    }
  }
}

// The same W8 rows in fp32 with AVX2, 8 codes a step (K a multiple of 8; group_size too, or >= K).
__attribute__((target("avx2,fma"))) void w8_vector_avx2(const int8_t* w, const float* scale, float* out, int64_t n0,
                                                       int64_t n1, int64_t K, int64_t G, int64_t group) {
  const int64_t step = std::min(group, K);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {  // a group at a time: no division a step
      const __m256 s = _mm256_set1_ps(scale[n * G + g]);
      for (int64_t k0 = g * step; k0 < std::min(K, (g + 1) * step); k0 += 8) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + n * K + k0));
        _mm256_storeu_ps(out + n * K + k0, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
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

// N-major packed weights back to rows. In both packings the 16-bit word of output j (of a block of
// 16) for consecutive pairs (W8: 2 codes, k = 2p, 2p + 1) or double pairs (W4: 4 codes in its two
// bytes, low nibbles k = 4d, 4d + 1, high nibbles 4d + 2, 4d + 3) lies every 32 bytes: 16 of them
// are a 16 × 16 matrix of words (rows: pairs, columns: outputs) in 512 contiguous bytes. Three
// rounds of two-register word permutes (vpermt2w) transpose it, leaving each output's 16 words, its
// next 32 (W8) or 64 (W4) codes in k order, side by side: 24 permutes for 16 outputs, where
// gathering each output's words took 1.2× (W8) to 1.1× (W4) as long. W4 still takes 1.6× as long
// as from the row layout, W8 as long.

// The permute indices, made once by following where each word goes. A word is named row · 16 + column.
struct Transpose16 {
  alignas(64) uint16_t index[3][8][32];
  Transpose16() {
    uint16_t label[4][8][32];  // the eight registers' words before each round and after the last
    for (int r = 0; r < 8; ++r)
      for (int t = 0; t < 32; ++t) label[0][r][t] = static_cast<uint16_t>((2 * r + t / 16) * 16 + t % 16);
    for (int r = 0; r < 8; ++r)
      for (int t = 0; t < 32; ++t) {
        // round 1: rows 4m.. 4m+3, columns 8c.. 8c+7 (register 2m + c, from registers 2m, 2m + 1)
        const int m = r / 2, c = r % 2;
        label[1][r][t] = static_cast<uint16_t>((4 * m + t / 8) * 16 + 8 * c + t % 8);
        // round 2: rows 8p.. 8p+7, columns 8c + 4h.. +3 (register 4p + 2c + h, from 4p + c, 4p + 2 + c)
        const int p = r / 4, c2 = (r / 2) % 2, h = r % 2;
        label[2][r][t] = static_cast<uint16_t>((8 * p + t / 4) * 16 + 8 * c2 + 4 * h + t % 4);
        // round 3: columns 2r, 2r + 1, all 16 rows each (from registers r / 2 and 4 + r / 2)
        label[3][r][t] = static_cast<uint16_t>((t % 16) * 16 + 2 * r + t / 16);
      }
    for (int round = 0; round < 3; ++round)
      for (int r = 0; r < 8; ++r) {
        const int a = source(round, r, 0), b = source(round, r, 1);
        for (int t = 0; t < 32; ++t) {
          const uint16_t want = label[round + 1][r][t];
          index[round][r][t] = 0xFFFF;
          for (int i = 0; i < 64; ++i)
            if ((i < 32 ? label[round][a][i] : label[round][b][i - 32]) == want) index[round][r][t] = static_cast<uint16_t>(i);
          TORCH_CHECK(index[round][r][t] != 0xFFFF, "transpose: a word has no source");
        }
      }
  }
  // The two registers that round `round` reads to make register r.
  static int source(int round, int r, int which) {
    if (round == 0) return 2 * (r / 2) + which;
    if (round == 1) return 4 * (r / 4) + (r / 2) % 2 + 2 * which;
    return r / 2 + 4 * which;
  }
};

// One block of 16 outputs: its words, 16 rows at a time, transposed and written out as floats.
template <bool BF16, bool W4>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void nmajor_block(
    const uint8_t* block, const float* scale, const float* zs, int64_t G, int64_t group, int64_t words, int64_t K,
    void* out, int64_t n0, int64_t rows) {
  static const Transpose16 plan;
  constexpr int64_t per_word = W4 ? 4 : 2;
  const __m512i nibbles = _mm512_set1_epi32(0x0F0F);
  for (int64_t w0 = 0; w0 < words; w0 += 16) {
    const int64_t count = std::min<int64_t>(16, words - w0);
    __m512i reg[8], next[8];
    for (int r = 0; r < 8; ++r) {  // rows 2r, 2r + 1: 64 bytes; rows past the end read as zeros
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(32, (count - 2 * r) * 16));
      const __mmask32 m = valid >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << valid) - 1);
      reg[r] = _mm512_maskz_loadu_epi16(m, block + (w0 + 2 * r) * 32);
    }
    for (int round = 0; round < 3; ++round) {
      for (int r = 0; r < 8; ++r) {
        const __m512i idx = _mm512_load_si512(plan.index[round][r]);
        next[r] = _mm512_permutex2var_epi16(reg[Transpose16::source(round, r, 0)], idx,
                                            reg[Transpose16::source(round, r, 1)]);
      }
      for (int r = 0; r < 8; ++r) reg[r] = next[r];
    }
    for (int64_t j = 0; j < rows; ++j) {
      const __m256i mine = j % 2 ? _mm512_extracti64x4_epi64(reg[j / 2], 1) : _mm512_castsi512_si256(reg[j / 2]);
      __m512i codes;  // this output's codes in k order, as bytes (W8: 32 of them, signed)
      if constexpr (W4) {
        const __m512i v = _mm512_cvtepu16_epi32(mine);
        const __m512i lo = _mm512_and_si512(v, nibbles), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), nibbles);
        codes = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      } else {
        codes = _mm512_castsi256_si512(mine);
      }
      for (int64_t q = 0; q < per_word; q += 2) {  // 32 codes a step: two of 16, one scale each
        const int64_t k = w0 * per_word + 16 * q;
        if (k >= K) break;
        __m512 r[2];
        for (int h = 0; h < 2; ++h) {
          const __m128i c = q + h == 0   ? _mm512_extracti32x4_epi32(codes, 0)
                            : q + h == 1 ? _mm512_extracti32x4_epi32(codes, 1)
                            : q + h == 2 ? _mm512_extracti32x4_epi32(codes, 2)
                                         : _mm512_extracti32x4_epi32(codes, 3);
          const __m512 u = _mm512_cvtepi32_ps(W4 ? _mm512_cvtepu8_epi32(c) : _mm512_cvtepi8_epi32(c));
          const int64_t g = (G == 1 ? 0 : (k + 16 * h) / group) * 16 + j;
          r[h] = _mm512_mul_ps(_mm512_set1_ps(scale[g]), u);
          if constexpr (W4) r[h] = _mm512_sub_ps(r[h], _mm512_set1_ps(zs[g]));
        }
        const int64_t left = K - k;
        if constexpr (BF16) {
          auto* o = static_cast<uint16_t*>(out) + (n0 + j) * K + k;
          const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(r[1], r[0]));
          const __mmask32 keep = left >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << left) - 1);
          _mm512_mask_storeu_epi16(o, keep, both);
        } else {
          float* o = static_cast<float*>(out) + (n0 + j) * K + k;
          for (int h = 0; h < 2; ++h) {
            const int64_t rest = left - 16 * h;
            if (rest <= 0) break;
            _mm512_mask_storeu_ps(o + 16 * h, tail16(rest), r[h]);
          }
        }
      }
    }
  }
}

// The same block without AVX-512 (W4A8 on AVX2 holds this packing too): one code at a time, from
// the packing's byte order (W4: byte 2o + k%2 of word k/4, low nibble for k%4 < 2; W8: byte 2o +
// k%2 of pair k/2). Blocks are small enough to stay in L1 while their rows are written.
template <bool W4, typename Out>
void nmajor_block_plain(const uint8_t* block, const float* scale, const float* zs, int64_t group, int64_t K, Out* out,
                        int64_t n0, int64_t rows) {
  for (int64_t j = 0; j < rows; ++j) {
    Out* o = out + (n0 + j) * K;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = (k / group) * 16 + j;
      if constexpr (W4) {
        const uint8_t byte = block[(k / 4) * 32 + 2 * j + k % 2];
        const float u = static_cast<float>(k % 4 < 2 ? byte & 15 : byte >> 4);
        store(o, k, scale[g] * u - zs[g]);
      } else {
        store(o, k, scale[g] * static_cast<float>(static_cast<int8_t>(block[((k / 2) * 16 + j) * 2 + k % 2])));
      }
    }
  }
}

void check_scales(const torch::Tensor& scale, int64_t N, int64_t K, int64_t group) {
  TORCH_CHECK(group > 0, "group_size must be positive");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == (K + group - 1) / group &&
                  scale.scalar_type() == torch::kFloat && scale.is_contiguous(),
              "scale must be (N, ceil(K / group_size)) fp32, contiguous");
}

}  // namespace

void dequant_w4_rows(const uint8_t* w, const float* scale, const float* zs, float* out, int64_t n0, int64_t n1,
                     int64_t K, int64_t G, int64_t group, bool flip) {
  const int64_t bytes = (K + 31) / 32 * 16;
  const uint8_t* wn = w + n0 * bytes;
  const float *sn = scale + n0 * G, *zn = zs + n0 * G;
  if (K % 32 == 0 && (group % 32 == 0 || group >= K))
    use_avx512() ? w4_vector<false>(wn, sn, zn, out, 0, n1 - n0, K, G, group, flip)
                 : w4_vector_avx2(wn, sn, zn, out, 0, n1 - n0, K, G, group, flip);
  else if (use_avx512())
    w4_avx512(wn, sn, zn, out, 0, n1 - n0, K, G, group, flip);
  else
    w4_avx2(wn, sn, zn, out, 0, n1 - n0, K, G, group, flip);
}

void dequant_w8_rows(const int8_t* w, const float* scale, float* out, int64_t n0, int64_t n1, int64_t K, int64_t G,
                     int64_t group) {
  if (!use_avx512() && K % 8 == 0 && (group % 8 == 0 || group >= K))
    w8_vector_avx2(w + n0 * K, scale + n0 * G, out, 0, n1 - n0, K, G, group);
  else if (use_avx512())
    w8_avx512(w + n0 * K, scale + n0 * G, out, 0, n1 - n0, K, G, group);
  else
    w8_avx2(w + n0 * K, scale + n0 * G, out, 0, n1 - n0, K, G, group);
}

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
    } else if (!wide && K % 32 == 0 && (group_size % 32 == 0 || group_size >= K)) {
      w4_vector_avx2(wp, sp, zp, out.data_ptr<float>(), n0, n1, K, G, group_size, flip);
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
    } else if (!wide && K % 8 == 0 && (group_size % 8 == 0 || group_size >= K)) {
      w8_vector_avx2(wp, sp, out.data_ptr<float>(), n0, n1, K, G, group_size);
    } else {
      auto* o = out.data_ptr<float>();
      wide ? w8_avx512(wp, sp, o, n0, n1, K, G, group_size) : w8_avx2(wp, sp, o, n0, n1, K, G, group_size);
    }
  });
  return out;
}

torch::Tensor dequantize_nmajor(torch::Tensor packed, torch::Tensor scale, c10::optional<torch::Tensor> zs, int64_t N,
                                int64_t K, int64_t group_size, bool bf16, c10::optional<torch::Tensor> out_) {
  const bool w4 = zs.has_value();
  const int64_t Kp = (K + 3) / 4 * 4, blocks = (N + 15) / 16, G = scale.dim() == 3 ? scale.size(1) : 0;
  TORCH_CHECK(packed.is_contiguous() && packed.size(0) == blocks &&
                  (w4 ? packed.dim() == 3 && packed.scalar_type() == torch::kByte && packed.size(1) == Kp / 4
                      : packed.dim() == 4 && packed.scalar_type() == torch::kChar && packed.size(1) == Kp / 2),
              "packed must be tuili's N-major packing of an (N, K) weight (W4 with zs, W8 without)");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.dim() == 3 &&
                  scale.size(0) == blocks && scale.size(2) == 16 && G == (K + group_size - 1) / group_size,
              "scale must be (N/16, G, 16) fp32");
  TORCH_CHECK(group_size % 16 == 0 || G == 1, "group_size must be a multiple of 16 or the whole row");
  TORCH_CHECK(!w4 || (zs->sizes() == scale.sizes() && zs->scalar_type() == torch::kFloat && zs->is_contiguous()),
              "zs must be like scale");
  auto out = output(out_, N, K, bf16);
  const uint8_t* wp = static_cast<const uint8_t*>(packed.data_ptr());
  const float *sp = scale.data_ptr<float>(), *zp = w4 ? zs->data_ptr<float>() : nullptr;
  const int64_t words = w4 ? Kp / 4 : Kp / 2, block_bytes = words * 32;
  void* o = out.data_ptr();
  const bool vector = use_avx512() && use_bf16_convert();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min<int64_t>(16, N - 16 * b);
      const uint8_t* block = wp + b * block_bytes;
      const float *s = sp + b * G * 16, *z = w4 ? zp + b * G * 16 : nullptr;
      if (!vector) {
        auto* f = static_cast<float*>(o);
        auto* h = static_cast<at::BFloat16*>(o);
        if (w4)
          bf16 ? nmajor_block_plain<true>(block, s, z, group_size, K, h, 16 * b, rows)
               : nmajor_block_plain<true>(block, s, z, group_size, K, f, 16 * b, rows);
        else
          bf16 ? nmajor_block_plain<false>(block, s, z, group_size, K, h, 16 * b, rows)
               : nmajor_block_plain<false>(block, s, z, group_size, K, f, 16 * b, rows);
      } else if (w4)
        bf16 ? nmajor_block<true, true>(block, s, z, G, group_size, words, K, o, 16 * b, rows)
             : nmajor_block<false, true>(block, s, z, G, group_size, words, K, o, 16 * b, rows);
      else
        bf16 ? nmajor_block<true, false>(block, s, z, G, group_size, words, K, o, 16 * b, rows)
             : nmajor_block<false, false>(block, s, z, G, group_size, words, K, o, 16 * b, rows);
    }
  });
  return out;
}

}  // namespace tuili
