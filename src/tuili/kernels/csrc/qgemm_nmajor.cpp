// Weight-only W4A16 and W8A16 for 1 to 64 rows on N-major packed weights, with 16-bit dot products:
// W4 × bf16 activations (AVX512-BF16, vdpbf16ps), W8 × int16 activations (AVX512-VNNI, vpdpwssd).
//
// qgemv.cpp's kernels multiply in fp32 and meet each weight row with four activation rows, so at
// 16 rows they are bound by fp32 FMAs (and by a horizontal sum per output). Here the weights are
// repacked once, N-major, into blocks of 16 output rows: one register holds 16 outputs × 2
// consecutive k as 16-bit pairs, so one dot-product instruction adds 2 products to each of 16
// outputs for one activation row (its 2 values broadcast from memory). No horizontal sums, each
// weight is decoded once per call for all rows, and a dot product does twice an FMA's work.
//
// W4: codes are small integers, exact in bf16; activations are rounded to bf16; products are exact
// and accumulate in fp32. Per group g and output n:
//   y = scale[g] · Σ_k u_k x̂_k − zs[g] · Σ_k x̂_k        (x̂ = bf16(x), zs = scale · zero)
// W8: codes widen to int16 with one vpmovsxbw per 32 (int8 → bf16 would take five instructions, and
// at 16 rows that conversion rather than the dot products bounded a bf16 W8 kernel). Activations
// are rounded per token to int16, s_x = max|x_m| / 32767: a finer grid than bf16's 8 significant
// bits wherever |x| > max|x_m| / 128 (perplexity of the default model equal to 1e-4 either way).
// Products are exact in int32: |pair| ≤ 2 · 32767 · 128 < 2^23, so 256 pairs fit; longer groups
// are summed in chunks of 256 pairs, each converted to fp32. y = s_x · Σ_g scale[g] · Σ_k q_x q_w.
//
// Packed W4: (Np/16, Kp/4, 32) uint8, Kp = K rounded up to 4. Byte j of the 32 bytes at (b, d) holds
// the code of 32-bit-pair word j of pair 2d in its low nibble and of pair 2d + 1 in its high
// nibble, word j being output 16b + j/2 at k = 2p + j%2. One 32-byte load and two vpermw (whose
// index uses 5 bits: a 32-entry table repeating 0..15 ignores the other nibble's low bit) give
// two registers of bf16 codes.
// Packed W8: (Np/16, Kp/2, 16, 2) int8: pair p of outputs 16b..16b+15, k = 2p and 2p + 1.
// Scales and zs: (Np/16, G, 16) fp32, the 16 outputs of a block side by side.
//
// Both prefetch the weight stream 4 KiB ahead: at 16 rows a block's 64-byte line is consumed in
// about 16 cycles, faster than the hardware prefetcher runs ahead (W8 at 16 rows: 0.73 → 0.39 ms
// per token over the default model's layers). The hint depends on the CPU (common.h,
// prefetch_stream): non-temporal on AMD, into L1 on Intel.
//
// AMX (Intel Sapphire Rapids and later), W4 from 4 rows: the same arithmetic, each step a tile
// product. A block's codes for 32 consecutive k (16 pairs × 16 outputs: the packing's own register
// layout) are decoded once into a 1 KiB tile, 16 rows of bf16 activations are loaded as the other,
// and one tdpbf16ps adds their exact products into a 16 × 16 fp32 tile; at each group's end the
// tile is scaled into the outputs. A 16-row step then does in one instruction what 256 vdpbf16ps
// do. W8 keeps its int16 activations exact: q = 256 · hi + lo with hi signed and lo unsigned bytes,
// so two int8 tile products (tdpbssd on hi, tdpbusd on lo) sum q · w exactly in int32; a block's
// pairs of k are regrouped into the tiles' quads by one vpermw per 64 bytes. Where AMX is absent,
// not granted by the kernel, or TUILI_ISA=avx512 is set, the dot-product kernels run.
#include "amx.h"

#include <cpuid.h>
#include <utility>
#include <sys/syscall.h>
#include <unistd.h>

