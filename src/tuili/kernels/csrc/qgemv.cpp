// Weight-only quantized GEMV / small GEMM for CPUs: y (M, N) = x (M, K) · dequant(W)ᵀ, M from 1 to ~16.
//
// Decoding reads every weight once, so speed is memory bandwidth / weight bytes: these kernels
// stream 4-bit or 8-bit codes and dequantize them in registers, never writing a float weight.
//
// W4 layout (tuili.quant.primitives.pack_int4): per row, chunks of 32 codes in 16 bytes; byte j of
// a chunk holds code j in its low nibble and code j + 16 in its high nibble (llama.cpp's order),
// so the two nibble halves meet 16 contiguous activations each. Codes are unsigned (0..15);
// `flip` turns two's-complement signed nibbles into that form (u = s ^ 8, zero 8).
// W8 layout: int8 codes (N, K), symmetric.
// Per group g of a row: y += scale[g] · Σ_k u_k x_k − zs[g] · Σ_k x_k, with zs = scale · zero.
#include "common.h"

namespace tuili {
namespace {

// The codes past the last full SIMD chunk (K % 32 for W4, K % 16 for W8), shared by both ISAs.
// W4 subtracts from the correction term (y = Σ − corr), W8 adds to its tail sum.
template <int R>
inline void w4_tail(const float* x, int64_t K, const uint8_t* w, const float* scale, int64_t group_size,
                    bool flip, int64_t k0, float* corr) {
  for (int64_t k = k0; k < K; ++k) {
    const int64_t c = k / 32, j = k % 32;
    const uint8_t byte = w[c * 16 + (j % 16)] ^ (flip ? 0x88 : 0);
    const float u = (j < 16) ? (byte & 0xF) : (byte >> 4);
    const float s = scale[k / group_size];
    for (int r = 0; r < R; ++r) corr[r] -= s * u * x[r * K + k];
  }
}

template <int R>
inline void w8_tail(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t group_size,
                    int64_t k0, float* tail) {
  for (int64_t k = k0; k < K; ++k)
    for (int r = 0; r < R; ++r) tail[r] += scale[k / group_size] * w[k] * x[r * K + k];
}

// ---------------------------------------------------------------- AVX-512 -------------------
// Enough independent accumulators that FMA latency (4 cycles) never stalls a row: A per
// activation row, more when there are fewer rows.
template <int R> constexpr int chains() { return R == 1 ? 4 : (R == 2 ? 2 : 1); }

#define TUILI_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline

// 32 codes (chunk c) against R activation rows: low nibbles into acc[·][I], high into acc[·][J].
template <int R, int A, int I, int J>
TUILI_AVX512 void w4_chunk(const float* x, int64_t K, const uint8_t* w, int64_t c, __m512 table, __m512 (&acc)[R][A]) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + c * 16)));
  const __m512 lo = _mm512_permutexvar_ps(v, table);  // uses the index's low 4 bits
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * K + c * 32;
    acc[r][I] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[r][I]);
    acc[r][J] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[r][J]);
  }
}

// 16 int8 codes (chunk c) times their group's scale s, into acc[·][I].
template <int R, int A, int I>
TUILI_AVX512 void w8_chunk(const float* x, int64_t K, const int8_t* w, int64_t c, __m512 s, __m512 (&acc)[R][A]) {
  const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + c * 16)));
  const __m512 wf = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
  for (int r = 0; r < R; ++r) acc[r][I] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + r * K + c * 16), acc[r][I]);
}

// 16 fp32 weights from column k into acc[·][I].
template <int R, int A, int I>
TUILI_AVX512 void f32_step(const float* x, int64_t K, const float* w, int64_t k, __m512 (&acc)[R][A]) {
  const __m512 wv = _mm512_loadu_ps(w + k);
  for (int r = 0; r < R; ++r) acc[r][I] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k), acc[r][I]);
}

