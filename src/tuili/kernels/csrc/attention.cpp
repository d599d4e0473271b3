// Decode attention over a paged KV cache: one new query token per sequence, keys and values in
// fixed-size blocks that a block table maps to each sequence (vLLM's layout), GQA-aware.
//
//   q            (B, Hq, D)                       fp32 or bf16
//   k/v_cache    (num_blocks, block_size, Hkv, D) fp32, bf16 or int8
//   k/v_scale    (num_blocks, block_size, Hkv)    fp32, int8 caches only: one scale per token and head
//   block_tables (B, max_blocks) int32, context_lens (B,) int32
//   out          (B, Hq, D), o = softmax(q·Kᵀ · scale) · V over the sequence's first context_len
//                tokens (the last `window` of them when window > 0); with softcap > 0 each score s
//                becomes softcap · tanh(s / softcap) first (Gemma 2)
//
// Each key and value row is read once and serves all Hq / Hkv query heads of its group. Plain C++ loops over D that the compiler vectorizes, compiled twice
// (AVX-512 and AVX2) and chosen at run time like the GEMV kernels.
#include "common.h"

#include <atomic>
#include <tuple>
#include <vector>

namespace tuili {
namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return bf16_to_float(reinterpret_cast<const uint16_t&>(v)); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

struct Paged {
  int64_t block_size, kv_heads, head_dim, max_blocks;
  const int32_t* tables;
  const int32_t* lens;
  float softcap;  // 0: none
};

// Partial attention of `group` query heads over tokens [t0, t1) of sequence b, KV head h:
// the running max m_g, the sum of e^(logit − m_g) and the unnormalised Σ e^(logit − m_g) · v per head.
// Calls fn(i, r) for tokens t0 + i, i < n, of one sequence, with r the token's row of KV head h in
// the cache: one table lookup (and one division) per block, not per token.
template <typename Fn>
__attribute__((always_inline)) inline void for_tokens(const Paged& p, const int32_t* table, int64_t h, int64_t t0,
                                                      int64_t n, Fn fn) {
  const int64_t bs = p.block_size;
  for (int64_t i = 0; i < n;) {
    const int64_t t = t0 + i, off = t % bs, count = std::min(bs - off, n - i);
    const int64_t base = (static_cast<int64_t>(table[t / bs]) * bs + off) * p.kv_heads + h;
    for (int64_t j = 0; j < count; ++j) fn(i + j, base + j * p.kv_heads);
    i += count;
  }
}

// Partial attention of `group` query heads over tokens [t0, t1) of sequence b, KV head h:
// the running max m_g, the sum of e^(logit − m_g) and the unnormalised Σ e^(logit − m_g) · v per head.
// DC is the head size when it is a compile-time constant (64 or 128: loops fully unrolled), else 0.
template <typename T, int DC>
__attribute__((always_inline)) inline void decode_group(const float* __restrict q, int64_t group,
                                                        const T* __restrict k_cache, const T* __restrict v_cache,
                                                        const float* k_scale, const float* v_scale, const Paged& p,
                                                        int64_t b, int64_t h, int64_t t0, int64_t t1, float sm_scale,
                                                        float* __restrict logits, float* __restrict acc,
                                                        float* __restrict maxes, float* __restrict sums) {
  const int64_t D = DC ? DC : p.head_dim, n = t1 - t0;
  const int32_t* table = p.tables + b * p.max_blocks;
  for_tokens(p, table, h, t0, n, [&](int64_t i, int64_t r) {
    const T* __restrict k = k_cache + r * D;
    const float ks = k_scale ? k_scale[r] * sm_scale : sm_scale;
    for (int64_t g = 0; g < group; ++g) {
      const float* __restrict qg = q + g * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_float(k[d]);
      logits[g * n + i] = dot * ks;
    }
  });
  if (p.softcap > 0.f)
    for (int64_t i = 0; i < group * n; ++i) logits[i] = p.softcap * std::tanh(logits[i] / p.softcap);
  for (int64_t g = 0; g < group; ++g) {
    float* __restrict lg = logits + g * n;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, lg[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      lg[i] = exp_approx(lg[i] - mx);
      sum += lg[i];
    }
    maxes[g] = mx;
    sums[g] = sum;
  }
  for (int64_t j = 0; j < group * D; ++j) acc[j] = 0.f;
  for_tokens(p, table, h, t0, n, [&](int64_t i, int64_t r) {
    const T* __restrict v = v_cache + r * D;
    const float vs = v_scale ? v_scale[r] : 1.f;
    for (int64_t g = 0; g < group; ++g) {
      const float w = logits[g * n + i] * vs;
      float* __restrict ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += w * to_float(v[d]);
    }
  });
}

template <typename T, int DC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void decode_group_avx512(
    const float* q, int64_t group, const T* kc, const T* vc, const float* ks, const float* vs, const Paged& p,
    int64_t b, int64_t h, int64_t t0, int64_t t1, float sm, float* logits, float* acc, float* maxes, float* sums) {
  decode_group<T, DC>(q, group, kc, vc, ks, vs, p, b, h, t0, t1, sm, logits, acc, maxes, sums);
}

template <typename T, int DC>
__attribute__((target("avx2,fma"))) void decode_group_avx2(
    const float* q, int64_t group, const T* kc, const T* vc, const float* ks, const float* vs, const Paged& p,
    int64_t b, int64_t h, int64_t t0, int64_t t1, float sm, float* logits, float* acc, float* maxes, float* sums) {
  decode_group<T, DC>(q, group, kc, vc, ks, vs, p, b, h, t0, t1, sm, logits, acc, maxes, sums);
}

template <typename T>
using GroupFn = void (*)(const float*, int64_t, const T*, const T*, const float*, const float*, const Paged&, int64_t,
                         int64_t, int64_t, int64_t, float, float*, float*, float*, float*);

#define TUILI_ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// 16 cache values as fp32: fp32 and bf16 by common.h's load16; int8 here (the codes; their
// per-token scale is applied by the caller).
using tuili::load16;
TUILI_ATTN_TARGET __attribute__((always_inline)) inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// In place: logits → e^(logit − max), with the max and the sum of the exponentials.
TUILI_ATTN_TARGET inline void softmax_partial(float* lg, int64_t n, float* max_out, float* sum_out) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail16(n - i);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, lg + i));
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail16(n - i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, lg + i), vmx));
    _mm512_mask_storeu_ps(lg + i, m, e);
    vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
  }
  *max_out = mx;
  *sum_out = _mm512_reduce_add_ps(vsum);
}

