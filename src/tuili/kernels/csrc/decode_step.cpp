// A whole decode step of a Llama-family model, one C++ call: every layer's RMSNorm, projections,
// RoPE, paged KV write and attention, activation · up and residual adds, then the final norm and
// the head. What families add is data here: per-layer windows and RoPE (global or local), the
// attention's scale and soft cap, q/k norms and norms on the attention's and MLP's outputs (Gemma),
// and a layer's mixture of experts (Qwen3-MoE, Mixtral): the router, a top-k choice per token, each
// chosen expert run on its tokens and their outputs summed with the router's weights.
//
// It makes the kernel calls the model's module forward makes (tuili.models.llama), in the same
// order on the same values, so its logits are the same; what it removes is the Python between
// them: about 400 calls a token on the default model, each with its argument checks, module lookups
// and a new tensor. The weights' own kernels and their threading are unchanged. A DecodePlan is
// built from a typed plan by tuili.engine.step, which checks that the model is still the one it was
// built from. Each linear layer comes as (kernel name, tensors, integers, bias): the arguments are
// those of tuili.kernels.contract, where their meaning is written; this file only maps names to
// functions.
#include <torch/extension.h>  // pybind11: this file binds to Python

#include "ops.h"

#include <map>

namespace tuili {

namespace {

using Tensors = std::vector<c10::optional<torch::Tensor>>;
using Ints = std::vector<int64_t>;
using Kernel = torch::Tensor (*)(const torch::Tensor& x, const Tensors& t, const Ints& i);

// The k-th tensor argument, which must be there (an absent one raises, it does not crash).
const torch::Tensor& arg(const Tensors& t, size_t k) { return t.at(k).value(); }

const std::map<std::string, Kernel>& kernels() {
  static const std::map<std::string, Kernel> table = {
      {"w4_linear",
       [](const torch::Tensor& x, const Tensors& t, const Ints& i) {
         return w4_linear(x, arg(t, 0), arg(t, 1), arg(t, 2), i.at(0), i.at(1) != 0);
       }},
      {"w8_linear",
       [](const torch::Tensor& x, const Tensors& t, const Ints& i) { return w8_linear(x, arg(t, 0), arg(t, 1), i.at(0)); }},
      {"w4a8_linear",
       [](const torch::Tensor& x, const Tensors& t, const Ints& i) {
         return w4a8_linear(x, arg(t, 0), arg(t, 1), arg(t, 2), i.at(0), i.at(1) != 0);
       }},
      {"w4a8_linear_nmajor",
       [](const torch::Tensor& x, const Tensors& t, const Ints& i) {
         return w4a8_linear_nmajor(x, arg(t, 0), arg(t, 1), arg(t, 2), i.at(0), i.at(1), i.at(2) != 0);
       }},
      {"w4_linear_bf16",
       [](const torch::Tensor& x, const Tensors& t, const Ints& i) {
         return w4_linear_bf16(x, arg(t, 0), arg(t, 1), arg(t, 2), i.at(0), i.at(1));
       }},
      {"w8_linear_i16",
       [](const torch::Tensor& x, const Tensors& t, const Ints& i) {
         return w8_linear_i16(x, arg(t, 0), arg(t, 1), i.at(0), i.at(1));
       }},
      {"w8a8_linear",
       [](const torch::Tensor& x, const Tensors& t, const Ints&) {
         return w8a8_linear(x, arg(t, 0), arg(t, 1), t.at(2));
       }},
      {"w8a8_linear_packed",
       [](const torch::Tensor& x, const Tensors& t, const Ints& i) {
         return w8a8_linear_packed(x, arg(t, 0), arg(t, 1), arg(t, 2), t.at(3), i.at(0));
       }},
      {"linear", [](const torch::Tensor& x, const Tensors& t, const Ints& i) {
         return linear(x, arg(t, 0), t.at(1), i.at(0));
       }}};
  return table;
}

// The MLP's activation, by transformers' hidden_act name (tuili.models.llama.ACTIVATIONS).
enum class Activation { SiLU, GELU, GELUTanh, ReLU };

Activation activation_named(const std::string& name) {
  if (name == "silu") return Activation::SiLU;
  if (name == "gelu") return Activation::GELU;
  if (name == "gelu_pytorch_tanh") return Activation::GELUTanh;
  if (name == "relu") return Activation::ReLU;
  TORCH_CHECK(false, "DecodePlan: no activation named ", name);
}

Kernel kernel_named(const std::string& name) {
  const auto found = kernels().find(name);
  TORCH_CHECK(found != kernels().end(), "DecodePlan: no kernel named ", name);
  return found->second;
}

// One linear layer's kernel call and the layer's bias; the output in the input's dtype, as the
// layer's forward gives it. A second call may take batches of at most small_rows rows (the
// KernelCall's `small`: a kernel this CPU runs faster there).
struct Linear {
  std::string name;
  Kernel kernel;
  Tensors t;
  Ints i;
  c10::optional<torch::Tensor> bias;
  Kernel small = nullptr;
  Tensors small_t;
  Ints small_i;
  int64_t small_rows = 0;