// W4: each group's 16 possible weights s·u − zs are one register; vpermps looks a nibble up in it,
// so a code becomes its dequantized float in one instruction (no mask, no int→float convert, no
// zero-point pass), and every FMA goes straight into a running sum.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void w4_rows_avx512(const float* x, int64_t K, const uint8_t* w, const float* scale, const float* zs,
                    int64_t G, int64_t group_size, bool flip, float* y, int64_t N, int64_t n) {
  constexpr int A = chains<R>();
  const __m512 codes = flip ? _mm512_setr_ps(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
                            : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t chunks = K / 32;
  __m512 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
  float tail[R] = {};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * group_size / 32;
    const int64_t c1 = std::min<int64_t>(chunks, (g + 1) * group_size / 32);
    const __m512 table = _mm512_fmsub_ps(codes, _mm512_set1_ps(scale[g]), _mm512_set1_ps(zs[g]));
    // Accumulator indices are compile-time constants (a runtime index would spill them to memory).
    int64_t c = c0;
    for (; c + 1 < c1; c += 2) {
      w4_chunk<R, A, 0, 1 % A>(x, K, w, c, table, acc);
      w4_chunk<R, A, 2 % A, 3 % A>(x, K, w, c + 1, table, acc);
    }
    if (c < c1) w4_chunk<R, A, 0, 1 % A>(x, K, w, c, table, acc);
  }
  for (int64_t k = chunks * 32; k < K; ++k) {  // codes past the last full chunk
    const int64_t j = k % 32;
    const uint8_t byte = w[chunks * 16 + (j % 16)] ^ (flip ? 0x88 : 0);
    const float u = (j < 16) ? (byte & 0xF) : (byte >> 4);
    const int64_t g = k / group_size;
    for (int r = 0; r < R; ++r) tail[r] += (scale[g] * u - zs[g]) * x[r * K + k];
  }
  for (int r = 0; r < R; ++r) {
    __m512 sum = acc[r][0];
    for (int i = 1; i < A; ++i) sum = _mm512_add_ps(sum, acc[r][i]);
    y[r * N + n] = hsum512(sum) + tail[r];
  }
}

// W8: each chunk's codes are converted and multiplied by their group's scale, then go straight into
// one of A running sums that span the whole row. Summing a group first and scaling the sum made a
// chain of one FMA per group through a single total: at groups of 32 (two chunks) that chain, not
// memory, set the pace (about 10 GB/s on the Xeon measured, where W4 streamed twice as fast).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void w8_rows_avx512(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t G,
                    int64_t group_size, float* y, int64_t N, int64_t n) {
  constexpr int A = chains<R>();
  const int64_t chunks = K / 16, per_group = group_size / 16;  // group_size: a multiple of 16 here
  __m512 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
  float tail[R] = {};
  int64_t g = 0, group_end = per_group;  // chunk c is in group g while c < group_end
  auto scale_of = [&](int64_t c) {  // a plain float: the lambda is not compiled for AVX-512
    while (c >= group_end) {
      ++g;
      group_end += per_group;
    }
    return scale[g];
  };
  int64_t c = 0;
  for (; c + 3 < chunks; c += 4) {
    w8_chunk<R, A, 0>(x, K, w, c, _mm512_set1_ps(scale_of(c)), acc);
    w8_chunk<R, A, 1 % A>(x, K, w, c + 1, _mm512_set1_ps(scale_of(c + 1)), acc);
    w8_chunk<R, A, 2 % A>(x, K, w, c + 2, _mm512_set1_ps(scale_of(c + 2)), acc);
    w8_chunk<R, A, 3 % A>(x, K, w, c + 3, _mm512_set1_ps(scale_of(c + 3)), acc);
  }
  for (; c < chunks; ++c) w8_chunk<R, A, 0>(x, K, w, c, _mm512_set1_ps(scale_of(c)), acc);
  (void)G;
  w8_tail<R>(x, K, w, scale, group_size, chunks * 16, tail);
  for (int r = 0; r < R; ++r) {
    __m512 sum = acc[r][0];
    for (int i = 1; i < A; ++i) sum = _mm512_add_ps(sum, acc[r][i]);
    y[r * N + n] = hsum512(sum) + tail[r];
  }
}

