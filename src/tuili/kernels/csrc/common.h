// Shared by tuili's kernels: CPU feature checks, horizontal sums, threading over output rows.
#pragma once
// torch/types.h, not torch/extension.h: the kernels need tensors, not pybind11, and the lighter
// header parses in a third of the time (18 against 50 s a file on a 2-core build machine).
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

namespace tuili {

// TUILI_ISA=avx2 takes the AVX2 paths on an AVX-512 machine (tests cover both on one CPU).
inline bool forced_avx2() {
  const char* isa = std::getenv("TUILI_ISA");
  return isa != nullptr && std::string(isa) == "avx2";
}

inline bool use_avx512() {
  static const bool yes = !forced_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

inline bool use_vnni() {
  static const bool yes = use_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

// How weight streams are prefetched, read once a step, 4 KiB ahead: non-temporally (NTA) on AMD,
// where weights fetched for keeps push the KV cache and activations out of L3 (Zen 5: W8A16 decode
// +8%, fp32 +20%); into L2 (T1) elsewhere. On an Intel Xeon (Sapphire Rapids class) NTA held the
// N-major W8 kernel at 12 GB/s at one row; into L1 (T0), each prefetch holds one of the core's few
// L1 fill buffers for a whole memory latency, which starved the W4 kernel (two prefetches a line):
// 16 layers of 16384 × 2048 from memory, one row, W4 g128 10.0 GB/s with T0, 19.6-20.0 with T1;
// W4 g32 16.6 → 22.3; N-major W8 20.1 → 21.2; in L3 unchanged or faster (W8 45 → 51).
inline const bool kStreamNta = [] {
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
}();

inline void prefetch_stream(const void* p) {
  if (kStreamNta)
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA);
  else
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

__attribute__((target("avx512f"))) inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2"))) inline int32_t hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

constexpr int MB = 4;  // activation rows that share one pass over a weight row

// Output rows n over torch's threads; for each, activations in blocks of MB rows. The weight row
// stays in L1 while every block of activations meets it, so weights are read from memory once.
template <typename RowFn>
void for_rows(int64_t M, int64_t N, RowFn fn) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; m += MB) fn(m, std::min<int64_t>(MB, M - m), n);
  });
}

// Calls body(std::integral_constant<int, R>) with R = rows (1..Max) as a compile-time constant.
template <int Max = MB, int R = 1, typename Body>
inline void with_rows(int64_t rows, Body&& body) {
  if constexpr (R >= Max) {
    body(std::integral_constant<int, Max>{});
  } else {
    if (rows == R) return body(std::integral_constant<int, R>{});
    with_rows<Max, R + 1>(rows, std::forward<Body>(body));
  }
}

// bf16 <-> fp32 and element access for kernels templated on the storage type.
inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does (NaN kept NaN)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) { return bf16_to_float(reinterpret_cast<const uint16_t*>(p)[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(at::BFloat16* p, int64_t i, float v) { reinterpret_cast<uint16_t*>(p)[i] = float_to_bf16(v); }
inline float round_to(const float*, float v) { return v; }
inline float round_to(const at::BFloat16*, float v) { return bf16_to_float(float_to_bf16(v)); }

// e^x (Cephes' expf polynomial after x = n·ln2 + r), branch-free so loops vectorize; x is clamped
// to [-87, 88], where e^x is a normal float.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// fp32 or bf16 activations (M, K), contiguous, in their own dtype.
inline torch::Tensor as_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "x must be (M, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  return x.contiguous();
}

// fp32 activations from fp32 or bf16 input, contiguous.
inline torch::Tensor as_float(const torch::Tensor& x) { return as_rows(x).to(torch::kFloat); }

// body(x's data, y's data) typed by x's dtype (fp32 or bf16), which y shares.
template <typename Body>
void with_dtype(const torch::Tensor& x, const torch::Tensor& y, Body&& body) {
  if (x.scalar_type() == torch::kBFloat16)
    body(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  else
    body(x.data_ptr<float>(), y.data_ptr<float>());
}

// The lanes of a 16-wide step with `left` values left: all 16, or the first `left`.
inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// 16 values (masked) as fp32 to and from either dtype, so that a kernel reads and writes the
// activations' own dtype instead of converting whole tensors around each call (at 16 rows of a 1B
// model, ~4 ms of a 60 ms decode step). bf16 widens exactly and narrows to nearest even, NaN to
// NaN: what torch's conversion of the fp32 result gives.
#define TUILI_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
TUILI_AVX512 inline __m512 load16(const float* x, __mmask16 m = 0xFFFF) { return _mm512_maskz_loadu_ps(m, x); }
TUILI_AVX512 inline __m512 load16(const at::BFloat16* x, __mmask16 m = 0xFFFF) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x)), 16));
}
// The bf16 bits of 16 fp32 lanes, in each lane's low half: nearest even, NaN as 0x7FC0.
TUILI_AVX512 inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
TUILI_AVX512 inline void store16(float* y, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(y, m, v); }
TUILI_AVX512 inline void store16(at::BFloat16* y, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(y, m, _mm512_cvtepi32_epi16(bf16_bits(v)));
}

// exp_approx on 16 lanes (the same Cephes polynomial), which the compiler leaves scalar.
TUILI_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

}  // namespace tuili
