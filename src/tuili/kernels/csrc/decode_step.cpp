// A whole decode step of a Llama model, one C++ call: every layer's RMSNorm, projections, RoPE,
// paged KV write and attention, SiLU · up and residual adds, then the final norm and the head.
//
// It makes the same kernel calls as the engine's Python decode step (tuili.engine.decode), in the
// same order on the same values, so its logits are the same; what it removes is the Python between
// them: about 400 calls a token on the default model, each with its argument checks, module lookups
// and a new tensor, about 1.5 ms of a 5 ms W8A16 step (measured). The weights' own kernels and their
// threading are unchanged. A DecodePlan is built once per model layout by tuili.engine.fused, which
// checks before every step that the model is still the one it was built from.
#include "ops.h"

namespace tuili {

namespace {

enum class Op { W8I16, W4BF16, F32, W8, W4, W4A8, W8A8, W8A8Packed };

struct OpInfo {
  const char* name;
  Op op;
  size_t tensors, ints;  // arguments after x: tensors (None allowed where optional), then integers
};

constexpr OpInfo kOps[] = {
    {"w8_linear_i16", Op::W8I16, 2, 2},         // packed, scale; N, group_size
    {"w4_linear_bf16", Op::W4BF16, 3, 2},       // packed, scale, zs; N, group_size
    {"f32_linear", Op::F32, 2, 0},              // w, None (the bias is the layer's bias)
    {"w8_linear", Op::W8, 2, 1},                // w, scale; group_size
    {"w4_linear", Op::W4, 3, 2},                // w, scale, zs; group_size, flip
    {"w4a8_linear", Op::W4A8, 3, 2},            // w, scale, zs; group_size, flip
    {"w8a8_linear", Op::W8A8, 3, 0},            // w, weight_scale, input_scale?
    {"w8a8_linear_packed", Op::W8A8Packed, 4, 1},  // packed, row_sum, weight_scale, input_scale?; N
};

// One linear layer's kernel and its arguments, as `_KernelLinear.kernel_args` gives them.
struct Linear {
  Op op;
  std::vector<c10::optional<torch::Tensor>> t;
  std::vector<int64_t> i;
  c10::optional<torch::Tensor> bias;

  Linear(const std::string& name, std::vector<c10::optional<torch::Tensor>> tensors, std::vector<int64_t> ints,
         c10::optional<torch::Tensor> b)
      : t(std::move(tensors)), i(std::move(ints)), bias(std::move(b)) {
    const OpInfo* info = nullptr;
    for (const auto& o : kOps)
      if (name == o.name) info = &o;
    TORCH_CHECK(info != nullptr, "DecodePlan: no kernel named ", name);
    TORCH_CHECK(t.size() == info->tensors && i.size() == info->ints, "DecodePlan: ", name, " takes ", info->tensors,
                " tensors and ", info->ints, " integers, got ", t.size(), " and ", i.size());
    op = info->op;
    const size_t required = op == Op::F32 ? 1 : (op == Op::W8A8 || op == Op::W8A8Packed ? info->tensors - 1 : info->tensors);
    for (size_t k = 0; k < required; ++k) TORCH_CHECK(t[k].has_value(), "DecodePlan: ", name, " needs tensor ", k);
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor y;
    switch (op) {
      case Op::W8I16: y = w8_linear_i16(x, *t[0], *t[1], i[0], i[1]); break;
      case Op::W4BF16: y = w4_linear_bf16(x, *t[0], *t[1], *t[2], i[0], i[1]); break;
      case Op::F32: y = f32_linear(x, *t[0], c10::nullopt); break;
      case Op::W8: y = w8_linear(x, *t[0], *t[1], i[0]); break;
      case Op::W4: y = w4_linear(x, *t[0], *t[1], *t[2], i[0], i[1] != 0); break;
      case Op::W4A8: y = w4a8_linear(x, *t[0], *t[1], *t[2], i[0], i[1] != 0); break;
      case Op::W8A8: y = w8a8_linear(x, *t[0], *t[1], t[2]); break;
      case Op::W8A8Packed: y = w8a8_linear_packed(x, *t[0], *t[1], *t[2], t[3], i[0]); break;
    }
    if (bias.has_value()) y = y + *bias;  // as the layer's forward adds it
    return y;
  }
};

// Several layers on one input: w8_linear_i16_multi where all are W8 × int16 (q, k, v; gate, up),
// as tuili.quant.linear.shared_input does, else one call each.
std::vector<torch::Tensor> shared_input(const std::vector<const Linear*>& layers, const torch::Tensor& x) {
  bool multi = true;
  for (const Linear* l : layers) multi = multi && l->op == Op::W8I16;
  std::vector<torch::Tensor> outs;
  if (!multi) {
    for (const Linear* l : layers) outs.push_back((*l)(x));
    return outs;
  }
  std::vector<torch::Tensor> packed, scale;
  std::vector<int64_t> N, group;
  for (const Linear* l : layers) {
    packed.push_back(*l->t[0]);
    scale.push_back(*l->t[1]);
    N.push_back(l->i[0]);
    group.push_back(l->i[1]);
  }
  outs = w8_linear_i16_multi(x, packed, scale, N, group);
  for (size_t k = 0; k < layers.size(); ++k)
    if (layers[k]->bias.has_value()) outs[k] = outs[k] + *layers[k]->bias;
  return outs;
}

}  // namespace

class DecodePlan {
 public:
  // linears: q, k, v, o, gate, up, down of every layer, then the head, each as (kernel name, tensors,
  // integers, bias); norms: every layer's input and post-attention RMSNorm weights, then the final one.
  DecodePlan(std::vector<std::string> ops, std::vector<std::vector<c10::optional<torch::Tensor>>> tensors,
             std::vector<std::vector<int64_t>> ints, std::vector<c10::optional<torch::Tensor>> biases,
             std::vector<torch::Tensor> norms, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
             int64_t window)
      : norms_(std::move(norms)), heads_(heads), kv_heads_(kv_heads), dim_(head_dim), eps_(eps), window_(window) {
    const size_t n = ops.size();
    TORCH_CHECK(n % 7 == 1 && tensors.size() == n && ints.size() == n && biases.size() == n,
                "DecodePlan: 7 linear layers per decoder layer and a head, each with tensors, integers and a bias");
    layers_ = static_cast<int64_t>(n / 7);
    TORCH_CHECK(norms_.size() == static_cast<size_t>(2 * layers_ + 1), "DecodePlan: two norms per layer and a final one");
    for (const auto& w : norms_)
      TORCH_CHECK(w.scalar_type() == torch::kFloat && w.dim() == 1, "DecodePlan: norm weights are fp32 vectors");
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0, "DecodePlan: bad head counts");
    for (size_t k = 0; k < n; ++k) linears_.emplace_back(ops[k], std::move(tensors[k]), std::move(ints[k]), biases[k]);
  }

