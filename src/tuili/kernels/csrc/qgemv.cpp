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
#include "ops.h"

namespace tuili {
namespace {

// The W8 codes past the last full SIMD chunk (K % 16), added to the row's tail sum.
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
// 1 to 3 activation rows against NB output rows at once, codes decoded in registers (scale folded in:
// W8 s·q, W4 s·u − zs): NB independent sums a row, so FMA latency never stalls a lone row (one chain
// held the W8 GEMV to 8 GB/s on a Zen 3 at one row), and each decoded vector feeds R FMAs.
template <int R, int NB>
__attribute__((target("avx2,fma"))) void w8_tile_avx2(const float* x, int64_t K, const int8_t* w, const float* scale,
                                                    int64_t G, int64_t group, float* y, int64_t N, int64_t n) {
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t g = 0; g * group < K8; ++g) {
    __m256 s[NB];
    for (int j = 0; j < NB; ++j) s[j] = _mm256_broadcast_ss(scale + (n + j) * G + g);
    const int64_t k1 = std::min(K8, (g + 1) * group);
    for (int64_t k = g * group; k < k1; k += 8) {
      __m256 wv[NB];
      if (k % 64 == 0)
        for (int j = 0; j < NB; ++j) prefetch_stream(w + (n + j + NB) * K + k);  // the next tile's rows
      for (int j = 0; j < NB; ++j) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (n + j) * K + k));
        wv[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s[j]);
      }
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * K + k);
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(wv[j], xv, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      float tail = 0.f;
      for (int64_t k = K8; k < K; ++k) tail += scale[(n + j) * G + k / group] * w[(n + j) * K + k] * x[r * K + k];
      y[r * N + n + j] = hsum256(acc[r][j]) + tail;
    }
}

// W4: each 32-code chunk (16 bytes) is 4 vectors of 8: low nibbles of bytes 0-7 and 8-15 (codes
// k..k+15), then high nibbles (codes k+16..k+31).
template <int R, int NB>
__attribute__((target("avx2,fma"))) void w4_tile_avx2(const float* x, int64_t K, const uint8_t* w, const float* scale,
                                                    const float* zs, int64_t G, int64_t group, bool flip, float* y,
                                                    int64_t N, int64_t n) {
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K32 = K / 32 * 32, bytes = (K + 31) / 32 * 16;
  const __m128i low = _mm_set1_epi8(0x0F), flipper = _mm_set1_epi8(flip ? 0x08 : 0);
  for (int64_t g = 0; g * group < K32; ++g) {
    __m256 s[NB], z[NB];
    for (int j = 0; j < NB; ++j) {
      s[j] = _mm256_broadcast_ss(scale + (n + j) * G + g);
      z[j] = _mm256_broadcast_ss(zs + (n + j) * G + g);
    }
    const int64_t k1 = std::min(K32, (g + 1) * group);
    for (int64_t k = g * group; k < k1; k += 32) {
      __m128i lo[NB], hi[NB];
      if (k % 128 == 0)
        for (int j = 0; j < NB; ++j) prefetch_stream(w + (n + j + NB) * bytes + k / 2);  // the next tile's rows
      for (int j = 0; j < NB; ++j) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + j) * bytes + k / 2));
        lo[j] = _mm_xor_si128(_mm_and_si128(b, low), flipper);
        hi[j] = _mm_xor_si128(_mm_and_si128(_mm_srli_epi16(b, 4), low), flipper);
      }
      for (int q = 0; q < 4; ++q) {
        __m256 wv[NB];
        for (int j = 0; j < NB; ++j) {
          const __m128i codes = q & 1 ? _mm_srli_si128(q < 2 ? lo[j] : hi[j], 8) : (q < 2 ? lo[j] : hi[j]);
          wv[j] = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), s[j], z[j]);
        }
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_loadu_ps(x + r * K + k + 8 * q);
          for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(wv[j], xv, acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      float tail = 0.f;  // the codes past the last whole chunk
      for (int64_t k = K32; k < K; ++k) {
        const uint8_t byte = w[(n + j) * bytes + k / 32 * 16 + k % 16] ^ (flip ? 0x88 : 0);
        const float u = k % 32 < 16 ? (byte & 0xF) : (byte >> 4);
        const int64_t g = (n + j) * G + k / group;
        tail += (scale[g] * u - zs[g]) * x[r * K + k];
      }
      y[r * N + n + j] = hsum256(acc[r][j]) + tail;
    }
}

