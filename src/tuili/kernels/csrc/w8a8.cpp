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
#include "amx.h"
#include "ops.h"

#include <utility>
#include <vector>

namespace tuili {
namespace {

// One row's int8 codes, AVX-512: the same IEEE division and round-half-to-even as the scalar loop
// (vdivps, vrndscaleps), so the codes are identical, 16 at a time. bf16 rows widen exactly as read.
template <typename T>
TUILI_AVX512 float quantize_row_avx512(const T* xm, int64_t K, int64_t Kp, const float* static_scale, bool offset, uint8_t* qm) {
  float s;
  if (static_scale) {
    s = *static_scale;
  } else {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = tail16(K - k);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(xm + k, mask)));
    }
    s = std::max(_mm512_reduce_max_ps(amax), 1e-12f) / 127.f;
  }
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i bias = _mm512_set1_epi32(offset ? 128 : 0);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = tail16(K - k);
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load16(xm + k, mask), sv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    const __m512i codes = _mm512_add_epi32(_mm512_cvtps_epi32(v), bias);
    _mm_mask_storeu_epi8(qm + k, mask, _mm512_cvtepi32_epi8(codes));
  }
  for (int64_t k = K; k < Kp; ++k) qm[k] = static_cast<uint8_t>(offset ? 128 : 0);  // zero
  return s;
}

// int8 codes of each row of x (M, K) into q (M, Kp) and their scales (M); `offset` adds 128 (u8).
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t Kp, const float* static_scale, bool offset,
                   uint8_t* q, float* scales) {
  const bool wide = use_avx512();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* xm = x + m * K;
      uint8_t* qm = q + m * Kp;
      if (wide) {
        scales[m] = quantize_row_avx512(xm, K, Kp, static_scale, offset, qm);
        continue;
      }
      float s;
      if (static_scale) {
        s = *static_scale;
      } else {
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(xm[k])));
        s = std::max(amax, 1e-12f) / 127.f;
      }
      scales[m] = s;
      const int bias = offset ? 128 : 0;
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::nearbyint(static_cast<float>(xm[k]) / s);  // round half to even, as torch.round
        qm[k] = static_cast<uint8_t>(static_cast<int>(std::min(127.f, std::max(-127.f, v))) + bias);
      }
      for (int64_t k = K; k < Kp; ++k) qm[k] = static_cast<uint8_t>(bias);  // zero
    }
  });
}

// x's rows (fp32 or bf16, contiguous) as int8 codes (q + 128 with `offset`) padded with zeros to
// Kp, and their scales: per token, or the one calibrated `input_scale` (static).
// Mp >= M rows: those past M are zero (whole tiles for AMX).
std::pair<torch::Tensor, torch::Tensor> quantize_input(const torch::Tensor& x, int64_t Kp,
                                                       const c10::optional<torch::Tensor>& input_scale, bool offset,
                                                       int64_t Mp = 0) {
  const float* static_scale = nullptr;
  torch::Tensor s_in;
  if (input_scale.has_value()) {
    s_in = input_scale->to(torch::kFloat).contiguous();
    TORCH_CHECK(s_in.numel() == 1, "input_scale must hold one value");
    static_scale = s_in.data_ptr<float>();
  }
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({std::max(M, Mp), Kp}, torch::kByte);
  if (Mp > M) q.narrow(0, M, Mp - M).fill_(offset ? 128 : 0);
  auto sx = torch::empty({M}, torch::kFloat);
  with_dtype(x, x, [&](const auto* xp, auto*) {
    quantize_rows(xp, M, K, Kp, static_scale, offset, q.data_ptr<uint8_t>(), sx.data_ptr<float>());
  });
  return {q, sx};
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

// y[n..n+16) = float(acc) · s_x · s_w[n..], in that order (the twin's), rounded to y's dtype.
template <typename Y>
TUILI_AVX512 inline void store_scaled(Y* y, __mmask16 mask, __m512i acc, __m512 sx, const float* sw) {
  store16(y, mask, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), sx), _mm512_maskz_loadu_ps(mask, sw)));
}

// Rows [m0, m1) of y (M, N) = float(acc) · s_x[m] · s_w[n], in y's dtype.
template <typename Y>
TUILI_AVX512 void scale_rows(const int32_t* acc, const float* sx, const float* sw, int64_t m0, int64_t m1, int64_t N,
                             Y* y) {
  for (int64_t m = m0; m < m1; ++m) {
    const __m512 s = _mm512_set1_ps(sx[m]);
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mask = tail16(N - n);
      store_scaled(y + m * N + n, mask, _mm512_maskz_loadu_epi32(mask, acc + m * N + n), s, sw + n);
    }
  }
}

}  // namespace

