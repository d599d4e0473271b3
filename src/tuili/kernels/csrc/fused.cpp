// Element-wise decoder ops fused into one pass each. At batch 1 a decode step runs them three times
// per layer on 576-wide vectors, where PyTorch's per-op dispatch (RMSNorm is six aten ops, RoPE ten,
// 10-12 µs a call measured) costs more than the arithmetic.
//   silu_mul_: gate ← silu(gate) · up in place, rounded to the dtype after each op as PyTorch's two
//              ops are (AVX-512, contiguous tensors of one shape; else PyTorch's pair). At one row PyTorch's pair is as fast (2.7 µs); at prefill it is
//              not: on a 2,048 × 8,192 bf16 gate, silu_ and mul_ took 4.7 and 8.3 ms (7% of a 1B
//              model's prefill), this one pass 9.7 ms, bound by memory.
//   rms_norm:  y = w · (x / sqrt(mean(x²) + eps)), fp32 statistics; x fp32 or bf16 (rows, H)
//   rope:      y = x · cos + rotate_half(x) · sin for x (B, T, H, D), cos/sin (B, T, R): the first R
//              of each head's D values rotated (R < D: partial rotary, Phi-4-mini), the rest copied
//   argmax:    each row's first largest value's index, as torch.argmax (NaN counts as largest);
//              greedy sampling over a 49,152-token vocabulary, 28 µs in PyTorch, ~4 µs here
#include "common.h"

namespace tuili {
namespace {

template <typename T>
__attribute__((always_inline)) inline void rms_row(const T* x, const T* w, T* y, int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) {
    const float v = load(x, i);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  // as the reference: normalise in fp32, round to x's dtype, then scale by the weight
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) store(y, i, load(w, i) * round_to(x, load(x, i) * inv));
}

template <typename T>
__attribute__((always_inline)) inline void rope_row(const T* x, const float* cos, const float* sin, T* y, int64_t D,
                                                    int64_t R) {
  const int64_t half = R / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) store(y, i, load(x, i) * cos[i] - load(x, i + half) * sin[i]);
#pragma omp simd
  for (int64_t i = half; i < R; ++i) store(y, i, load(x, i) * cos[i] + load(x, i - half) * sin[i]);
  for (int64_t i = R; i < D; ++i) y[i] = x[i];
}

// 16 lanes rounded to T (bf16: to nearest even), as the value PyTorch's op would have stored.
TUILI_AVX512 inline __m512 round16(const float*, __m512 v) { return v; }
TUILI_AVX512 inline __m512 round16(const at::BFloat16*, __m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}

template <typename T>
TUILI_AVX512 void silu_mul_avx512(T* g, const T* u, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail16(n - i);
    const __m512 a = load16(g + i, m);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));
    const __m512 silu = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    store16(g + i, m, _mm512_mul_ps(round16(g, silu), load16(u + i, m)));
  }
}
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void rms_row_avx512(const T* x, const T* w, T* y,
                                                                                    int64_t H, float eps) {
  rms_row(x, w, y, H, eps);
}
template <typename T>
__attribute__((target("avx2,fma"))) void rms_row_avx2(const T* x, const T* w, T* y, int64_t H, float eps) {
  rms_row(x, w, y, H, eps);
}
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void rope_row_avx512(const T* x, const float* c,
                                                                                     const float* s, T* y, int64_t D,
                                                                                     int64_t R) {
  rope_row(x, c, s, y, D, R);
}
template <typename T>
__attribute__((target("avx2,fma"))) void rope_row_avx2(const T* x, const float* c, const float* s, T* y, int64_t D,
                                                       int64_t R) {
  rope_row(x, c, s, y, D, R);
}
template <typename T>
void run_rows(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y, int64_t rows, int64_t H, float eps,
              bool wide) {
  const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      wide ? rms_row_avx512(xp + r * H, wp, yp + r * H, H, eps) : rms_row_avx2(xp + r * H, wp, yp + r * H, H, eps);
  });
}

template <typename T>
void run_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& y,
              int64_t positions, int64_t H, int64_t D, int64_t R, bool wide) {
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, positions, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = (p * H + h) * D;
        wide ? rope_row_avx512(xp + at, cp + p * R, sp + p * R, yp + at, D, R)
             : rope_row_avx2(xp + at, cp + p * R, sp + p * R, yp + at, D, R);
      }
  });
}