// Σ_i w_gi · v_i for the G heads of a group at once (G · NV ≤ 24 accumulators, in registers: G is
// a compile-time constant): each value row is loaded once, and the heads' accumulator chains
// interleave instead of each waiting on its own FMA latency.
template <typename T, int NV, int G>
TUILI_ATTN_TARGET void value_pass_heads(const T* vc, const float* vs, const int64_t* rows, int64_t n,
                                        const float* logits, float* acc) {
  constexpr int64_t D = NV * 16;
  __m512 out[G * NV];
  for (int j = 0; j < G * NV; ++j) out[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    const float scale = vs ? vs[r] : 1.f;
    __m512 v[NV];
    for (int k = 0; k < NV; ++k) v[k] = load16(vc + r * D + k * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(logits[g * n + i] * scale);
      for (int k = 0; k < NV; ++k) out[g * NV + k] = _mm512_fmadd_ps(w, v[k], out[g * NV + k]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int k = 0; k < NV; ++k) _mm512_storeu_ps(acc + g * D + k * 16, out[g * NV + k]);
}

// The value pass with all heads in registers when the group is small enough; false otherwise.
template <typename T, int NV>
TUILI_ATTN_TARGET bool value_pass_grouped(const T* vc, const float* vs, const int64_t* rows, int64_t n, int64_t group,
                                          const float* logits, float* acc) {
  switch (NV == 4 ? group : group + 100) {  // D = 64: up to 6 heads; D = 128: up to 3
    case 1: value_pass_heads<T, NV, 1>(vc, vs, rows, n, logits, acc); return true;
    case 2: value_pass_heads<T, NV, 2>(vc, vs, rows, n, logits, acc); return true;
    case 3: value_pass_heads<T, NV, 3>(vc, vs, rows, n, logits, acc); return true;
    case 4: value_pass_heads<T, NV, 4>(vc, vs, rows, n, logits, acc); return true;
    case 5: value_pass_heads<T, NV, 5>(vc, vs, rows, n, logits, acc); return true;
    case 6: value_pass_heads<T, NV, 6>(vc, vs, rows, n, logits, acc); return true;
    case 101: value_pass_heads<T, NV, 1>(vc, vs, rows, n, logits, acc); return true;
    case 102: value_pass_heads<T, NV, 2>(vc, vs, rows, n, logits, acc); return true;
    case 103: value_pass_heads<T, NV, 3>(vc, vs, rows, n, logits, acc); return true;
    default: return false;
  }
}

// decode_group for head sizes 64 and 128 (NV registers of 16) with explicit AVX-512: each key row
// is loaded once for all heads of the group and each logit ends in one reduction; the value pass
// keeps each head's output in registers. Rows are looked up once per block into `rows`.
template <typename T, int NV>
TUILI_ATTN_TARGET void decode_group_simd(const float* q, int64_t group, const T* kc, const T* vc, const float* ks,
                                         const float* vs, const Paged& p, int64_t b, int64_t h, int64_t t0,
                                         int64_t t1, float sm, float* logits, float* acc, float* maxes, float* sums) {
  constexpr int64_t D = NV * 16;
  const int64_t n = t1 - t0, bs = p.block_size;
  const int32_t* table = p.tables + b * p.max_blocks;
  thread_local std::vector<int64_t> rows;
  rows.resize(n);
  for (int64_t i = 0; i < n;) {
    const int64_t t = t0 + i, off = t % bs, count = std::min(bs - off, n - i);
    const int64_t base = (static_cast<int64_t>(table[t / bs]) * bs + off) * p.kv_heads + h;
    for (int64_t j = 0; j < count; ++j) rows[i + j] = base + j * p.kv_heads;
    i += count;
  }
  // The rows of a sequence are scattered over its blocks: the hardware prefetchers do not follow
  // them, and each row's load would wait on memory (measured: int8 rows, a quarter of fp32's bytes,
  // were barely faster from DRAM). Prefetch keys a few rows ahead, and each value row during the
  // key pass so the value pass finds it in cache.
  constexpr int64_t kRowBytes = D * sizeof(T), kAhead = kRowBytes >= 256 ? 6 : 16;
  for (int64_t i = 0; i < std::min(n, kAhead); ++i)
    for (int64_t line = 0; line < kRowBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(kc + rows[i] * D) + line, _MM_HINT_T0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    for (int64_t line = 0; line < kRowBytes; line += 64) {
      if (i + kAhead < n) _mm_prefetch(reinterpret_cast<const char*>(kc + rows[i + kAhead] * D) + line, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(vc + r * D) + line, _MM_HINT_T1);
    }
    __m512 kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load16(kc + r * D + v * 16);
    const float scale = ks ? ks[r] * sm : sm;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * D;
      __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qg), kv[0]);
      for (int v = 1; v < NV; ++v) dot = _mm512_fmadd_ps(_mm512_loadu_ps(qg + v * 16), kv[v], dot);
      logits[g * n + i] = _mm512_reduce_add_ps(dot) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_partial(logits + g * n, n, maxes + g, sums + g);
  if (value_pass_grouped<T, NV>(vc, vs, rows.data(), n, group, logits, acc)) return;
  for (int64_t g = 0; g < group; ++g) {
    const float* lg = logits + g * n;
    __m512 out[NV];
    for (int v = 0; v < NV; ++v) out[v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rows[i];
      const __m512 w = _mm512_set1_ps(vs ? lg[i] * vs[r] : lg[i]);
      for (int v = 0; v < NV; ++v) out[v] = _mm512_fmadd_ps(w, load16(vc + r * D + v * 16), out[v]);
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + g * D + v * 16, out[v]);
  }
}

template <typename T>
GroupFn<T> group_fn(int64_t D) {
  if (use_avx512()) return D == 64 ? decode_group_simd<T, 4> : D == 128 ? decode_group_simd<T, 8>
                                                                         : decode_group_avx512<T, 0>;
  return D == 64 ? decode_group_avx2<T, 64> : D == 128 ? decode_group_avx2<T, 128> : decode_group_avx2<T, 0>;
}

// Tasks are (sequence, KV head, span of tokens): long contexts split into spans so every thread
// has work even at batch 1 (flash-decoding), each span's partial softmax merged afterwards.
template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, const float* ks,
         const float* vs, const Paged& p, float sm_scale, int64_t window, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = p.head_dim, group = Hq / p.kv_heads;
  constexpr int64_t kMinSpan = 128;
  const int64_t threads = at::get_num_threads();
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, p.lens[b]);
  const int64_t spans = std::max<int64_t>(1, std::min((2 * threads + B * p.kv_heads - 1) / (B * p.kv_heads),
                                                      (longest + kMinSpan - 1) / kMinSpan));
  const int64_t tasks = B * p.kv_heads * spans;
  // per task: group · D partial outputs, then group maxima and sums
  std::vector<float> partial(tasks * group * (D + 2));
  const float* qp = q.data_ptr<float>();
  const T *kc = k_cache.data_ptr<T>(), *vc = v_cache.data_ptr<T>();
  const GroupFn<T> decode = group_fn<T>(D);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> logits;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t % spans, bh = t / spans, b = bh / p.kv_heads, h = bh % p.kv_heads;
      const int64_t len = p.lens[b], first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t per = (len - first + spans - 1) / spans;
      const int64_t a = std::min(len, first + s * per), e = std::min(len, a + per);
      float* acc = partial.data() + t * group * (D + 2);
      float *maxes = acc + group * D, *sums = maxes + group;
      if (a >= e) {  // an empty span: contributes nothing
        for (int64_t g = 0; g < group; ++g) { maxes[g] = -INFINITY; sums[g] = 0.f; }
        continue;
      }
      logits.resize(group * (e - a));
      const float* qg = qp + (b * Hq + h * group) * D;
      decode(qg, group, kc, vc, ks, vs, p, b, h, a, e, sm_scale, logits.data(), acc, maxes, sums);
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * p.kv_heads; ++bh)
    for (int64_t g = 0; g < group; ++g) {
      float mx = -INFINITY, total = 0.f;
      for (int64_t s = 0; s < spans; ++s) mx = std::max(mx, partial[(bh * spans + s) * group * (D + 2) + group * D + g]);
      float* o = op + (bh * group + g) * D;  // (b, h·group + g) of (B, Hq, D)
      std::fill(o, o + D, 0.f);
      for (int64_t s = 0; s < spans; ++s) {
        const float* base = partial.data() + (bh * spans + s) * group * (D + 2);
        const float m = base[group * D + g], sum = base[group * D + group + g];
        if (sum == 0.f) continue;
        const float w = std::exp(m - mx);
        total += w * sum;
        for (int64_t d = 0; d < D; ++d) o[d] += w * base[g * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q_in, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor context_lens, double sm_scale,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                              int64_t window, double softcap) {
  TORCH_CHECK(q_in.dim() == 3, "q must be (B, Hq, D)");
  TORCH_CHECK(softcap >= 0, "softcap must be 0 (none) or positive");
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat || q_in.scalar_type() == torch::kBFloat16, "q must be fp32 or bf16");
  const torch::Tensor q = q_in.to(torch::kFloat).contiguous();
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must be (num_blocks, block_size, Hkv, D), contiguous, of one dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim of q and the cache differ");
  TORCH_CHECK(Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == torch::kInt &&
                  block_tables.is_contiguous(), "block_tables must be (B, max_blocks) int32");
  TORCH_CHECK(context_lens.numel() == B && context_lens.scalar_type() == torch::kInt && context_lens.is_contiguous(),
              "context_lens must be (B,) int32");
  const auto kind = k_cache.scalar_type();
  const bool int8 = kind == torch::kChar;
  TORCH_CHECK(int8 || kind == torch::kFloat || kind == torch::kBFloat16, "the cache must be fp32, bf16 or int8");
  TORCH_CHECK(int8 == (k_scale.has_value() && v_scale.has_value()), "int8 caches need k_scale and v_scale, others none");
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t capacity = block_tables.size(1) * k_cache.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= capacity, "context_lens[", b, "] = ", lens[b], " outside [1, ", capacity, "]");
    for (int64_t i = 0; i < (lens[b] + k_cache.size(1) - 1) / k_cache.size(1); ++i) {
      const int32_t block = tables[b * block_tables.size(1) + i];
      TORCH_CHECK(block >= 0 && block < k_cache.size(0), "block_tables[", b, ", ", i, "] = ", block,
                  " is not a block of the cache (", k_cache.size(0), " blocks)");
    }
  }
  const Paged p{k_cache.size(1),  Hkv, D, block_tables.size(1), block_tables.data_ptr<int32_t>(),
                lens,           static_cast<float>(softcap)};
  auto out = torch::empty({B, Hq, D}, torch::kFloat);
  const float sm = static_cast<float>(sm_scale);
  if (int8) {
    TORCH_CHECK(k_scale->scalar_type() == torch::kFloat && k_scale->is_contiguous() && v_scale->is_contiguous() &&
                    k_scale->numel() == k_cache.numel() / D && v_scale->numel() == k_scale->numel(),
                "k_scale and v_scale must be (num_blocks, block_size, Hkv) fp32");
    run<int8_t>(q, k_cache, v_cache, k_scale->data_ptr<float>(), v_scale->data_ptr<float>(), p, sm, window, out);
  } else if (kind == torch::kBFloat16) {
    run<at::BFloat16>(q, k_cache, v_cache, nullptr, nullptr, p, sm, window, out);
  } else {
    run<float>(q, k_cache, v_cache, nullptr, nullptr, p, sm, window, out);
  }
  return out.to(q_in.scalar_type());
}