torch::Tensor w8a8_linear(torch::Tensor x_in, torch::Tensor w, torch::Tensor weight_scale,
                          c10::optional<torch::Tensor> input_scale) {
  const torch::Tensor x = as_rows(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.is_contiguous() && w.size(1) == K,
              "w must be (N, K) int8 contiguous");
  TORCH_CHECK(weight_scale.scalar_type() == torch::kFloat && weight_scale.numel() == N && weight_scale.is_contiguous(),
              "weight_scale must be (N,) fp32");
  const bool vnni = use_vnni();
  const int64_t Kp = (K + 63) / 64 * 64;
  const auto [q, sx] = quantize_input(x, Kp, input_scale, vnni);
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

// ---- Large batches (prefill): oneDNN's int8 GEMM between two fused passes -------------------------
// torch._int_mm runs int8 × int8 → int32 near the machine's int8 ceiling (AMX-INT8 where present:
// 2.8-3.3 TOP/s on 2 cores of an Intel Xeon, 512-2048 rows of 8192 × 2048), but the PyTorch twin
// spends more than the product around it: quantizing the rows (float, abs, amax, divide, round,
// clamp, cast: 80 ms for 2048 × 8192) and scaling the int32 result (three passes over M × N). Here
// the rows are quantized in one pass (quantize_rows, the twin's codes exactly) and the result is
// scaled and cast in one: y = float(acc) · s_x · s_w in that order, rounded to x's dtype, so the
// output equals the twin's bit for bit.
torch::Tensor w8a8_linear_gemm(torch::Tensor x_in, torch::Tensor w, torch::Tensor weight_scale,
                               c10::optional<torch::Tensor> input_scale) {
  TORCH_CHECK(use_avx512(), "the W8A8 GEMM path needs AVX-512");
  const torch::Tensor x = as_rows(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.size(1) == K, "w must be (N, K) int8");
  TORCH_CHECK(weight_scale.scalar_type() == torch::kFloat && weight_scale.numel() == N && weight_scale.is_contiguous(),
              "weight_scale must be (N,) fp32");
  const auto [q, sx] = quantize_input(x, K, input_scale, false);
  const torch::Tensor acc = at::_int_mm(q.view(torch::kChar), w.t());
  auto y = torch::empty({M, N}, x_in.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *sxp = sx.data_ptr<float>(), *swp = weight_scale.data_ptr<float>();
  with_dtype(y, y, [&](const auto*, auto* yp) {
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) { scale_rows(ap, sxp, swp, m0, m1, N, yp); });
  });
  return y;
}

// ---- Packed weights for batches (VNNI): an outer-product micro-kernel ------------------------------
// The dot-product kernel above meets each weight row with up to four activation rows and ends
// every output in a horizontal sum. For batches, weights are repacked once into blocks of 16
// output rows × 4 consecutive k (64 bytes: one register), so one vpdpbusd adds 4 products to
// each of 16 outputs for one activation row, with the row's 4 bytes broadcast: no reductions, and
// each weight block is loaded once for all activation rows.
//   packed (Np/16, Kp/4, 16, 4) int8, Np = N rounded up to 16, Kp = K rounded up to 4 (zeros)
//   row_sum (Np) int32: Σ_k w_nk, for the excess of the unsigned (q + 128) activations.