  Linear(std::string op, Tensors tensors, Ints ints, c10::optional<torch::Tensor> b, const std::string& small_op,
         Tensors small_tensors, Ints small_ints, int64_t rows)
      : name(std::move(op)), t(std::move(tensors)), i(std::move(ints)), bias(std::move(b)) {
    kernel = kernel_named(name);
    if (!small_op.empty()) {
      small = kernel_named(small_op);
      small_t = std::move(small_tensors);
      small_i = std::move(small_ints);
      small_rows = rows;
    }
  }

  bool takes_small(const torch::Tensor& x) const { return small != nullptr && x.size(0) <= small_rows; }

  torch::Tensor finish(torch::Tensor y, const torch::Tensor& x) const {
    if (bias.has_value()) y = y + *bias;
    return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    return finish(takes_small(x) ? small(x, small_t, small_i) : kernel(x, t, i), x);
  }
};

// Several layers on one input: w8_linear_i16_multi where all are W8 × int16 (q, k, v; gate, up):
// the input rounded once, one parallel loop, the same values as separate calls; else one call each.
std::vector<torch::Tensor> shared_input(const std::vector<const Linear*>& layers, const torch::Tensor& x) {
  bool multi = true;
  for (const Linear* l : layers) multi = multi && l->name == "w8_linear_i16" && !l->takes_small(x);
  std::vector<torch::Tensor> outs;
  if (!multi) {
    for (const Linear* l : layers) outs.push_back((*l)(x));
    return outs;
  }
  std::vector<torch::Tensor> packed, scale;
  std::vector<int64_t> N, group;
  for (const Linear* l : layers) {
    packed.push_back(arg(l->t, 0));
    scale.push_back(arg(l->t, 1));
    N.push_back(l->i.at(0));
    group.push_back(l->i.at(1));
  }
  outs = w8_linear_i16_multi(x, packed, scale, N, group);
  for (size_t k = 0; k < layers.size(); ++k) outs[k] = layers[k]->finish(outs[k], x);
  return outs;
}

}  // namespace

std::vector<std::string> decode_kernels() {
  std::vector<std::string> names;
  for (const auto& entry : kernels()) names.push_back(entry.first);
  return names;
}

class DecodePlan {
 public:
  // linears: q, k, v, o, gate, up, down of every layer, then the head, each as (kernel name, tensors,
  // integers, bias); norms: every layer's input and post-attention (pre-MLP) RMSNorm weights (with
  // output_norms, then those on the attention's and the MLP's outputs), then the final one; qk_norms:
  // none, or every layer's q and k RMSNorm weights (over head_dim, before RoPE: Qwen3, Gemma 3);
  // windows: each layer's sliding window (0: none); local: each layer rotates by the local RoPE
  // (the step's cos_local, sin_local); sm_scale, softcap: the attention's (softcap 0: none).
  // small_ops, small_tensors, small_ints, small_rows: each linear layer's call for small batches
  // ("" where it has none). experts: each layer's number of experts (0: a dense MLP); a mixture's
  // linear layers are its router, then gate, up and down of each expert, in place of gate, up, down;
  // top_k and normalize: how many experts each token runs and whether their weights are renormalized.
  DecodePlan(std::vector<std::string> ops, std::vector<Tensors> tensors, std::vector<Ints> ints,
             std::vector<c10::optional<torch::Tensor>> biases, std::vector<torch::Tensor> norms, int64_t heads,
             int64_t kv_heads, int64_t head_dim, double eps, std::vector<int64_t> windows,
             const std::string& activation, std::vector<torch::Tensor> qk_norms, double sm_scale, double softcap,
             std::vector<bool> local, bool output_norms, std::vector<std::string> small_ops,
             std::vector<Tensors> small_tensors, std::vector<Ints> small_ints, std::vector<int64_t> small_rows,
             std::vector<int64_t> experts, int64_t top_k, bool normalize)
      : norms_(std::move(norms)),
        qk_norms_(std::move(qk_norms)),
        heads_(heads),
        kv_heads_(kv_heads),
        dim_(head_dim),
        eps_(eps),
        sm_scale_(sm_scale),
        softcap_(softcap),
        windows_(std::move(windows)),
        local_(std::move(local)),
        per_layer_(output_norms ? 4 : 2),
        activation_(activation_named(activation)),
        experts_(std::move(experts)),
        top_k_(top_k),
        normalize_(normalize) {
    const size_t n = ops.size();
    layers_ = static_cast<int64_t>(experts_.size());
    size_t expected = 1;  // the head
    for (const int64_t e : experts_) {
      TORCH_CHECK(e == 0 || (e >= top_k && top_k > 0), "DecodePlan: a mixture needs at least top_k > 0 experts");
      first_.push_back(static_cast<int64_t>(expected - 1));
      expected += 4 + (e ? 1 + 3 * e : 3);
    }
    TORCH_CHECK(n == expected && tensors.size() == n && ints.size() == n && biases.size() == n,
                "DecodePlan: q, k, v, o and gate, up, down (or a router and each expert's three) per decoder layer, "
                "and a head, each with tensors, integers and a bias");
    TORCH_CHECK(norms_.size() == static_cast<size_t>(per_layer_ * layers_ + 1),
                "DecodePlan: two norms per layer (four with output norms) and a final one");
    TORCH_CHECK(windows_.size() == static_cast<size_t>(layers_) && local_.size() == static_cast<size_t>(layers_),
                "DecodePlan: one window and one RoPE choice per layer");
    TORCH_CHECK(sm_scale > 0 && softcap >= 0, "DecodePlan: the attention scale must be positive, the soft cap >= 0");
    for (const auto& w : norms_)
      TORCH_CHECK(w.dim() == 1 && w.scalar_type() == norms_[0].scalar_type(),
                  "DecodePlan: norm weights are vectors of one dtype");
    TORCH_CHECK(qk_norms_.empty() || qk_norms_.size() == static_cast<size_t>(2 * layers_),
                "DecodePlan: no q/k norms, or two per layer");
    for (const auto& w : qk_norms_)
      TORCH_CHECK(w.dim() == 1 && w.size(0) == head_dim && w.scalar_type() == norms_[0].scalar_type(),
                  "DecodePlan: q/k norm weights are (head_dim,) vectors of the norms' dtype");
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0, "DecodePlan: bad head counts");
    TORCH_CHECK(small_ops.size() == n && small_tensors.size() == n && small_ints.size() == n && small_rows.size() == n,
                "DecodePlan: one small-batch call (or none) per linear layer");
    for (size_t k = 0; k < n; ++k)
      linears_.emplace_back(ops[k], std::move(tensors[k]), std::move(ints[k]), biases[k], small_ops[k],
                            std::move(small_tensors[k]), std::move(small_ints[k]), small_rows[k]);
  }