namespace tuili {

// Every CPU with AVX512-BF16 also has VNNI; this file is compiled for both.
bool use_bf16() {
  static const bool yes = use_vnni() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// AMX-BF16, AMX-TILE and AMX-INT8 (CPUID 7.0:EDX bits 22, 24, 25), and Linux's permission to use them.
bool use_amx() {
  static const bool yes = [] {
    const char* isa = std::getenv("TUILI_ISA");
    if (!use_bf16() || (isa != nullptr && std::string(isa) == "avx512")) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & (0xBu << 22)) != (0xBu << 22)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return yes;
}

namespace {

#define TUILI_DOTS __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

constexpr int64_t kPrefetchBytes = 4096;

TUILI_DOTS inline void prefetch_ahead(const void* p) {
  prefetch_stream(static_cast<const char*>(p) + kPrefetchBytes);
}

// Chains of accumulators per row so that dot-product latency never stalls a lone row.
template <int MR> constexpr int chains() { return MR == 1 ? 8 : (MR == 2 ? 4 : (MR <= 6 ? 2 : 1)); }

// acc += w · (x's 16-bit pair broadcast to every lane), the broadcast folded into the instruction's
// memory operand ({1to16}); GCC emits a separate vpbroadcastd for the intrinsic form, one more
// instruction per dot product.
struct Bf16Dot {
  using Acc = __m512;
  TUILI_DOTS static Acc zero() { return _mm512_setzero_ps(); }
  TUILI_DOTS static Acc dot(Acc acc, __m512i w, const uint32_t* x) {
    asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
  }
  TUILI_DOTS static __m512 to_float(Acc acc) { return acc; }
  // W4: the bf16 codes of double pair d (pairs 2d and 2d + 1).
  TUILI_DOTS static void codes(const uint8_t* block, int64_t d, __m512i table, __m512i& w0, __m512i& w1) {
    prefetch_ahead(block + d * 32);
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(block + d * 32)));
    w0 = _mm512_permutexvar_epi16(v, table);
    w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
  }
};

struct Int16Dot {
  using Acc = __m512i;
  TUILI_DOTS static Acc zero() { return _mm512_setzero_si512(); }
  TUILI_DOTS static Acc dot(Acc acc, __m512i w, const uint32_t* x) {
    asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
  }
  TUILI_DOTS static __m512 to_float(Acc acc) { return _mm512_cvtepi32_ps(acc); }
  // W8: the int16 codes of double pair d.
  TUILI_DOTS static void codes(const uint8_t* block, int64_t d, __m512i, __m512i& w0, __m512i& w1) {
    prefetch_ahead(block + d * 64);
    w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(block + d * 64)));
    w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(block + d * 64 + 32)));
  }
};

template <typename Dot, int MR, int A, int I, int J>
TUILI_DOTS __attribute__((always_inline)) inline void dots(const uint32_t* xp, int64_t Kp2, int64_t p, __m512i w0, __m512i w1,
                                                typename Dot::Acc (&acc)[MR][A]) {
  for (int m = 0; m < MR; ++m) {
    const uint32_t* xm = xp + m * Kp2;
    acc[m][I] = Dot::dot(acc[m][I], w0, xm + p);
    acc[m][J] = Dot::dot(acc[m][J], w1, xm + p + 1);
  }
}

// Σ over double pairs [d0, d1) of MR rows × 16 outputs, added to sum[m] in fp32.
template <typename Dot, int MR>
TUILI_DOTS __attribute__((always_inline)) inline void span(const uint32_t* xp, int64_t Kp2, const uint8_t* block, int64_t d0,
                                                int64_t d1, __m512i table, __m512 (&sum)[MR]) {
  constexpr int A = chains<MR>();
  constexpr int U = A >= 2 ? A / 2 : 1;  // double pairs per unrolled step
  typename Dot::Acc acc[MR][A];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = Dot::zero();
  int64_t d = d0;
  __m512i w0, w1;
  for (; d + U <= d1; d += U) {
    Dot::codes(block, d, table, w0, w1);
    dots<Dot, MR, A, 0, 1 % A>(xp, Kp2, 2 * d, w0, w1, acc);
    if constexpr (U >= 2) {
      Dot::codes(block, d + 1, table, w0, w1);
      dots<Dot, MR, A, 2 % A, 3 % A>(xp, Kp2, 2 * d + 2, w0, w1, acc);
    }
    if constexpr (U >= 4) {
      Dot::codes(block, d + 2, table, w0, w1);
      dots<Dot, MR, A, 4 % A, 5 % A>(xp, Kp2, 2 * d + 4, w0, w1, acc);
      Dot::codes(block, d + 3, table, w0, w1);
      dots<Dot, MR, A, 6 % A, 7 % A>(xp, Kp2, 2 * d + 6, w0, w1, acc);
    }
  }
  for (; d < d1; ++d) {
    Dot::codes(block, d, table, w0, w1);
    dots<Dot, MR, A, 0, 1 % A>(xp, Kp2, 2 * d, w0, w1, acc);
  }
  for (int m = 0; m < MR; ++m)  // each chain's integer sum fits: the chains split the span
    for (int a = 0; a < A; ++a) sum[m] = _mm512_add_ps(sum[m], Dot::to_float(acc[m][a]));
}