std::vector<torch::Tensor> w8a8_pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar, "w must be (N, K) int8");
  const torch::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), Np = (N + 15) / 16 * 16, Kp = (K + 3) / 4 * 4;
  auto padded = torch::zeros({Np, Kp}, torch::kChar);
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(wc);
  auto packed = padded.view({Np / 16, 16, Kp / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  auto row_sum = padded.sum(1, false, torch::kInt).contiguous();
  return {packed, row_sum};
}

namespace {
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void packed_block(const uint8_t* q, int64_t Kp, const int8_t* block, int32_t* out /* MR × 16 */) {
  __m512i acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < Kp / 4; ++k4) {
    const __m512i wv = _mm512_loadu_si512(block + k4 * 64);
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, q + m * Kp + k4 * 4, 4);
      acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(four), wv);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_si512(out + m * 16, acc[m]);
}
// For 8 or more rows: the roles swap. Lanes hold 16 activation rows (repacked so that one k-group
// of 4 bytes of 16 rows is one 64-byte register) and each output column has its own accumulator,
// into which vpdpbusd adds the column's 4 weights broadcast from memory ({1to16}, folded into the
// instruction). The micro-kernel above needs a separate broadcast per row and dot product; this
// one issues only dot products, measured 1.6x faster on AVX-512 VNNI at 16 rows.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void packed_block_lanes(const uint8_t* xt /* (Kp/4, 16, 4) */, int64_t Kp, const int8_t* block,
                        int32_t* out /* 16 columns × 16 rows */) {
  __m512i acc[16];
  for (int n = 0; n < 16; ++n) acc[n] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < Kp / 4; ++k4) {
    const __m512i xv = _mm512_loadu_si512(xt + k4 * 64);
    const int32_t* w4 = reinterpret_cast<const int32_t*>(block + k4 * 64);
    for (int n = 0; n < 16; ++n) acc[n] = _mm512_dpbusd_epi32(acc[n], xv, _mm512_set1_epi32(w4[n]));
  }
  for (int n = 0; n < 16; ++n) _mm512_storeu_si512(out + n * 16, acc[n]);
}

// Rows [m0, m0 + 16) of the (M, Kp) activation codes as (Kp/4, 16, 4): 4-byte k-groups of the 16
// rows side by side (rows past M are zeros and never stored).
void pack_rows(const uint8_t* q, int64_t M, int64_t Kp, int64_t m0, uint8_t* xt) {
  for (int64_t k4 = 0; k4 < Kp / 4; ++k4)
    for (int64_t r = 0; r < 16; ++r) {
      uint32_t four = 0;
      if (m0 + r < M) std::memcpy(&four, q + (m0 + r) * Kp + k4 * 4, 4);
      std::memcpy(xt + (k4 * 16 + r) * 4, &four, 4);
    }
}

// ---- AMX (Sapphire Rapids and later): int8 tile products on the same packing ----------------------
// The packing is AMX's own B layout: 16 consecutive quads of a block (64 k × 16 outputs) are one
// 1 KiB tile, loaded as they lie. Activations are quantized to signed codes (no +128: tdpbssd
// multiplies signed by signed) into rows of whole 64-k tiles, zero past K and past the last row,
// and one instruction adds 16 rows × 16 outputs × 64 exact products. A 2 × 2 block of C tiles (32
// rows × 32 outputs; tiles 0-3, A in 4 and 6, B in 5 and 7) runs over the whole k, and its int32
// sums are scaled into y as the twin scales them: the output equals the torch._int_mm path bit for
// bit, and no (M, N) int32 matrix goes through memory. Pairs of blocks are taken in panels whose
// codes stay in L2 while every row passes through them.
// Panels of 512 KiB of codes, rows in chunks of up to 1 MiB of codes (both then stay in L2): 512
// × 8192 → 2048 went 2.6 → 3.5 TOP/s on 2 cores of the Xeon with the chunks, torch._int_mm 2.2.
constexpr int64_t kPanelBytes = 512 << 10, kChunkBytes = 1 << 20;
constexpr int64_t kAmxMinRowsW8A8 = 4;  // tiles match the VNNI kernels at 2-4 rows and run 2-3× faster from 8

// C tiles (tm · 2 + tn) += A (TM tiles of 16 rows at a, row stride ld) · B (TN tiles at b0, b1).
template <int TM, int TN>
TUILI_AMX __attribute__((always_inline)) inline void s8_step(const int8_t* a, int64_t ld, const int8_t* b0,
                                                           const int8_t* b1) {
  _tile_loadd(4, a, ld);
  _tile_loadd(5, b0, 64);
  _tile_dpbssd(0, 4, 5);
  if constexpr (TN > 1) {
    _tile_loadd(7, b1, 64);
    _tile_dpbssd(1, 4, 7);
  }
  if constexpr (TM > 1) {
    _tile_loadd(6, a + 16 * ld, ld);
    _tile_dpbssd(2, 6, 5);
    if constexpr (TN > 1) _tile_dpbssd(3, 6, 7);
  }
}