  // x (M, hidden) fp32: the new tokens' embeddings (the residual stream: overwritten); cos, sin (1, M, head_dim) of their positions;
  // the caches (layers, blocks, block_size, Hkv, D) and int8 scales; slots (M,) where each token's keys
  // go; tables (M, W) int32 and lens (M,) int32 of each sequence. Returns the logits of rows logits_at.
  torch::Tensor step(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                     torch::Tensor v_cache, c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                     torch::Tensor slots, torch::Tensor tables, torch::Tensor lens, torch::Tensor logits_at) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
                "DecodePlan.step: x must be (M, hidden) fp32, contiguous");
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == layers_, "DecodePlan.step: the cache must hold ", layers_,
                " layers");
    const int64_t M = x.size(0);
    const double sm_scale = 1.0 / std::sqrt(static_cast<double>(dim_));
    auto layer_of = [](const c10::optional<torch::Tensor>& t, int64_t i) -> c10::optional<torch::Tensor> {
      return t.has_value() ? c10::optional<torch::Tensor>(t->select(0, i)) : c10::nullopt;
    };
    for (int64_t i = 0; i < layers_; ++i) {
      const Linear* l = &linears_[7 * i];
      const torch::Tensor h = rms_norm(x, norms_[2 * i], eps_);
      auto qkv = shared_input({l, l + 1, l + 2}, h);
      const torch::Tensor q = rope(qkv[0].view({1, M, heads_, dim_}), cos, sin)[0];
      const torch::Tensor k = rope(qkv[1].view({1, M, kv_heads_, dim_}), cos, sin)[0];
      const torch::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);
      const auto ks = layer_of(k_scale, i), vs = layer_of(v_scale, i);
      paged_write(kc, vc, slots, k, qkv[2].view({M, kv_heads_, dim_}), ks, vs);
      const torch::Tensor out = paged_attention(q, kc, vc, tables, lens, sm_scale, ks, vs, window_);
      x.add_(l[3](out.reshape({M, heads_ * dim_})));  // in place: the same sums, no new tensor
      auto gate_up = shared_input({l + 4, l + 5}, rms_norm(x, norms_[2 * i + 1], eps_));
      x.add_(l[6](at::silu_(gate_up[0]).mul_(gate_up[1])));
    }
    return linears_.back()(rms_norm(x, norms_.back(), eps_).index_select(0, logits_at));
  }

  int64_t num_layers() const { return layers_; }

 private:
  std::vector<Linear> linears_;
  std::vector<torch::Tensor> norms_;
  int64_t layers_ = 0, heads_, kv_heads_, dim_;
  double eps_;
  int64_t window_;
};

void bind_decode_plan(py::module_& m) {
  py::class_<DecodePlan>(m, "DecodePlan", "A Llama decode step in one C++ call (built by tuili.engine.fused)")
      .def(py::init<std::vector<std::string>, std::vector<std::vector<c10::optional<torch::Tensor>>>,
                    std::vector<std::vector<int64_t>>, std::vector<c10::optional<torch::Tensor>>,
                    std::vector<torch::Tensor>, int64_t, int64_t, int64_t, double, int64_t>())
      .def("step", &DecodePlan::step, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_layers", &DecodePlan::num_layers);
}

}  // namespace tuili