// Output rows over torch's threads, NB at a time (the last few one at a time).
template <int NB, typename Tile>
void tiles_avx2(int64_t N, Tile tile) {
  at::parallel_for(0, (N + NB - 1) / NB, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * NB;
      if (n + NB <= N)
        tile(std::integral_constant<int, NB>{}, n);
      else
        for (int64_t i = n; i < N; ++i) tile(std::integral_constant<int, 1>{}, i);
    }
  });
}

// Batches on AVX2 (M >= kPanelRows): the row kernels above decode every code once per 4 activation
// rows, and decoding (load, widen, mask, convert, scale) costs more than the 4 FMAs it feeds. Here a
// panel of output rows is dequantized once into an fp32 buffer that stays in L2 (dequant.cpp's
// pass), then every block of 4 activation rows meets it 3 output rows at a time: 12 accumulators,
// 3 weight loads and 4 activation loads for 12 FMAs. Measured on a Zen 3 core, 16 rows of a
// 1536 × 576 W4 g128 layer: 65 GFLOP/s against the row kernel's 36.
constexpr int kPanelRows = 4;
constexpr int kTileRows = 4, kTileCols = 3;
constexpr int64_t kPanelBytes = 128 << 10;

template <int R, int NB, bool Stream = true>  // Stream: w is read from memory, not a panel in L2
__attribute__((target("avx2,fma"))) void f32_tile_avx2(const float* x, int64_t K, const float* w, float* y, int64_t N,
                                                      int64_t n) {
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    if (Stream && k % 16 == 0)
      for (int j = 0; j < NB; ++j) prefetch_stream(w + (j + NB) * K + k);  // the next tile's rows
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + j * K + k), xv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      float sum = hsum256(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) sum += w[j * K + k] * x[r * K + k];
      y[r * N + n + j] = sum;
    }
}

// y (M, N) = x (M, K) · Wᵀ, W made a panel at a time by decode(n0, n1, out) into out ((n1 − n0) × K).
template <typename Decode>
void panels_avx2(const float* x, int64_t M, int64_t K, int64_t N, float* y, Decode decode) {
  // as many output rows as fit the budget, and at least 4 panels a thread so that threads end together
  const int64_t threads = at::get_num_threads();
  const int64_t fit = std::max<int64_t>(kTileCols, kPanelBytes / (K * 4) / kTileCols * kTileCols);
  const int64_t even = (N + 4 * threads - 1) / (4 * threads);
  const int64_t cols = std::max<int64_t>(kTileCols, std::min(fit, (even + kTileCols - 1) / kTileCols * kTileCols));
  at::parallel_for(0, (N + cols - 1) / cols, 1, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> panel;
    panel.resize(cols * K);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * cols, n1 = std::min(N, n0 + cols);
      decode(n0, n1, panel.data());
      for (int64_t m = 0; m < M; m += kTileRows) {
        const int64_t rows = std::min<int64_t>(kTileRows, M - m);
        for (int64_t n = n0; n < n1; n += kTileCols) {
          const int64_t width = std::min<int64_t>(kTileCols, n1 - n);
          const float* wn = panel.data() + (n - n0) * K;
          with_rows<kTileRows>(rows, [&](auto R) {
            constexpr int r = decltype(R)::value;
            if (width == 3) f32_tile_avx2<r, 3, false>(x + m * K, K, wn, y + m * N, N, n);
            else if (width == 2) f32_tile_avx2<r, 2, false>(x + m * K, K, wn, y + m * N, N, n);
            else f32_tile_avx2<r, 1, false>(x + m * K, K, wn, y + m * N, N, n);
          });
        }
      }
    }
  });
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
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>(), *zp = zs.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = w.size(1), gs = std::min(group_size, K);
  if (use_avx512()) {
    for_rows(M, N, [&](int64_t m, int64_t rows, int64_t n) {
      with_rows(rows, [&](auto R) {
        w4_rows_avx512<decltype(R)::value>(xp + m * K, K, wp + n * row_bytes, sp + n * G, zp + n * G, G, group_size,
                                           flip, yp + m * N, N, n);
      });
    });
  } else if (M >= kPanelRows) {
    panels_avx2(xp, M, K, N, yp, [&](int64_t n0, int64_t n1, float* out) {
      dequant_w4_rows(wp, sp, zp, out, n0, n1, K, G, group_size, flip);
    });
  } else if (M > 0) {
    with_rows<kPanelRows - 1>(M, [&](auto R) {  // 1 to 3 rows
      constexpr int r = decltype(R)::value;
      tiles_avx2<r == 3 ? 3 : 4>(N, [&](auto NB, int64_t n) {
        w4_tile_avx2<r, decltype(NB)::value>(xp, K, wp, sp, zp, G, gs, flip, yp, N, n);
      });
    });
  }
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
  if (use_avx512()) {
    const int64_t gs = std::min<int64_t>(group_size, ((K + 15) / 16) * 16);
    for_rows(M, N, [&](int64_t m, int64_t rows, int64_t n) {
      with_rows(rows, [&](auto R) {
        w8_rows_avx512<decltype(R)::value>(xp + m * K, K, wp + n * K, sp + n * G, G, gs, yp + m * N, N, n);
      });
    });
  } else if (M >= kPanelRows) {
    panels_avx2(xp, M, K, N, yp, [&](int64_t n0, int64_t n1, float* out) {
      dequant_w8_rows(wp, sp, out, n0, n1, K, G, group_size);
    });
  } else if (M > 0) {
    const int64_t gs = std::min(group_size, K);
    with_rows<kPanelRows - 1>(M, [&](auto R) {  // 1 to 3 rows
      constexpr int r = decltype(R)::value;
      tiles_avx2<r == 3 ? 3 : 4>(N, [&](auto NB, int64_t n) {
        w8_tile_avx2<r, decltype(NB)::value>(xp, K, wp, sp, G, gs, yp, N, n);
      });
    });
  }
  return y.to(x_in.scalar_type());
}