// W4A16: MR rows × one block of 16 outputs. xp: the rows' bf16 pairs (MR, Kp/2) as 32-bit words;
// xsum (MR, G): per-group sums of x̂ (the zero-point term).
template <int MR, typename Y>
TUILI_DOTS void w4_block(const uint32_t* xp, int64_t Kp2, const float* xsum, const uint8_t* block,
                         const float* scale, const float* zs, int64_t G, int64_t group_pairs, const uint16_t* codes,
                         Y* y, int64_t N, int64_t n0) {
  const __m512i table = _mm512_loadu_si512(codes);  // bf16(0..15), twice
  __m512 total[MR];
  for (int m = 0; m < MR; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t d0 = g * group_pairs / 2, d1 = std::min<int64_t>(Kp2, (g + 1) * group_pairs) / 2;
    __m512 sum[MR];
    for (int m = 0; m < MR; ++m) sum[m] = _mm512_setzero_ps();
    span<Bf16Dot, MR>(xp, Kp2, block, d0, d1, table, sum);
    const __m512 s = _mm512_loadu_ps(scale + g * 16), z = _mm512_loadu_ps(zs + g * 16);
    for (int m = 0; m < MR; ++m)
      total[m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[m * G + g]), _mm512_fmadd_ps(sum[m], s, total[m]));
  }
  const __mmask16 mask = tail16(N - n0);
  for (int m = 0; m < MR; ++m) store16(y + m * N + n0, mask, total[m]);
}

// W8A16: MR rows of int16 pairs × one block of 16 outputs; xscale (MR) the rows' scales.
template <int MR, typename Y>
TUILI_DOTS void w8_block(const uint32_t* xp, int64_t Kp2, const float* xscale, const uint8_t* block,
                         const float* scale, int64_t G, int64_t group_pairs, Y* y, int64_t N, int64_t n0) {
  constexpr int64_t chunk = 128;  // double pairs: 256 pairs per int32 sum
  __m512 total[MR];
  for (int m = 0; m < MR; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t d0 = g * group_pairs / 2, d1 = std::min<int64_t>(Kp2, (g + 1) * group_pairs) / 2;
    __m512 sum[MR];
    for (int m = 0; m < MR; ++m) sum[m] = _mm512_setzero_ps();
    for (int64_t c = d0; c < d1; c += chunk)
      span<Int16Dot, MR>(xp, Kp2, block, c, std::min(d1, c + chunk), _mm512_setzero_si512(), sum);
    const __m512 s = _mm512_loadu_ps(scale + g * 16);
    for (int m = 0; m < MR; ++m) total[m] = _mm512_fmadd_ps(sum[m], s, total[m]);
  }
  const __mmask16 mask = tail16(N - n0);
  for (int m = 0; m < MR; ++m) store16(y + m * N + n0, mask, _mm512_mul_ps(total[m], _mm512_set1_ps(xscale[m])));
}

// x (M, K) fp32 or bf16 → bf16 (M, ld) padded with zeros, and the per-group sums of the rounded values.
template <typename X>
TUILI_DOTS void round_rows_bf16(const X* x, int64_t M, int64_t K, int64_t ld, int64_t group_size, int64_t G,
                                uint16_t* xb, float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    const X* xm = x + m * K;
    uint16_t* bm = xb + m * ld;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k1 = std::min<int64_t>(K, (g + 1) * group_size);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = g * group_size; k < k1; k += 16) {
        const __mmask16 mask = tail16(k1 - k);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(load16(xm + k, mask));
        _mm256_mask_storeu_epi16(bm + k, mask, h);
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      xsum[m * G + g] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t k = K; k < ld; ++k) bm[k] = 0;
  }
}

// x (M, K) fp32 or bf16 → int16 codes (M, Kp) padded with zeros, per-row scale s = max(max|x_m|, 1e-12) / 32767,
// q = round-half-even(x / s), as the PyTorch twin computes it.
template <typename X>
TUILI_DOTS void round_rows_i16(const X* x, int64_t M, int64_t K, int64_t Kp, int16_t* q, float* xscale) {
  for (int64_t m = 0; m < M; ++m) {
    const X* xm = x + m * K;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = tail16(K - k);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(xm + k, mask)));
    }
    const float s = std::max(_mm512_reduce_max_ps(amax), 1e-12f) / 32767.f;
    xscale[m] = s;
    const __m512 sv = _mm512_set1_ps(s);
    int16_t* qm = q + m * Kp;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = tail16(K - k);
      const __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(load16(xm + k, mask), sv));
      _mm256_mask_storeu_epi16(qm + k, mask, _mm512_cvtsepi32_epi16(v));
    }
    for (int64_t k = K; k < Kp; ++k) qm[k] = 0;
  }
}

// Fewer rows take the dot-product kernels (a tile computes 16 rows either way); measured on a Xeon
// (Sapphire Rapids class), 8192 × 2048: W4 breaks even at 4 rows; W8 at 8, and at 16 with groups of
// 32 k, whose two int32 tiles are converted and scaled every 32 k.
constexpr int64_t kAmxMinRows = 4, kAmxMinRowsW8 = 8, kAmxMinRowsW8g32 = 16;

