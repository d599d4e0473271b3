// Decode attention over a paged KV cache: one new query token per sequence, keys and values in
// fixed-size blocks that a block table maps to each sequence (vLLM's layout), GQA-aware.
//
//   q            (B, Hq, D)                       fp32 or bf16
//   k/v_cache    (num_blocks, block_size, Hkv, D) fp32, bf16 or int8
//   k/v_scale    (num_blocks, block_size, Hkv)    fp32, int8 caches only: one scale per token and head
//   block_tables (B, max_blocks) int32, context_lens (B,) int32
//   out          (B, Hq, D), o = softmax(q·Kᵀ · scale) · V over the sequence's first context_len
//                tokens (the last `window` of them when window > 0)
//
// One task per (sequence, KV head): each key and value row is read once and serves all Hq / Hkv
// query heads of its group. Plain C++ loops over D that the compiler vectorizes, compiled twice
// (AVX-512 and AVX2) and chosen at run time like the GEMV kernels.
#include "common.h"

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
};

template <typename T>
__attribute__((always_inline)) inline void decode_group(const float* q, int64_t group, const T* k_cache,
                                                        const T* v_cache, const float* k_scale, const float* v_scale,
                                                        const Paged& p, int64_t b, int64_t h, float sm_scale,
                                                        int64_t window, float* logits, float* out) {
  const int64_t D = p.head_dim, len = p.lens[b];
  const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - start;
  const int32_t* table = p.tables + b * p.max_blocks;
  auto row = [&](int64_t t) { return (static_cast<int64_t>(table[t / p.block_size]) * p.block_size + t % p.block_size) * p.kv_heads + h; };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = row(start + i);
    const T* k = k_cache + r * D;
    const float ks = k_scale ? k_scale[r] * sm_scale : sm_scale;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * D;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_float(k[d]);
      logits[g * n + i] = dot * ks;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* lg = logits + g * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, lg[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      lg[i] = exp_neg(lg[i] - mx);
      sum += lg[i];
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < n; ++i) lg[i] *= inv;
  }
  std::fill(out, out + group * D, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = row(start + i);
    const T* v = v_cache + r * D;
    const float vs = v_scale ? v_scale[r] : 1.f;
    for (int64_t g = 0; g < group; ++g) {
      const float w = logits[g * n + i] * vs;
      float* og = out + g * D;
      for (int64_t d = 0; d < D; ++d) og[d] += w * to_float(v[d]);
    }
  }
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void decode_group_avx512(
    const float* q, int64_t group, const T* kc, const T* vc, const float* ks, const float* vs, const Paged& p,
    int64_t b, int64_t h, float sm, int64_t window, float* logits, float* out) {
  decode_group<T>(q, group, kc, vc, ks, vs, p, b, h, sm, window, logits, out);
}

template <typename T>
__attribute__((target("avx2,fma"))) void decode_group_avx2(const float* q, int64_t group, const T* kc, const T* vc,
                                                           const float* ks, const float* vs, const Paged& p,
                                                           int64_t b, int64_t h, float sm, int64_t window,
                                                           float* logits, float* out) {
  decode_group<T>(q, group, kc, vc, ks, vs, p, b, h, sm, window, logits, out);
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, const float* ks,
         const float* vs, const Paged& p, float sm_scale, int64_t window, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = p.head_dim, group = Hq / p.kv_heads;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const T *kc = k_cache.data_ptr<T>(), *vc = v_cache.data_ptr<T>();
  const bool wide = use_avx512();
  at::parallel_for(0, B * p.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> logits;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.kv_heads, h = t % p.kv_heads;
      logits.resize(group * std::max<int64_t>(1, p.lens[b]));
      const float* qg = qp + (b * Hq + h * group) * D;
      float* og = op + (b * Hq + h * group) * D;
      if (wide) decode_group_avx512<T>(qg, group, kc, vc, ks, vs, p, b, h, sm_scale, window, logits.data(), og);
      else decode_group_avx2<T>(qg, group, kc, vc, ks, vs, p, b, h, sm_scale, window, logits.data(), og);
    }
  });
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q_in, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor context_lens, double sm_scale,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                              int64_t window) {
  TORCH_CHECK(q_in.dim() == 3, "q must be (B, Hq, D)");
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
  const Paged p{k_cache.size(1), Hkv, D, block_tables.size(1), block_tables.data_ptr<int32_t>(), lens};
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

}  // namespace tuili