// TM × TN tiles of y: rows [0, rows) at y (row stride N), outputs from n0, over all k of blocks b0
// (and b1): full tiles from the packing, then the last partial ones from tail0 (and tail1), each
// zero-padded to a whole tile (none where k fills whole tiles).
template <int TM, int TN, typename Y>
TUILI_AMX void s8_block(const int8_t* a, int64_t ld, const int8_t* b0, const int8_t* b1, int64_t full,
                        const int8_t* tail0, const int8_t* tail1, const float* sx, const float* sw, int64_t rows,
                        int64_t N, int64_t n0, Y* y) {
  _tile_zero(0);
  if constexpr (TN > 1) _tile_zero(1);
  if constexpr (TM > 1) _tile_zero(2);
  if constexpr (TM > 1 && TN > 1) _tile_zero(3);
  for (int64_t j = 0; j < full; ++j) s8_step<TM, TN>(a + j * 64, ld, b0 + j * 1024, b1 + j * 1024);
  if (tail0 != nullptr) s8_step<TM, TN>(a + full * 64, ld, tail0, tail1);
  alignas(64) int32_t c[4][256];
  _tile_stored(0, c[0], 64);
  if constexpr (TN > 1) _tile_stored(1, c[1], 64);
  if constexpr (TM > 1) _tile_stored(2, c[2], 64);
  if constexpr (TM > 1 && TN > 1) _tile_stored(3, c[3], 64);
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 s = _mm512_set1_ps(sx[m]);
    for (int tn = 0; tn < TN && n0 + 16 * tn < N; ++tn) {
      const int64_t n = n0 + 16 * tn;
      store_scaled(y + m * N + n, tail16(N - n), _mm512_load_si512(c[(m / 16) * 2 + tn] + (m % 16) * 16), s, sw + n);
    }
  }
}

// y (M, N) from q (Mp rows of ld signed codes), the packed blocks (each Kp · 16 bytes) and the scales.
template <typename Y>
void w8a8_amx(const int8_t* q, int64_t ld, int64_t M, const int8_t* wp, int64_t Kp, int64_t blocks,
              const float* sx, const float* sw, int64_t N, Y* y) {
  const int64_t full = Kp / 64, left = Kp % 64, pairs = (blocks + 1) / 2;
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / (32 * Kp));
  const int64_t chunk = std::max<int64_t>(32, kChunkBytes / ld / 32 * 32);
  // each block's last partial tile of k, zero-padded once for the whole call
  std::vector<int8_t> tails(left ? blocks * 1024 : 0, 0);
  for (int64_t b = 0; left && b < blocks; ++b) std::memcpy(tails.data() + b * 1024, wp + (b * Kp + full * 64) * 16, left * 16);
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    amx_begin(TileConfig{});
    for (int64_t m0 = 0; m0 < M; m0 += chunk)
      for (int64_t first = p0; first < p1; first += panel)
        for (int64_t m = m0; m < std::min(M, m0 + chunk); m += 32)
          for (int64_t p = first; p < std::min(p1, first + panel); ++p) {
            const int64_t b = 2 * p, b_next = std::min(b + 1, blocks - 1), rows = std::min<int64_t>(32, M - m);
            const int8_t *b0 = wp + b * Kp * 16, *b1 = wp + b_next * Kp * 16;
            const int8_t *t0 = left ? tails.data() + b * 1024 : nullptr, *t1 = left ? tails.data() + b_next * 1024 : nullptr;
            const int8_t* a = q + m * ld;
            Y* ym = y + m * N;
            if (rows > 16 && b + 1 < blocks) s8_block<2, 2>(a, ld, b0, b1, full, t0, t1, sx + m, sw, rows, N, b * 16, ym);
            else if (rows > 16) s8_block<2, 1>(a, ld, b0, b1, full, t0, t1, sx + m, sw, rows, N, b * 16, ym);
            else if (b + 1 < blocks) s8_block<1, 2>(a, ld, b0, b1, full, t0, t1, sx + m, sw, rows, N, b * 16, ym);
            else s8_block<1, 1>(a, ld, b0, b1, full, t0, t1, sx + m, sw, rows, N, b * 16, ym);
          }
    amx_end();
  });
}
}  // namespace