// Tiles 0-3: C (16 × 16 fp32, one per 16 rows); 4 and 6: A (16 rows × 32 bf16, even and odd C
// tiles); 5 and 7: B (16 pairs × 16 outputs × 2 bf16, even and odd steps).

// The intrinsics spell tile numbers into the instruction's text, so each C tile t has its lines.
// C tile t += A (tile 4: the 16 rows of xb from t · 16, at k) · B (tile 5).
#define TUILI_TILE_CASES(op)     \
  if constexpr (t == 0) {        \
    op(0);                       \
  } else if constexpr (t == 1) { \
    op(1);                       \
  } else if constexpr (t == 2) { \
    op(2);                       \
  } else if constexpr (t == 3) { \
    op(3);                       \
  } else if constexpr (t == 4) { \
    op(4);                       \
  } else {                       \
    op(5);                       \
  }

// A (16 rows of bf16 activations at x, row stride ld elements) into tile 6 where odd, else 4.
template <bool odd>
TUILI_AMX __attribute__((always_inline)) inline void a_load(const uint16_t* x, int64_t ld) {
  if constexpr (odd) {
    _tile_loadd(6, x, ld * 2);
  } else {
    _tile_loadd(4, x, ld * 2);
  }
}

// B (a decoded tile of codes, 1 KiB) into tile 7 where odd, else 5.
template <bool odd>
TUILI_AMX __attribute__((always_inline)) inline void b_load(const void* b) {
  if constexpr (odd) {
    _tile_loadd(7, b, 64);
  } else {
    _tile_loadd(5, b, 64);
  }
}

// C tile t += A (tile 6 where a_odd, else 4) · B (tile 7 where b_odd, else 5).
template <int t, bool a_odd, bool b_odd>
TUILI_AMX __attribute__((always_inline)) inline void tile_dp() {
#define TUILI_DP(c)                                     \
  if constexpr (!a_odd && !b_odd) _tile_dpbf16ps(c, 4, 5); \
  else if constexpr (!a_odd) _tile_dpbf16ps(c, 4, 7);      \
  else if constexpr (!b_odd) _tile_dpbf16ps(c, 6, 5);      \
  else _tile_dpbf16ps(c, 6, 7)
  TUILI_TILE_CASES(TUILI_DP)
#undef TUILI_DP
}

// Store C tile t to c (16 × 16 fp32) and zero it.
template <int t>
TUILI_AMX __attribute__((always_inline)) inline void tile_take(float* c) {
#define TUILI_TAKE(n) \
  _tile_stored(n, c, 64); \
  _tile_zero(n)
  TUILI_TILE_CASES(TUILI_TAKE)
#undef TUILI_TAKE
}

template <int t>
TUILI_AMX __attribute__((always_inline)) inline void tile_clear() {
#define TUILI_ZERO(n) _tile_zero(n)
  TUILI_TILE_CASES(TUILI_ZERO)
#undef TUILI_ZERO
}

// One k step of T tiles of rows: B (the decoded tile at b), then C tile t += A(t) · B, A(t) the 16
// rows of xb from t · 16. Loads alternate between the two A and the two B registers (odd_j: this
// step's parity), so that none waits for the product before it.
template <int T, bool odd_j, int... t>
TUILI_AMX __attribute__((always_inline)) inline void amx_step(const uint8_t* b, const uint16_t* xb, int64_t ld,
                                                            std::integer_sequence<int, t...>) {
  b_load<odd_j>(b);
  ((a_load<((odd_j ? T : 0) + t) % 2 == 1>(xb + t * 16 * ld, ld), tile_dp<t, ((odd_j ? T : 0) + t) % 2 == 1, odd_j>()),
   ...);
}

template <int... t>
TUILI_AMX __attribute__((always_inline)) inline void tiles_take(float (*c)[256], std::integer_sequence<int, t...>) {
  (tile_take<t>(c[t]), ...);
}

template <int... t>
TUILI_AMX __attribute__((always_inline)) inline void tiles_clear(std::integer_sequence<int, t...>) {
  (tile_clear<t>(), ...);
}

// The tiles of codes a block's k runs through, decoded ahead into a ring: a tile load cannot take
// its bytes from stores still in flight, so loading a tile right after decoding it stalled until
// they reached the cache. Here tile j is decoded kAhead tiles before it is loaded. With the
// alternating A and B tiles this made 4-16-row W4 products of 8192 × 2048 1.3-1.4× faster
// (0.48 → 0.36 ms at 16 rows) and W8 ones with groups of 32 1.1-1.2×; 32-64 rows are unchanged.
// decode(j, dst) writes tile j; step(j, src) loads it and runs the tile products; at each group's
// end, finish(g, c) scales group g's sums, taken out of C tiles 0 to CT - 1 into c.
constexpr int64_t kRing = 4, kAhead = 3;

