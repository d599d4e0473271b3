// Weight-only W4A16 / W8A16 for 1 to 64 rows with bf16 dot products (AVX512-BF16, vdpbf16ps).
//
// qgemv.cpp's kernels multiply in fp32 and meet each weight row with four activation rows, so at
// 16 rows they are bound by fp32 FMAs (and by a horizontal sum per output). Here the weights are
// repacked once, N-major, into blocks of 16 output rows: one register holds 16 outputs × 2
// consecutive k as bf16 pairs, so one vdpbf16ps adds 2 products to each of 16 outputs for one
// activation row (its 2 values broadcast). No horizontal sums, each weight is dequantized once per
// call for all rows, and a dot product does twice an FMA's work.
//
// Codes are small integers, exact in bf16; activations are rounded to bf16 (the "A16"); products
// are exact and accumulate in fp32. Per group g and output n:
//   y = scale[g] · Σ_k u_k x̂_k − zs[g] · Σ_k x̂_k        (x̂ = bf16(x); zs = scale · zero, W4 only)
//
// Packed W4: (Np/16, Kp/4, 32) uint8, Kp = K rounded up to 4. Byte j of the 32 bytes at (b, d) holds
// the code of 32-bit-pair word j of pair 2d in its low nibble and of pair 2d + 1 in its high
// nibble, word j being output 16b + j/2 at k = 2p + j%2. One 32-byte load and two vpermw (whose
// index uses 5 bits: a 32-entry table repeating 0..15 ignores the other nibble's low bit) give
// two registers of bf16 codes.
// Packed W8: (Np/16, Kp/2, 16, 2) int8: pair p of outputs 16b..16b+15, k = 2p and 2p + 1.
// Scales and zs: (Np/16, G, 16) fp32, the 16 outputs of a block side by side.
#include "common.h"

namespace tuili {

bool use_bf16() {
  static const bool yes = use_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

namespace {

#define TUILI_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Chains of accumulators per row so that vdpbf16ps latency never stalls a lone row.
template <int MR> constexpr int bf16_chains() { return MR == 1 ? 8 : (MR == 2 ? 4 : (MR <= 6 ? 2 : 1)); }

// 32 int8 codes → 32 bf16 (exact); words 0..15 from q[0..15].
TUILI_BF16 inline __m512i int8_to_bf16(const int8_t* q) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16))));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// The two registers of bf16 codes of double pair d (pairs 2d and 2d + 1).
template <bool W4>
TUILI_BF16 inline void codes_of(const uint8_t* block, int64_t d, __m512i table, __m512i& w0, __m512i& w1) {
  if constexpr (W4) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(block + d * 32)));
    w0 = _mm512_permutexvar_epi16(v, table);
    w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
  } else {
    const int8_t* p = reinterpret_cast<const int8_t*>(block) + d * 64;
    w0 = int8_to_bf16(p);
    w1 = int8_to_bf16(p + 32);
  }
}

// acc += w · (x's bf16 pair broadcast to every lane), the broadcast folded into the instruction's
// memory operand ({1to16}); GCC emits a separate vpbroadcastd for the intrinsic form, one more
// instruction per dot product.
TUILI_BF16 inline __m512 dot_pair(__m512 acc, __m512i w, const uint32_t* x) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
  return acc;
}

template <int MR, int A, int I, int J>
TUILI_BF16 inline void dots(const uint32_t* xp, int64_t Kp2, int64_t p, __m512i w0, __m512i w1, __m512 (&acc)[MR][A]) {
  for (int m = 0; m < MR; ++m) {
    const uint32_t* xm = xp + m * Kp2;
    acc[m][I] = dot_pair(acc[m][I], w0, xm + p);
    acc[m][J] = dot_pair(acc[m][J], w1, xm + p + 1);
  }
}

// MR rows × one block of 16 outputs. xp: the rows' bf16 pairs (MR, Kp/2) as 32-bit words;
// xsum (MR, G) per-group sums of x̂ (W4's zero-point term).
template <bool W4, int MR>
TUILI_BF16 void block_rows(const uint32_t* xp, int64_t Kp2, const float* xsum, const uint8_t* block,
                           const float* scale, const float* zs, int64_t G, int64_t group_pairs,
                           const uint16_t* codes, float* y, int64_t N, int64_t n0) {
  const __m512i table = _mm512_loadu_si512(codes);  // bf16(0..15), twice (W4)
  constexpr int A = bf16_chains<MR>();
  constexpr int U = A >= 2 ? A / 2 : 1;  // double pairs per unrolled step
  __m512 total[MR];
  for (int m = 0; m < MR; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t d0 = g * group_pairs / 2, d1 = std::min<int64_t>(Kp2, (g + 1) * group_pairs) / 2;
    __m512 acc[MR][A];
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t d = d0;
    __m512i w0, w1;
    for (; d + U <= d1; d += U) {
      codes_of<W4>(block, d, table, w0, w1);
      dots<MR, A, 0, 1 % A>(xp, Kp2, 2 * d, w0, w1, acc);
      if constexpr (U >= 2) {
        codes_of<W4>(block, d + 1, table, w0, w1);
        dots<MR, A, 2 % A, 3 % A>(xp, Kp2, 2 * d + 2, w0, w1, acc);
      }
      if constexpr (U >= 4) {
        codes_of<W4>(block, d + 2, table, w0, w1);
        dots<MR, A, 4 % A, 5 % A>(xp, Kp2, 2 * d + 4, w0, w1, acc);
        codes_of<W4>(block, d + 3, table, w0, w1);
        dots<MR, A, 6 % A, 7 % A>(xp, Kp2, 2 * d + 6, w0, w1, acc);
      }
    }
    for (; d < d1; ++d) {
      codes_of<W4>(block, d, table, w0, w1);
      dots<MR, A, 0, 1 % A>(xp, Kp2, 2 * d, w0, w1, acc);
    }
    const __m512 s = _mm512_loadu_ps(scale + g * 16);
    for (int m = 0; m < MR; ++m) {
      __m512 sum = acc[m][0];
      for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
      total[m] = _mm512_fmadd_ps(sum, s, total[m]);
    }
    if constexpr (W4) {
      const __m512 z = _mm512_loadu_ps(zs + g * 16);
      for (int m = 0; m < MR; ++m) total[m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[m * G + g]), total[m]);
    }
  }
  const __mmask16 mask = N - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (N - n0)) - 1);
  for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * N + n0, mask, total[m]);
}