  // x (M, hidden), the model's dtype: the new tokens' embeddings (the residual stream: overwritten); cos, sin
  // (1, M, head_dim) of their positions, cos_local, sin_local the same by the local RoPE (where a layer uses
  // it); the caches (layers, blocks, block_size, Hkv, D) and int8 scales; slots (M,) where each token's keys
  // go; tables (M, W) int32 and lens (M,) int32 of each sequence. Returns the logits of rows logits_at.
  torch::Tensor step(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, c10::optional<torch::Tensor> cos_local,
                     c10::optional<torch::Tensor> sin_local, torch::Tensor k_cache, torch::Tensor v_cache,
                     c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale, torch::Tensor slots,
                     torch::Tensor tables, torch::Tensor lens, torch::Tensor logits_at) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == norms_[0].scalar_type() && x.is_contiguous(),
                "DecodePlan.step: x must be (M, hidden) in the norms' dtype, contiguous");
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == layers_, "DecodePlan.step: the cache must hold ", layers_,
                " layers");
    const int64_t M = x.size(0);
    for (int64_t i = 0; i < layers_; ++i)
      TORCH_CHECK(!local_[i] || (cos_local.has_value() && sin_local.has_value()),
                  "DecodePlan.step: layer ", i, " rotates by the local RoPE: pass cos_local and sin_local");
    auto layer_of = [](const c10::optional<torch::Tensor>& t, int64_t i) -> c10::optional<torch::Tensor> {
      return t.has_value() ? c10::optional<torch::Tensor>(t->select(0, i)) : c10::nullopt;
    };
    for (int64_t i = 0; i < layers_; ++i) {
      const Linear* l = &linears_[first_[i]];
      const torch::Tensor* norm = &norms_[per_layer_ * i];  // input, pre-MLP (, attention output, MLP output)
      const torch::Tensor h = rms_norm(x, norm[0], eps_);
      auto qkv = shared_input({l, l + 1, l + 2}, h);
      torch::Tensor q = qkv[0].view({1, M, heads_, dim_}), k = qkv[1].view({1, M, kv_heads_, dim_});
      if (!qk_norms_.empty()) {
        q = rms_norm(q, qk_norms_[2 * i], eps_);
        k = rms_norm(k, qk_norms_[2 * i + 1], eps_);
      }
      const torch::Tensor& c = local_[i] ? *cos_local : cos;
      const torch::Tensor& s = local_[i] ? *sin_local : sin;
      q = rope(q, c, s)[0];
      k = rope(k, c, s)[0];
      const torch::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);
      const auto ks = layer_of(k_scale, i), vs = layer_of(v_scale, i);
      paged_write(kc, vc, slots, k, qkv[2].view({M, kv_heads_, dim_}), ks, vs);
      const torch::Tensor out = paged_attention(q, kc, vc, tables, lens, sm_scale_, ks, vs, windows_[i], softcap_);
      const torch::Tensor attn = l[3](out.reshape({M, heads_ * dim_}));
      x.add_(per_layer_ == 4 ? rms_norm(attn, norm[2], eps_) : attn);  // in place: the same sums, no new tensor
      const torch::Tensor h2 = rms_norm(x, norm[1], eps_);
      const torch::Tensor mlp = experts_[i] ? mixture(l + 4, experts_[i], h2) : gated(l + 4, h2);
      x.add_(per_layer_ == 4 ? rms_norm(mlp, norm[3], eps_) : mlp);
    }
    return linears_.back()(rms_norm(x, norms_.back(), eps_).index_select(0, logits_at));
  }

  int64_t num_layers() const { return layers_; }

 private:
  // down(act(gate(h)) · up(h)): l points at gate, up, down.
  torch::Tensor gated(const Linear* l, const torch::Tensor& h) const {
    auto gate_up = shared_input({l, l + 1}, h);
    return l[2](activate_mul(gate_up[0], gate_up[1]));
  }

  // tuili.models.llama.SparseMoE's forward: softmax of the router's logits in fp32, the top_k per
  // row (renormalized where asked) in h's dtype; each expert some row chose, in ascending order,
  // runs on its rows (row-major, as torch.where lists them) and adds its weighted output there.
  torch::Tensor mixture(const Linear* l, int64_t experts, const torch::Tensor& h) const {
    const torch::Tensor probs = at::softmax(l[0](h), -1, at::kFloat);
    auto [weights, chosen] = at::topk(probs, top_k_, -1);
    if (normalize_) weights = weights / weights.sum(-1, true);
    weights = weights.to(h.scalar_type());
    const int64_t M = h.size(0);
    std::vector<std::vector<int64_t>> rows(experts), slots(experts);
    const auto picked = chosen.accessor<int64_t, 2>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t s = 0; s < top_k_; ++s) {
        const int64_t e = picked[r][s];
        TORCH_CHECK(e >= 0 && e < experts, "DecodePlan: the router chose expert ", e, " of ", experts);
        rows[e].push_back(r);
        slots[e].push_back(s);
      }
    torch::Tensor out = at::zeros_like(h);
    const auto as_index = [](std::vector<int64_t>& v) {
      return torch::from_blob(v.data(), {static_cast<int64_t>(v.size())}, torch::kLong);  // v outlives its use
    };
    for (int64_t e = 0; e < experts; ++e) {
      if (rows[e].empty()) continue;
      const torch::Tensor token = as_index(rows[e]), slot = as_index(slots[e]);
      const torch::Tensor w = weights.index({token, slot}).unsqueeze(-1);
      out.index_add_(0, token, (gated(l + 1 + 3 * e, h.index_select(0, token)) * w).to(out.scalar_type()));
    }
    return out;
  }

  // act(gate) · up over gate, as the model's MLP computes it (ACT_MUL_ in tuili.models.llama).
  torch::Tensor activate_mul(torch::Tensor& gate, const torch::Tensor& up) const {
    switch (activation_) {
      case Activation::SiLU: return silu_mul_(gate, up);
      case Activation::GELU: return at::gelu_(gate, "none").mul_(up);
      case Activation::GELUTanh: return at::gelu_(gate, "tanh").mul_(up);
      case Activation::ReLU: return at::relu_(gate).mul_(up);
    }
    return gate.mul_(up);
  }

  std::vector<Linear> linears_;
  std::vector<torch::Tensor> norms_, qk_norms_;
  int64_t layers_ = 0, heads_, kv_heads_, dim_;
  double eps_, sm_scale_, softcap_;
  std::vector<int64_t> windows_;
  std::vector<bool> local_;
  int64_t per_layer_;  // norms per layer: 2, or 4 with output norms
  Activation activation_;
  std::vector<int64_t> experts_;  // per layer: 0 for a dense MLP
  std::vector<int64_t> first_;    // per layer: the index of its q projection in linears_
  int64_t top_k_;
  bool normalize_;
};

void bind_decode_plan(py::module_& m) {
  py::class_<DecodePlan>(m, "DecodePlan", "A Llama-family decode step in one C++ call (built by tuili.engine.step)")
      .def(py::init<std::vector<std::string>, std::vector<Tensors>, std::vector<Ints>,
                    std::vector<c10::optional<torch::Tensor>>, std::vector<torch::Tensor>, int64_t, int64_t, int64_t,
                    double, std::vector<int64_t>, const std::string&, std::vector<torch::Tensor>, double, double,
                    std::vector<bool>, bool, std::vector<std::string>, std::vector<Tensors>, std::vector<Ints>,
                    std::vector<int64_t>, std::vector<int64_t>, int64_t, bool>())
      .def("step", &DecodePlan::step, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_layers", &DecodePlan::num_layers);
  m.def("decode_kernels", &decode_kernels, "the kernel names a DecodePlan's linear layers may call");
}

}  // namespace tuili