template <int CT, typename Int, typename Decode, typename Step, typename Finish>
TUILI_AMX __attribute__((always_inline)) inline void pipelined_tiles(int64_t tiles, int64_t tiles_per_group,
                                                                    Decode decode, Step step, Finish finish) {
  alignas(64) uint8_t ring[kRing][1024];
  alignas(64) Int c_tile[CT][256];
  for (int64_t j = 0; j < std::min(kAhead, tiles); ++j) decode(j, ring[j % kRing]);
  for (int64_t j = 0; j < tiles; ++j) {
    if (j + kAhead < tiles) decode(j + kAhead, ring[(j + kAhead) % kRing]);
    step(j, ring[j % kRing]);
    if ((j + 1) % tiles_per_group == 0 || j + 1 == tiles) {
      tiles_take(reinterpret_cast<float(*)[256]>(c_tile), std::make_integer_sequence<int, CT>{});
      finish(j / tiles_per_group, c_tile);
    }
  }
}

// W4A16 on AMX: T tiles of 16 rows (xb: their bf16 activations, row stride ld, zero past K and past
// the real rows) × one block of 16 outputs, `rows` of them stored. Each 32 k of the block's codes
// is decoded once for all T tiles. Groups hold a multiple of 32 k (or one group the whole row), so
// a tile never straddles two. (Four blocks sharing each tile of activations at 16 rows was slower:
// 0.44 against 0.36 ms for 8192 × 2048.)
template <int T, typename Y>
TUILI_AMX void w4_block_amx(const uint16_t* xb, int64_t ld, const float* xsum, const uint8_t* block,
                            const float* scale, const float* zs, int64_t G, int64_t group_pairs, int64_t Kp,
                            const uint16_t* codes, Y* y, int64_t N, int64_t n0, int64_t rows) {
  const __m512i table = _mm512_loadu_si512(codes);
  __m512 total[T * 16];
  for (int m = 0; m < T * 16; ++m) total[m] = _mm512_setzero_ps();
  tiles_clear(std::make_integer_sequence<int, T>{});
  const int64_t doubles = Kp / 4;  // 8 double pairs: 32 k, one tile
  auto decode = [&](int64_t j, uint8_t* dst) TUILI_AMX {
    uint16_t* b_tile = reinterpret_cast<uint16_t*>(dst);
    const int64_t d = 8 * j, n = std::min<int64_t>(8, doubles - d);
    __m512i w0, w1;
    for (int64_t i = 0; i < n; ++i) {
      Bf16Dot::codes(block, d + i, table, w0, w1);
      _mm512_store_si512(b_tile + 64 * i, w0);
      _mm512_store_si512(b_tile + 64 * i + 32, w1);
    }
    for (int64_t i = n; i < 8; ++i) {
      _mm512_store_si512(b_tile + 64 * i, _mm512_setzero_si512());
      _mm512_store_si512(b_tile + 64 * i + 32, _mm512_setzero_si512());
    }
  };
  auto step = [&](int64_t j, const uint8_t* src) TUILI_AMX {
    constexpr auto each = std::make_integer_sequence<int, T>{};
    if (j & 1)
      amx_step<T, true>(src, xb + 32 * j, ld, each);
    else
      amx_step<T, false>(src, xb + 32 * j, ld, each);
  };
  auto finish = [&](int64_t g, float (*c)[256]) TUILI_AMX {
    const __m512 s = _mm512_loadu_ps(scale + g * 16), z = _mm512_loadu_ps(zs + g * 16);
    for (int m = 0; m < T * 16; ++m)
      total[m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[m * G + g]),
                                  _mm512_fmadd_ps(_mm512_load_ps(c[m / 16] + 16 * (m % 16)), s, total[m]));
  };
  const int64_t tiles = (doubles + 7) / 8;
  pipelined_tiles<T, float>(tiles, G == 1 ? tiles : group_pairs / 16, decode, step, finish);
  const __mmask16 mask = tail16(N - n0);
  for (int m = 0; m < rows; ++m) store16(y + m * N + n0, mask, total[m]);
}