// fp32 weights: a plain dot product per output, four accumulators per row so that streaming the
// weights, not FMA latency, sets the pace (PyTorch's sgemv reaches about 40% of the bandwidth at M=1).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void f32_rows_avx512(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t n) {
  constexpr int A = chains<R>();
  __m512 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
  const int64_t K16 = K / 16 * 16;
  int64_t k = 0;
  for (; k + 63 < K16; k += 64) {
    // 4 KiB ahead, each weight read once a step (common.h, prefetch_stream): fp32 decode +17% on
    // Zen 5 in an in-process A/B against no software prefetch
    for (int l = 0; l < 4; ++l) prefetch_stream(reinterpret_cast<const char*>(w + k + 1024) + 64 * l);
    f32_step<R, A, 0>(x, K, w, k, acc);
    f32_step<R, A, 1 % A>(x, K, w, k + 16, acc);
    f32_step<R, A, 2 % A>(x, K, w, k + 32, acc);
    f32_step<R, A, 3 % A>(x, K, w, k + 48, acc);
  }
  for (; k < K16; k += 16) f32_step<R, A, 0>(x, K, w, k, acc);
  for (int r = 0; r < R; ++r) {
    __m512 sum = acc[r][0];
    for (int i = 1; i < A; ++i) sum = _mm512_add_ps(sum, acc[r][i]);
    float t = hsum512(sum);
    for (int64_t k = K16; k < K; ++k) t += w[k] * x[r * K + k];
    y[r * N + n] = t;
  }
}

// ---------------------------------------------------------------- AVX2 ----------------------
template <int R>
__attribute__((target("avx2,fma")))
void w4_rows_avx2(const float* x, int64_t K, const uint8_t* w, const float* scale, const float* zs,
                  const float* xsum, int64_t G, int64_t group_size, bool flip, float* y, int64_t N,
                  int64_t n) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m128i flipper = _mm_set1_epi8(flip ? (char)0x88 : 0);
  const int64_t chunks = K / 32;
  __m256 total[R];
  float corr[R];
  for (int r = 0; r < R; ++r) { total[r] = _mm256_setzero_ps(); corr[r] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * group_size / 32;
    const int64_t c1 = std::min<int64_t>(chunks, (g + 1) * group_size / 32);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(w + c * 16)), flipper);
      for (int half = 0; half < 2; ++half) {  // bytes 0..7, then 8..15
        __m256i v = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(b, 8) : b);
        __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        for (int r = 0; r < R; ++r) {
          const float* xr = x + r * K + c * 32 + half * 8;
          acc[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), acc[r]);
          acc[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr + 16), acc[r]);
        }
      }
    }
    const __m256 s = _mm256_set1_ps(scale[g]);
    for (int r = 0; r < R; ++r) {
      total[r] = _mm256_fmadd_ps(acc[r], s, total[r]);
      corr[r] += zs[g] * xsum[r * G + g];
    }
  }
  w4_tail<R>(x, K, w, scale, group_size, flip, chunks * 32, corr);
  for (int r = 0; r < R; ++r) y[r * N + n] = hsum256(total[r]) - corr[r];
}

template <int R>
__attribute__((target("avx2,fma")))
void w8_rows_avx2(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t G,
                  int64_t group_size, float* y, int64_t N, int64_t n) {
  const int64_t chunks = K / 16;
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  float tail[R] = {};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * group_size / 16;
    const int64_t c1 = std::min<int64_t>(chunks, (g + 1) * group_size / 16);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      __m128i b = _mm_loadu_si128((const __m128i*)(w + c * 16));
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * K + c * 16;
        acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r]);
        acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r]);
      }
    }
    const __m256 s = _mm256_set1_ps(scale[g]);
    for (int r = 0; r < R; ++r) total[r] = _mm256_fmadd_ps(acc[r], s, total[r]);
  }
  w8_tail<R>(x, K, w, scale, group_size, chunks * 16, tail);
  for (int r = 0; r < R; ++r) y[r * N + n] = hsum256(total[r]) + tail[r];
}

void check(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, int64_t group_size) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be 2-D contiguous");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.size(0) == w.size(0),
              "scale must be (N, G) fp32 contiguous");
  TORCH_CHECK(group_size % 32 == 0 || group_size >= x.size(1), "group_size must be a multiple of 32 or the row");
}

}  // namespace