// Store N tokens' keys and values (N, Hkv, D; any strides) at flat slots of one layer's paged cache
// (num_blocks · block_size slots, Hkv, D), rounding to int8 per token and head (scale over D, as
// tuili.kernels.kv_format.quantize_kv) for int8 caches. One call per layer instead of two scatters.
namespace {
template <typename S, typename T>
void write_rows(const torch::Tensor& x, T* cache, float* scales, const int64_t* slots, std::atomic<bool>& finite) {
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2);
  const int64_t sn = x.stride(0), sh = x.stride(1), sd = x.stride(2);
  const S* src = x.data_ptr<S>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t h = 0; h < H; ++h) {
        const S* row = src + n * sn + h * sh;
        const int64_t at = slots[n] * H + h;
        T* out = cache + at * D;
        if constexpr (std::is_same_v<T, int8_t>) {
          float amax = 0.f, probe = 0.f;  // probe: NaN when any value is NaN or inf (max() would drop a NaN)
          for (int64_t d = 0; d < D; ++d) {
            const float a = load(row, d * sd);
            amax = std::max(amax, std::fabs(a));
            probe += a * 0.f;
          }
          if (!std::isfinite(probe)) finite = false;
          const float s = std::max(amax, 1e-8f) / 127.f;
          for (int64_t d = 0; d < D; ++d)
            out[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(load(row, d * sd) / s))));
          scales[at] = s;
        } else {
          for (int64_t d = 0; d < D; ++d) store(out, d, load(row, d * sd));
        }
      }
  });
}