// W8: C tiles 0-5 (the hi and lo sums of up to 3 tiles of 16 rows), 6 (A: 16 rows × kt bytes) and
// 7 (B: kt/4 quads × 16 outputs × 4 bytes); kt, the k of one tile product: 64, or 32 for groups of 32.
TileConfig w8_tiles(int64_t kt) {
  TileConfig c;
  for (int t = 0; t < 6; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  c.colsb[6] = static_cast<uint16_t>(kt), c.rows[6] = 16;
  c.colsb[7] = 64, c.rows[7] = static_cast<uint8_t>(kt / 4);
  return c;
}

// C tiles 2t (hi) and 2t + 1 (lo) += the rows of tile t (at k) · B.
template <int t>
TUILI_AMX __attribute__((always_inline)) inline void w8_tile_step(const int8_t* hi, const uint8_t* lo, int64_t ld) {
  _tile_loadd(6, hi + t * 16 * ld, ld);
  if constexpr (t == 0) _tile_dpbssd(0, 6, 7);
  else if constexpr (t == 1) _tile_dpbssd(2, 6, 7);
  else _tile_dpbssd(4, 6, 7);
  _tile_loadd(6, lo + t * 16 * ld, ld);
  if constexpr (t == 0) _tile_dpbusd(1, 6, 7);
  else if constexpr (t == 1) _tile_dpbusd(3, 6, 7);
  else _tile_dpbusd(5, 6, 7);
}

template <int... t>
TUILI_AMX __attribute__((always_inline)) inline void w8_tiles_step(const int8_t* hi, const uint8_t* lo, int64_t ld,
                                                                 std::integer_sequence<int, t...>) {
  (w8_tile_step<t>(hi, lo, ld), ...);
}

// W8A16 on AMX: T tiles of 16 rows (hi, lo: their int16 codes' bytes, row stride ld, zero past K
// and the real rows) × one block of 16 outputs; y = s_x · Σ_g scale[g] · (256 · Σ hi·w + Σ lo·w).
template <int T, typename Y>
TUILI_AMX void w8_block_amx(const int8_t* hi, const uint8_t* lo, int64_t ld, const float* xscale,
                            const uint8_t* block, const float* scale, int64_t G, int64_t group_pairs, int64_t Kp2,
                            int64_t kt, Y* y, int64_t N, int64_t n0, int64_t rows) {
  // pairs (16 words of pair 2r, then 16 of pair 2r + 1) -> quads: word 2n from the first, 2n + 1 the second
  alignas(64) static const uint16_t quads[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(quads);
  __m512 total[T * 16];
  for (int m = 0; m < T * 16; ++m) total[m] = _mm512_setzero_ps();
  tiles_clear(std::make_integer_sequence<int, 2 * T>{});
  const int64_t tile_pairs = kt / 2;
  auto decode = [&](int64_t j, uint8_t* b_tile) TUILI_AMX {
    const int64_t p = j * tile_pairs, n = std::min<int64_t>(tile_pairs, Kp2 - p);  // even: Kp is a multiple of 4
    for (int64_t r = 0; 2 * r < tile_pairs; ++r) {
      prefetch_ahead(block + (p + 2 * r) * 32);
      const __m512i v = 2 * r < n ? _mm512_loadu_si512(block + (p + 2 * r) * 32) : _mm512_setzero_si512();
      _mm512_store_si512(b_tile + 64 * r, _mm512_permutexvar_epi16(idx, v));
    }
  };
  auto step = [&](int64_t j, const uint8_t* src) TUILI_AMX {
    _tile_loadd(7, src, 64);
    w8_tiles_step(hi + 2 * j * tile_pairs, lo + 2 * j * tile_pairs, ld, std::make_integer_sequence<int, T>{});
  };
  auto finish = [&](int64_t g, int32_t (*c)[256]) TUILI_AMX {
    const __m512 s = _mm512_loadu_ps(scale + g * 16), k256 = _mm512_set1_ps(256.f);
    for (int m = 0; m < T * 16; ++m) {
      const int t = m / 16, r = m % 16;
      const __m512 h = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * t] + 16 * r));
      const __m512 l = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * t + 1] + 16 * r));
      total[m] = _mm512_fmadd_ps(_mm512_fmadd_ps(h, k256, l), s, total[m]);
    }
  };
  const int64_t tiles = (Kp2 + tile_pairs - 1) / tile_pairs;
  pipelined_tiles<2 * T, int32_t>(tiles, G == 1 ? tiles : group_pairs / tile_pairs, decode, step, finish);
  const __mmask16 mask = tail16(N - n0);
  for (int m = 0; m < rows; ++m)
    store16(y + m * N + n0, mask, _mm512_mul_ps(total[m], _mm512_set1_ps(xscale[m])));
}

// The k of each W8 tile product for layers (with G and group_pairs): 64 where every layer's groups
// hold a multiple of 64 k (or its whole row), 32 where of 32, else 0 (no AMX: a tile would straddle
// two groups).
template <typename Layers>
int64_t amx_tile_k(const Layers& layers) {
  int64_t kt = 64;
  for (const auto& l : layers)
    if (l.G > 1 && l.group_pairs % 32) kt = l.group_pairs % 16 ? 0 : std::min<int64_t>(kt, 32);
  return kt;
}

// int16 codes (M, Kp) -> their high (signed) and low (unsigned) bytes, (Mp, ld) each, zero elsewhere.
TUILI_AMX void split_bytes(const int16_t* q, int64_t M, int64_t Kp, int64_t ld, int8_t* hi, uint8_t* lo) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kp; k += 32) {
      const __mmask32 mask = Kp - k >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << (Kp - k)) - 1);
      const __m512i v = _mm512_maskz_loadu_epi16(mask, q + m * Kp + k);
      _mm256_mask_storeu_epi8(hi + m * ld + k, mask, _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
      _mm256_mask_storeu_epi8(lo + m * ld + k, mask, _mm512_cvtepi16_epi8(v));
    }
}