void check_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, what,
              " must be float32 or bfloat16, got ", t.scalar_type());
}


// Index of the first NaN, else of the first maximum: torch.argmax's answer for one row.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) int64_t argmax_row_avx512(const T* x, int64_t V) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = tail16(V - i);
    const __m512 v = load16(x + i, m);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    best = _mm512_mask_max_ps(best, m, best, v);
  }
  if (nan) {
    for (int64_t i = 0; i < V; ++i)
      if (std::isnan(static_cast<float>(x[i]))) return i;
  }
  const __m512 target = _mm512_set1_ps(_mm512_reduce_max_ps(best));
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = tail16(V - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, load16(x + i, m), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // every value -inf: the first
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x_in, torch::Tensor weight, double eps) {
  check_float(x_in, "x");
  const int64_t H = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.scalar_type() == x_in.scalar_type(),
              "weight must be (", H, ",) of x's dtype");
  const torch::Tensor x = x_in.contiguous(), w = weight.contiguous();
  auto y = torch::empty_like(x);
  const int64_t rows = x.numel() / H;
  const bool wide = use_avx512();
  const float e = static_cast<float>(eps);
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
    AT_DISPATCH_CASE(torch::kFloat, [&] { run_rows<float>(x, w, y, rows, H, e, wide); })
    AT_DISPATCH_CASE(torch::kBFloat16, [&] { run_rows<at::BFloat16>(x, w, y, rows, H, e, wide); }));
  return y;
}

torch::Tensor rope(torch::Tensor x_in, torch::Tensor cos_in, torch::Tensor sin_in) {
  check_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4, "x must be (B, T, H, D)");
  const int64_t B = x_in.size(0), T = x_in.size(1), H = x_in.size(2), D = x_in.size(3);
  const int64_t R = cos_in.size(-1);
  TORCH_CHECK(R % 2 == 0 && R > 0 && R <= D, "cos and sin must rotate an even number of a head's ", D, " values");
  const torch::Tensor x = x_in.contiguous();
  const torch::Tensor c = cos_in.to(torch::kFloat).expand({B, T, R}).contiguous();
  const torch::Tensor s = sin_in.to(torch::kFloat).expand({B, T, R}).contiguous();
  auto y = torch::empty_like(x);
  const bool wide = use_avx512();
  AT_DISPATCH_SWITCH(x.scalar_type(), "rope",
    AT_DISPATCH_CASE(torch::kFloat, [&] { run_rope<float>(x, c, s, y, B * T, H, D, R, wide); })
    AT_DISPATCH_CASE(torch::kBFloat16, [&] { run_rope<at::BFloat16>(x, c, s, y, B * T, H, D, R, wide); }));
  return y;
}

torch::Tensor silu_mul_(torch::Tensor gate, torch::Tensor up) {
  check_float(gate, "gate");
  const bool fits = gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes() &&
                    gate.scalar_type() == up.scalar_type();
  if (!fits || !use_avx512()) return at::silu_(gate).mul_(up);  // PyTorch's pair, which broadcasts
  const int64_t n = gate.numel();
  constexpr int64_t chunk = 4096;
  with_dtype(up, gate, [&](const auto* u, auto* g) {
    at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
      const int64_t i0 = c0 * chunk, len = std::min(n, c1 * chunk) - i0;
      silu_mul_avx512(g + i0, u + i0, len);
    });
  });
  return gate;
}

torch::Tensor argmax_rows(torch::Tensor x_in) {
  TORCH_CHECK(use_avx512(), "argmax_rows needs AVX-512");
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == torch::kFloat || x_in.scalar_type() == torch::kBFloat16) &&
                  x_in.size(1) > 0,
              "x must be (rows, V) fp32 or bf16 with V > 0");
  const torch::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), V = x.size(1);
  auto out = torch::empty({rows}, torch::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_SWITCH(x.scalar_type(), "argmax_rows",
    AT_DISPATCH_CASE(torch::kFloat, [&] {
      const float* xp = x.data_ptr<float>();
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row_avx512(xp + r * V, V);
      });
    })
    AT_DISPATCH_CASE(torch::kBFloat16, [&] {
      const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row_avx512(xp + r * V, V);
      });
    }));
  return out;
}

}  // namespace tuili