template <typename S>
void write_any(const torch::Tensor& x, torch::Tensor& cache, c10::optional<torch::Tensor>& scale, const int64_t* slots,
               std::atomic<bool>& finite) {
  switch (cache.scalar_type()) {
    case torch::kChar: write_rows<S, int8_t>(x, cache.data_ptr<int8_t>(), scale->data_ptr<float>(), slots, finite); break;
    case torch::kBFloat16: write_rows<S, at::BFloat16>(x, cache.data_ptr<at::BFloat16>(), nullptr, slots, finite); break;
    default: write_rows<S, float>(x, cache.data_ptr<float>(), nullptr, slots, finite);
  }
}
}  // namespace

void paged_write(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v,
                 c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache and v_cache must be contiguous (num_blocks, block_size, Hkv, D) of one dtype");
  const auto kind = k_cache.scalar_type();
  const bool int8 = kind == torch::kChar;
  TORCH_CHECK(int8 || kind == torch::kFloat || kind == torch::kBFloat16, "the cache must be fp32, bf16 or int8");
  TORCH_CHECK(int8 == (k_scale.has_value() && v_scale.has_value()), "int8 caches need k_scale and v_scale, others none");
  if (int8)
    TORCH_CHECK(k_scale->scalar_type() == torch::kFloat && k_scale->is_contiguous() && v_scale->is_contiguous() &&
                    k_scale->numel() == k_cache.numel() / k_cache.size(3) && v_scale->numel() == k_scale->numel(),
                "k_scale and v_scale must be (num_blocks, block_size, Hkv) fp32");
  const int64_t H = k_cache.size(2), D = k_cache.size(3), capacity = k_cache.size(0) * k_cache.size(1);
  for (const auto* x : {&k, &v})
    TORCH_CHECK(x->dim() == 3 && x->size(1) == H && x->size(2) == D && x->size(0) == slots.numel() &&
                    (x->scalar_type() == torch::kFloat || x->scalar_type() == torch::kBFloat16),
                "k and v must be fp32 or bf16 (N, Hkv, D) with one slot per row");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < slots.numel(); ++n)
    TORCH_CHECK(sp[n] >= 0 && sp[n] < capacity, "slot ", sp[n], " is outside the cache's ", capacity, " slots");
  std::atomic<bool> finite{true};
  for (auto [x, cache, scale] : {std::tuple{&k, &k_cache, &k_scale}, std::tuple{&v, &v_cache, &v_scale}}) {
    if (x->scalar_type() == torch::kBFloat16) write_any<at::BFloat16>(*x, *cache, *scale, sp, finite);
    else write_any<float>(*x, *cache, *scale, sp, finite);
  }
  TORCH_CHECK(finite, "KV cache tensor has NaN or inf values: the model produced non-finite keys or values");
}

}  // namespace tuili