// The shape checks both kernels share; returns G.
int64_t check_packed(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale, int64_t N,
                     int64_t group_size, bool w4) {
  const int64_t K = x.size(1), Kp = (K + 3) / 4 * 4, blocks = (N + 15) / 16;
  const int64_t G = scale.dim() == 3 ? scale.size(1) : 0;
  TORCH_CHECK(packed.is_contiguous() && packed.size(0) == blocks &&
                  (w4 ? packed.dim() == 3 && packed.scalar_type() == torch::kByte && packed.size(1) == Kp / 4
                      : packed.dim() == 4 && packed.scalar_type() == torch::kChar && packed.size(1) == Kp / 2),
              "packed weights must come from tuili's N-major packing of an (N, K) weight with N = ", N, ", K = ", K);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.dim() == 3 &&
                  scale.size(0) == blocks && scale.size(2) == 16, "scale must be (N/16, G, 16) fp32");
  TORCH_CHECK(group_size > 0 && (G == (K + group_size - 1) / group_size) && (group_size % 4 == 0 || G == 1),
              "group_size must be a multiple of 4 (or the whole row) and match scale's groups");
  return G;
}

// Blocks of 16 outputs over torch's threads; for each, the rows in tiles of up to 16 (body(b, m, rows)).
template <typename Body>
void for_blocks(int64_t M, int64_t N, Body body) {
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m = 0; m < M; m += 16) body(b, m, std::min<int64_t>(16, M - m));
  });
}

}  // namespace

torch::Tensor w4_linear_bf16(torch::Tensor x_in, torch::Tensor packed, torch::Tensor scale, torch::Tensor zs, int64_t N,
                             int64_t group_size) {
  TORCH_CHECK(use_bf16(), "the bf16 W4 kernel needs AVX512-BF16");
  const torch::Tensor x = as_rows(x_in);
  const int64_t G = check_packed(x, packed, scale, N, group_size, true);
  TORCH_CHECK(zs.sizes() == scale.sizes() && zs.scalar_type() == torch::kFloat && zs.is_contiguous(), "zs like scale");
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 3) / 4 * 4, Kp2 = Kp / 2;
  const int64_t group_pairs = G == 1 ? Kp2 : group_size / 2;
  alignas(64) static const uint16_t codes[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                                 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
                                                 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                                 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zs.data_ptr<float>();
  const bool amx = M >= kAmxMinRows && (G == 1 || group_size % 32 == 0) && use_amx();
  // AMX: whole tiles of rows and of k; rows 64 bytes longer than that, so that a tile's 16 rows do
  // not sit 4 KiB apart (one L1 set) when K is a multiple of 2048
  const int64_t Mp = amx ? (M + 15) / 16 * 16 : M, ld = amx ? (Kp + 31) / 32 * 32 + 32 : Kp;
  std::vector<uint16_t> xb(Mp * ld, 0);
  std::vector<float> xsum(Mp * G, 0.f);
  with_dtype(x, y, [&](const auto* xin, auto* yp) {
    round_rows_bf16(xin, M, K, ld, G == 1 ? K : group_size, G, xb.data(), xsum.data());
    if (amx) {
      at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
        const TileConfig config;
        amx_begin(config);
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t m = 0; m < M; m += 64)  // up to 4 tiles of 16 rows share each decoded tile of codes
            with_rows<4>((std::min<int64_t>(64, M - m) + 15) / 16, [&](auto T) {
              w4_block_amx<decltype(T)::value>(xb.data() + m * ld, ld, xsum.data() + m * G, wp + b * Kp * 8,
                                               sp + b * G * 16, zp + b * G * 16, G, group_pairs, Kp, codes,
                                               yp + m * N, N, b * 16, std::min<int64_t>(64, M - m));
            });
        amx_end();
      });
      return;
    }
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(xb.data());
    for_blocks(M, N, [&](int64_t b, int64_t m, int64_t rows) {
      with_rows<16>(rows, [&](auto R) {
        w4_block<decltype(R)::value>(xp + m * Kp2, Kp2, xsum.data() + m * G, wp + b * Kp * 8, sp + b * G * 16,
                                     zp + b * G * 16, G, group_pairs, codes, yp + m * N, N, b * 16);
      });
    });
  });
  return y;
}

// body(y as the activations' type: bf16 where `bf16`, else fp32).
template <typename Body>
inline void with_output(bool bf16, void* y, Body&& body) {
  if (bf16)
    body(static_cast<at::BFloat16*>(y));
  else
    body(static_cast<float*>(y));
}