torch::Tensor w4_linear(torch::Tensor x_in, torch::Tensor w, torch::Tensor scale, torch::Tensor zs,
                        int64_t group_size, bool flip) {
  const torch::Tensor x = as_float(x_in);
  check(x, w, scale, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.size(1) == (K + 31) / 32 * 16, "w must be (N, ceil(K/32)*16) uint8");
  TORCH_CHECK(zs.sizes() == scale.sizes() && zs.scalar_type() == torch::kFloat && zs.is_contiguous(), "zs like scale");
  auto y = torch::empty({M, N}, x.options());
  const bool wide = use_avx512();
  auto xsum = torch::zeros({wide ? 0 : M, G}, x.options());  // AVX2: Σ_k x per group, the zero-point term
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>(), *zp = zs.data_ptr<float>();
  float* xs = xsum.data_ptr<float>();
  if (!wide)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xs[m * G + k / group_size] += xp[m * K + k];
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = w.size(1);
  for_rows(M, N, [&](int64_t m, int64_t rows, int64_t n) {
    const float* xm = xp + m * K;
    const uint8_t* wn = wp + n * row_bytes;
    const float *sn = sp + n * G, *zn = zp + n * G, *xsm = xs + m * G;
    float* ym = yp + m * N;
    with_rows(rows, [&](auto R) {
      if (wide) w4_rows_avx512<decltype(R)::value>(xm, K, wn, sn, zn, G, group_size, flip, ym, N, n);
      else w4_rows_avx2<decltype(R)::value>(xm, K, wn, sn, zn, xsm, G, group_size, flip, ym, N, n);
    });
  });
  return y.to(x_in.scalar_type());
}

torch::Tensor w8_linear(torch::Tensor x_in, torch::Tensor w, torch::Tensor scale, int64_t group_size) {
  const torch::Tensor x = as_float(x_in);
  check(x, w, scale, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = scale.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kChar && w.size(1) == K, "w must be (N, K) int8");
  auto y = torch::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const bool wide = use_avx512();
  const int64_t gs = std::min<int64_t>(group_size, ((K + 15) / 16) * 16);
  for_rows(M, N, [&](int64_t m, int64_t rows, int64_t n) {
    const float* xm = xp + m * K;
    const int8_t* wn = wp + n * K;
    const float* sn = sp + n * G;
    float* ym = yp + m * N;
    with_rows(rows, [&](auto R) {
      if (wide) w8_rows_avx512<decltype(R)::value>(xm, K, wn, sn, G, gs, ym, N, n);
      else w8_rows_avx2<decltype(R)::value>(xm, K, wn, sn, G, gs, ym, N, n);
    });
  });
  return y.to(x_in.scalar_type());
}

// fp32 GEMV / small GEMM: y (M, N) = x (M, K) · Wᵀ (+ b). AVX-512 only (None elsewhere: PyTorch).
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(use_avx512(), "f32_linear needs AVX-512");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && w.dim() == 2 &&
              w.is_contiguous() && w.size(1) == x.size(1), "f32_linear takes fp32 x (M, K) and contiguous W (N, K)");
  const torch::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float *xp = xc.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(M, N, [&](int64_t m, int64_t rows, int64_t n) {
    with_rows(rows, [&](auto R) { f32_rows_avx512<decltype(R)::value>(xp + m * K, K, wp + n * K, yp + m * N, N, n); });
  });
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// A float layer as tuili.kernels.ops.linear runs it: f32_linear for 1 to gemv_rows fp32 rows on AVX-512, PyTorch's
// linear (oneDNN / BLAS) otherwise.
torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t gemv_rows) {
  const int64_t rows = x.dim() == 2 ? x.size(0) : 0;
  if (rows > 0 && rows <= gemv_rows && use_avx512() && x.scalar_type() == torch::kFloat &&
      w.scalar_type() == torch::kFloat && w.is_contiguous())
    return f32_linear(x, w, bias);
  return at::linear(x, w, bias);
}

}  // namespace tuili