torch::Tensor w8a8_linear_packed(torch::Tensor x_in, torch::Tensor packed, torch::Tensor row_sum,
                                 torch::Tensor weight_scale, c10::optional<torch::Tensor> input_scale, int64_t N) {
  TORCH_CHECK(use_vnni(), "w8a8_linear_packed needs AVX-512 VNNI");
  const torch::Tensor x = as_rows(x_in);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kChar && packed.is_contiguous() &&
                  packed.size(2) == 16 && packed.size(3) == 4 && packed.size(1) * 4 >= K && packed.size(1) * 4 < K + 4 &&
                  packed.size(0) * 16 >= N && packed.size(0) * 16 < N + 16,
              "packed must come from w8a8_pack of an (N, K) weight");
  TORCH_CHECK(row_sum.scalar_type() == torch::kInt && row_sum.numel() == packed.size(0) * 16, "row_sum from w8a8_pack");
  TORCH_CHECK(weight_scale.scalar_type() == torch::kFloat && weight_scale.numel() == N && weight_scale.is_contiguous(),
              "weight_scale must be (N,) fp32");
  const int64_t Kp = packed.size(1) * 4, blocks = packed.size(0);
  if (M >= kAmxMinRowsW8A8 && use_amx()) {
    const int64_t ld = (Kp + 63) / 64 * 64 + 64;  // whole tiles, and rows not 4 KiB apart (one L1 set)
    const auto [q, sx] = quantize_input(x, ld, input_scale, false, (M + 15) / 16 * 16);
    auto y = torch::empty({M, N}, x.options());
    const int8_t* qp = reinterpret_cast<const int8_t*>(q.data_ptr<uint8_t>());
    with_dtype(y, y, [&](const auto*, auto* yp) {
      w8a8_amx(qp, ld, M, packed.data_ptr<int8_t>(), Kp, blocks, sx.data_ptr<float>(),
               weight_scale.data_ptr<float>(), N, yp);
    });
    return y;
  }
  const auto [q, sx] = quantize_input(x, Kp, input_scale, true);
  auto y = torch::empty({M, N}, torch::kFloat);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* rs = row_sum.data_ptr<int32_t>();
  const float *sxp = sx.data_ptr<float>(), *swp = weight_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Tiles of 16 rows go through the lanes kernel (a tile of 12 to 15 rows too: most lanes busy);
  // the rows left over (under 12) through the row kernel, 8 at a time.
  const int64_t tiles = M / 16 + (M % 16 >= 12 ? 1 : 0), lane_rows = std::min<int64_t>(M, tiles * 16);
  std::vector<uint8_t> xt(tiles * Kp * 16);
  for (int64_t t = 0; t < tiles; ++t) pack_rows(qp, M, Kp, t * 16, xt.data() + t * Kp * 16);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) int32_t acc[16 * 16];
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* block = wp + b * Kp * 16;
      const int64_t cols = std::min<int64_t>(16, N - b * 16);
      for (int64_t t = 0; t < tiles; ++t) {
        packed_block_lanes(xt.data() + t * Kp * 16, Kp, block, acc);
        const int64_t rows = std::min<int64_t>(16, M - t * 16);
        for (int64_t r = 0; r < rows; ++r) {  // row by row: contiguous stores into y
          const int64_t m = t * 16 + r;
          for (int64_t i = 0; i < cols; ++i) {
            const int64_t n = b * 16 + i;
            yp[m * N + n] = static_cast<float>(acc[i * 16 + r] - 128 * rs[n]) * sxp[m] * swp[n];
          }
        }
      }
      for (int64_t m = lane_rows; m < M; m += 8) {
        const int64_t rows = std::min<int64_t>(8, M - m);
        switch (rows) {
          case 1: packed_block<1>(qp + m * Kp, Kp, block, acc); break;
          case 2: packed_block<2>(qp + m * Kp, Kp, block, acc); break;
          case 3: packed_block<3>(qp + m * Kp, Kp, block, acc); break;
          case 4: packed_block<4>(qp + m * Kp, Kp, block, acc); break;
          case 5: packed_block<5>(qp + m * Kp, Kp, block, acc); break;
          case 6: packed_block<6>(qp + m * Kp, Kp, block, acc); break;
          case 7: packed_block<7>(qp + m * Kp, Kp, block, acc); break;
          default: packed_block<8>(qp + m * Kp, Kp, block, acc);
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < cols; ++i) {
            const int64_t n = b * 16 + i;
            yp[(m + r) * N + n] = static_cast<float>(acc[r * 16 + i] - 128 * rs[n]) * sxp[m + r] * swp[n];
          }
      }
    }
  });
  return y.to(x_in.scalar_type());
}

}  // namespace tuili