// Several W8 layers that read the same input (a layer's q, k and v projections; gate and up) in one
// call: the input is rounded once, and one parallel loop runs over the blocks of all of them. On the
// default model's 576 → 576 + 192 + 192 projections that is 6.5 µs a layer instead of 14 in three
// calls (fork/join, rounding and allocation per call, and the smaller layers too short to keep both
// threads streaming). Each layer keeps its own packing, scales and group size; outputs are separate.
std::vector<torch::Tensor> w8_linear_i16_multi(torch::Tensor x_in, std::vector<torch::Tensor> packed,
                                               std::vector<torch::Tensor> scale, std::vector<int64_t> N,
                                               std::vector<int64_t> group_size) {
  TORCH_CHECK(use_vnni(), "the int16-activation W8 kernel needs AVX512-VNNI");
  const size_t L = packed.size();
  TORCH_CHECK(L > 0 && scale.size() == L && N.size() == L && group_size.size() == L,
              "one packed weight, scale, N and group size per layer");
  const torch::Tensor x = as_rows(x_in);
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 3) / 4 * 4, Kp2 = Kp / 2;
  struct Layer {
    const uint8_t* w;
    const float* s;
    int64_t G, group_pairs, N, first_block;
    void* y;  // x's dtype
  };
  std::vector<Layer> layers(L);
  std::vector<torch::Tensor> outs(L);
  int64_t blocks = 0;
  for (size_t i = 0; i < L; ++i) {
    const int64_t G = check_packed(x, packed[i], scale[i], N[i], group_size[i], false);
    outs[i] = torch::empty({M, N[i]}, x.options());
    layers[i] = {reinterpret_cast<const uint8_t*>(packed[i].data_ptr<int8_t>()), scale[i].data_ptr<float>(), G,
                 G == 1 ? Kp2 : group_size[i] / 2, N[i], blocks, outs[i].data_ptr()};
    blocks += (N[i] + 15) / 16;
  }
  std::vector<int16_t> q(M * Kp);
  std::vector<float> xscale(M);
  with_dtype(x, x, [&](const auto* xin, auto*) { round_rows_i16(xin, M, K, Kp, q.data(), xscale.data()); });
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  int64_t kt = M >= kAmxMinRowsW8 && use_amx() ? amx_tile_k(layers) : 0;
  if (kt == 32 && M < kAmxMinRowsW8g32) kt = 0;
  if (kt) {
    const int64_t Mp = (M + 15) / 16 * 16, ld = (Kp + 63) / 64 * 64 + 64;  // 64 bytes more: not 4 KiB apart
    std::vector<int8_t> hi(Mp * ld, 0);
    std::vector<uint8_t> lo(Mp * ld, 0);
    split_bytes(q.data(), M, Kp, ld, hi.data(), lo.data());
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const TileConfig config = w8_tiles(kt);
      amx_begin(config);
      size_t i = 0;
      for (int64_t block = b0; block < b1; ++block) {
        while (i + 1 < L && block >= layers[i + 1].first_block) ++i;
        const Layer& l = layers[i];
        const int64_t b = block - l.first_block;
        for (int64_t m = 0; m < M; m += 48)  // up to 3 tiles of 16 rows share each regrouped tile of codes
          with_rows<3>((std::min<int64_t>(48, M - m) + 15) / 16, [&](auto T) {
            with_output(bf16, l.y, [&](auto* y) {
              w8_block_amx<decltype(T)::value>(hi.data() + m * ld, lo.data() + m * ld, ld, xscale.data() + m,
                                               l.w + b * Kp * 16, l.s + b * l.G * 16, l.G, l.group_pairs, Kp2, kt,
                                               y + m * l.N, l.N, b * 16, std::min<int64_t>(48, M - m));
            });
          });
      }
      amx_end();
    });
  } else {
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(q.data());
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    size_t i = 0;
    for (int64_t block = b0; block < b1; ++block) {
      while (i + 1 < L && block >= layers[i + 1].first_block) ++i;
      const Layer& l = layers[i];
      const int64_t b = block - l.first_block;
      for (int64_t m = 0; m < M; m += 16)
        with_rows<16>(std::min<int64_t>(16, M - m), [&](auto R) {
          with_output(bf16, l.y, [&](auto* y) {
            w8_block<decltype(R)::value>(xp + m * Kp2, Kp2, xscale.data() + m, l.w + b * Kp * 16, l.s + b * l.G * 16,
                                         l.G, l.group_pairs, y + m * l.N, l.N, b * 16);
          });
        });
    }
    });
  }
  return outs;
}

torch::Tensor w8_linear_i16(torch::Tensor x_in, torch::Tensor packed, torch::Tensor scale, int64_t N,
                            int64_t group_size) {
  return w8_linear_i16_multi(x_in, {packed}, {scale}, {N}, {group_size})[0];  // one layer: the same blocks
}

}  // namespace tuili