// x (M, K) fp32 → bf16 pairs (M, Kp) padded with zeros, and the per-group sums of the rounded values.
TUILI_BF16 void round_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t group_size, int64_t G,
                           uint16_t* xb, float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    uint16_t* bm = xb + m * Kp;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k1 = std::min<int64_t>(K, (g + 1) * group_size);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = g * group_size; k < k1; k += 16) {
        const __mmask16 mask = k1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k1 - k)) - 1);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, xm + k));
        _mm256_mask_storeu_epi16(bm + k, mask, h);
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      if (xsum) xsum[m * G + g] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t k = K; k < Kp; ++k) bm[k] = 0;
  }
}

template <bool W4>
torch::Tensor linear_bf16(const torch::Tensor& x_in, const torch::Tensor& packed, const torch::Tensor& scale,
                          const torch::Tensor* zs, int64_t N, int64_t group_size) {
  TORCH_CHECK(use_bf16(), "the bf16 weight-only kernels need AVX512-BF16");
  const torch::Tensor x = as_float(x_in);
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 3) / 4 * 4, blocks = (N + 15) / 16;
  const int64_t G = scale.dim() == 3 ? scale.size(1) : 0;
  TORCH_CHECK(packed.is_contiguous() && packed.size(0) == blocks &&
                  (W4 ? packed.dim() == 3 && packed.scalar_type() == torch::kByte && packed.size(1) == Kp / 4
                      : packed.dim() == 4 && packed.scalar_type() == torch::kChar && packed.size(1) == Kp / 2),
              "packed weights must come from tuili's bf16 packing of an (N, K) weight with N = ", N, ", K = ", K);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.dim() == 3 &&
                  scale.size(0) == blocks && scale.size(2) == 16, "scale must be (N/16, G, 16) fp32");
  TORCH_CHECK(group_size > 0 && (G == (K + group_size - 1) / group_size) && (group_size % 4 == 0 || G == 1),
              "group_size must be a multiple of 4 (or the whole row) and match scale's groups");
  if (zs) TORCH_CHECK(zs->sizes() == scale.sizes() && zs->scalar_type() == torch::kFloat && zs->is_contiguous(), "zs like scale");
  auto xb = torch::empty({M, Kp}, torch::kBFloat16);
  std::vector<float> xsum(W4 ? M * G : 0);
  uint16_t* xbp = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
  round_rows(x.data_ptr<float>(), M, K, Kp, G == 1 ? K : group_size, G, xbp, W4 ? xsum.data() : nullptr);
  auto y = torch::empty({M, N}, torch::kFloat);
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xbp);
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  const float *sp = scale.data_ptr<float>(), *zp = zs ? zs->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t Kp2 = Kp / 2, group_pairs = G == 1 ? Kp2 : group_size / 2, block_bytes = Kp * 16 / (W4 ? 2 : 1);
  alignas(64) static const uint16_t codes[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                                 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
                                                 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                                 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* block = wp + b * block_bytes;
      const float *sb = sp + b * G * 16, *zb = zp ? zp + b * G * 16 : nullptr;
      for (int64_t m = 0; m < M; m += 16) {
        const int64_t rows = std::min<int64_t>(16, M - m);
        const uint32_t* xm = xp + m * Kp2;
        const float* xs = W4 ? xsum.data() + m * G : nullptr;
        float* ym = yp + m * N;
#define TUILI_ROWS(R) \
  case R: block_rows<W4, R>(xm, Kp2, xs, block, sb, zb, G, group_pairs, codes, ym, N, b * 16); break;
        switch (rows) {
          TUILI_ROWS(1) TUILI_ROWS(2) TUILI_ROWS(3) TUILI_ROWS(4) TUILI_ROWS(5) TUILI_ROWS(6) TUILI_ROWS(7)
          TUILI_ROWS(8) TUILI_ROWS(9) TUILI_ROWS(10) TUILI_ROWS(11) TUILI_ROWS(12) TUILI_ROWS(13) TUILI_ROWS(14)
          TUILI_ROWS(15) default: block_rows<W4, 16>(xm, Kp2, xs, block, sb, zb, G, group_pairs, codes, ym, N, b * 16);
        }
#undef TUILI_ROWS
      }
    }
  });
  return y.to(x_in.scalar_type());
}

}  // namespace

torch::Tensor w4_linear_bf16(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zs, int64_t N,
                             int64_t group_size) {
  return linear_bf16<true>(x, packed, scale, &zs, N, group_size);
}

torch::Tensor w8_linear_bf16(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t N,
                             int64_t group_size) {
  return linear_bf16<false>(x, packed, scale, nullptr, N, group_size);
}

}  // namespace tuili