// fp32 GEMV / small GEMM: y (M, N) = x (M, K) · Wᵀ (+ b). AVX-512: one weight row against 4 activation
// rows; AVX2: the register tiles of the quantized kernels, straight on the weights (MKL's sgemv takes
// its generic path on AMD: 15 tokens/s of fp32 decoding of the default model on a Zen 3).
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && w.dim() == 2 &&
              w.is_contiguous() && w.size(1) == x.size(1), "f32_linear takes fp32 x (M, K) and contiguous W (N, K)");
  const torch::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float *xp = xc.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (use_avx512()) {
    for_rows(M, N, [&](int64_t m, int64_t rows, int64_t n) {
      with_rows(rows, [&](auto R) { f32_rows_avx512<decltype(R)::value>(xp + m * K, K, wp + n * K, yp + m * N, N, n); });
    });
  } else if (M > 0 && M < kPanelRows) {
    with_rows<kPanelRows - 1>(M, [&](auto R) {
      constexpr int r = decltype(R)::value;
      tiles_avx2<r == 3 ? 3 : 4>(N, [&](auto NB, int64_t n) {
        f32_tile_avx2<r, decltype(NB)::value>(xp, K, wp + n * K, yp, N, n);
      });
    });
  } else {
    tiles_avx2<kTileCols>(N, [&](auto NB, int64_t n) {  // a tile's weight rows stay in L1 for every 4 rows
      for (int64_t m = 0; m < M; m += kTileRows)
        with_rows<kTileRows>(std::min<int64_t>(kTileRows, M - m), [&](auto R) {
          f32_tile_avx2<decltype(R)::value, decltype(NB)::value>(xp + m * K, K, wp + n * K, yp + m * N, N, n);
        });
    });
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// A float layer as tuili.kernels.ops.linear runs it: f32_linear for 1 to gemv_rows fp32 rows, PyTorch's linear
// (oneDNN / BLAS) otherwise.
torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t gemv_rows) {
  const int64_t rows = x.dim() == 2 ? x.size(0) : 0;
  if (rows > 0 && rows <= gemv_rows && x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat &&
      w.is_contiguous())
    return f32_linear(x, w, bias);
  return at::linear(x, w, bias);
}

}  // namespace tuili
