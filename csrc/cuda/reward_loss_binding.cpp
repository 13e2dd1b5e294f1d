// torch.library registration of the fused reward loss CUDA ops (torch.ops.vlr_kernels.*), so torch.compile can
// trace them (fake implementations are registered in kernels/reward_loss.py). Inputs are checked here with clear
// messages; index bounds are checked by the Python caller without a host sync.
//
// Only device-generic torch headers are used (DeviceGuard, VirtualGuardImpl) so this file also compiles against a
// CPU-only torch install, which is how CI checks it.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "reward_loss.h"

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(t.device()).native_handle());
}

vlr::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return vlr::DType::kF32;
    case at::kHalf: return vlr::DType::kF16;
    case at::kBFloat16: return vlr::DType::kBF16;
    default: TORCH_CHECK(false, "vlr_kernels: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_common(const at::Tensor& hidden, const at::Tensor& scored_index, const at::Tensor& head_weight) {
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 2 && hidden.stride(1) == 1,
              "vlr_kernels: hidden must be a CUDA [T, H] tensor with unit stride along H");
  TORCH_CHECK(scored_index.is_cuda() && scored_index.scalar_type() == at::kLong && scored_index.dim() == 1 &&
                  scored_index.is_contiguous() && scored_index.numel() > 0,
              "vlr_kernels: scored_index must be a non-empty contiguous CUDA int64 [S] tensor");
  TORCH_CHECK(head_weight.is_cuda() && head_weight.dim() == 1 && head_weight.size(0) == hidden.size(1) &&
                  head_weight.is_contiguous(),
              "vlr_kernels: head_weight must be a contiguous CUDA [H] tensor");
}

// Head bias and norm weight are cast to the head weight's dtype: one parameter dtype per launch.
at::Tensor as_param(const at::Tensor& t, const at::Tensor& head_weight) {
  return t.to(head_weight.scalar_type()).contiguous();
}

// Returns (rewards [S] f32, rstd [S] f32, row_ok [S] i32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> reward_fwd(const at::Tensor& hidden, const at::Tensor& scored_index,
                                                          const at::Tensor& head_weight, const at::Tensor& head_bias,
                                                          const std::optional<at::Tensor>& norm_weight, double eps,
                                                          bool check) {
  check_common(hidden, scored_index, head_weight);
  c10::DeviceGuard guard(hidden.device());
  const at::Tensor b = as_param(head_bias.reshape({1}), head_weight);
  const at::Tensor g = norm_weight ? as_param(*norm_weight, head_weight) : at::Tensor();
  const int64_t s = scored_index.numel();
  at::Tensor rewards = at::empty({s}, hidden.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({s}, hidden.options().dtype(at::kFloat));
  at::Tensor row_ok = at::empty({s}, hidden.options().dtype(at::kInt));
  const cudaError_t err = vlr::launch_reward_fwd(
      hidden.data_ptr(), dtype_of(hidden, "hidden"), scored_index.data_ptr<int64_t>(), head_weight.data_ptr(),
      b.data_ptr(), g.defined() ? g.data_ptr() : nullptr, dtype_of(head_weight, "head_weight"),
      rewards.data_ptr<float>(), rstd.data_ptr<float>(), row_ok.data_ptr<int>(), s, hidden.size(0), hidden.size(1),
      hidden.stride(0), static_cast<float>(eps), check, current_stream(hidden));
  TORCH_CHECK(err == cudaSuccess, "vlr_kernels::reward_fwd launch failed: ", cudaGetErrorString(err));
  return {rewards, rstd, row_ok};
}

// Returns (loss, accuracy, ok (i32, 0 = bad indices; checked only with row_ok), coef = dloss/dr [S] f32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_fwd(
    const at::Tensor& rewards, const at::Tensor& pair_index, const std::optional<at::Tensor>& margin,
    const std::optional<at::Tensor>& row_ok, double center_coef) {
  TORCH_CHECK(rewards.is_cuda() && rewards.scalar_type() == at::kFloat && rewards.is_contiguous(),
              "vlr_kernels: rewards must be contiguous CUDA float32");
  TORCH_CHECK(pair_index.is_cuda() && pair_index.scalar_type() == at::kLong && pair_index.dim() == 2 &&
                  pair_index.size(1) == 2 && pair_index.size(0) > 0 && pair_index.is_contiguous(),
              "vlr_kernels: pair_index must be a non-empty contiguous CUDA int64 [P, 2] tensor");
  TORCH_CHECK(!row_ok || (row_ok->is_cuda() && row_ok->scalar_type() == at::kInt && row_ok->is_contiguous() &&
                          row_ok->numel() == rewards.numel()),
              "vlr_kernels: row_ok must be a contiguous CUDA int32 [S] tensor");
  c10::DeviceGuard guard(rewards.device());
  const at::Tensor m = margin ? margin->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor loss = at::empty({}, rewards.options());
  at::Tensor acc = at::empty({}, rewards.options());
  at::Tensor ok = at::empty({}, rewards.options().dtype(at::kInt));
  at::Tensor coef = at::empty_like(rewards);
  const cudaError_t err = vlr::launch_pair_loss(
      rewards.data_ptr<float>(), pair_index.data_ptr<int64_t>(), m.defined() ? m.data_ptr<float>() : nullptr,
      row_ok ? row_ok->data_ptr<int>() : nullptr, loss.data_ptr<float>(), acc.data_ptr<float>(), ok.data_ptr<int>(),
      coef.data_ptr<float>(), rewards.numel(), pair_index.size(0), static_cast<float>(center_coef),
      current_stream(rewards));
  TORCH_CHECK(err == cudaSuccess, "vlr_kernels::pair_loss_fwd launch failed: ", cudaGetErrorString(err));
  return {loss, acc, ok, coef};
}

// Returns (dhidden, dhead_weight, dhead_bias [1], dnorm_weight); dnorm_weight is empty without a norm weight.
// dhidden is allocated uninitialised: the kernel writes every row (no fill kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reward_loss_bwd(
    const at::Tensor& dloss, const std::optional<at::Tensor>& drewards, const at::Tensor& hidden,
    const at::Tensor& scored_index, const at::Tensor& head_weight, const at::Tensor& head_bias,
    const std::optional<at::Tensor>& norm_weight, const at::Tensor& rewards, const at::Tensor& rstd,
    const at::Tensor& coef) {
  check_common(hidden, scored_index, head_weight);
  const int64_t s = scored_index.numel(), h = hidden.size(1);
  for (const at::Tensor* t : {&rewards, &rstd, &coef}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == s,
                "vlr_kernels: rewards, rstd and coef must be contiguous CUDA float32 [S] tensors");
  }
  c10::DeviceGuard guard(hidden.device());
  const at::Tensor b = as_param(head_bias.reshape({1}), head_weight);
  const at::Tensor g = norm_weight ? as_param(*norm_weight, head_weight) : at::Tensor();
  const at::Tensor dl = dloss.to(at::kFloat).contiguous();
  const at::Tensor dr_in = drewards ? drewards->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dhidden = at::empty({hidden.size(0), h}, hidden.options());
  at::Tensor dw = at::empty_like(head_weight);
  at::Tensor dg = g.defined() ? at::empty_like(g) : at::empty({0}, head_weight.options());
  at::Tensor db = at::empty({1}, head_weight.options());
  const cudaError_t err = vlr::launch_reward_bwd(
      hidden.data_ptr(), dtype_of(hidden, "hidden"), scored_index.data_ptr<int64_t>(), head_weight.data_ptr(),
      b.data_ptr(), g.defined() ? g.data_ptr() : nullptr, dtype_of(head_weight, "head_weight"),
      rewards.data_ptr<float>(), rstd.data_ptr<float>(), coef.data_ptr<float>(), dl.data_ptr<float>(),
      dr_in.defined() ? dr_in.data_ptr<float>() : nullptr, dhidden.data_ptr(), dw.data_ptr(),
      g.defined() ? dg.data_ptr() : nullptr, db.data_ptr(), s, hidden.size(0), h, hidden.stride(0),
      current_stream(hidden));
  TORCH_CHECK(err == cudaSuccess, "vlr_kernels::reward_loss_bwd launch failed: ", cudaGetErrorString(err));
  return {dhidden, dw, db.to(head_bias.scalar_type()),
          norm_weight ? dg.to(norm_weight->scalar_type()) : dg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlr_kernels, m) {
  m.def("reward_fwd(Tensor hidden, Tensor scored_index, Tensor head_weight, Tensor head_bias, "
        "Tensor? norm_weight, float eps, bool check) -> (Tensor, Tensor, Tensor)");
  m.def("pair_loss_fwd(Tensor rewards, Tensor pair_index, Tensor? margin, Tensor? row_ok, float center_coef) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("reward_loss_bwd(Tensor dloss, Tensor? drewards, Tensor hidden, Tensor scored_index, Tensor head_weight, "
        "Tensor head_bias, Tensor? norm_weight, Tensor rewards, Tensor rstd, Tensor coef) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vlr_kernels, CUDA, m) {
  m.impl("reward_fwd", &reward_fwd);
  m.impl("pair_loss_fwd", &pair_loss_fwd);
  m.impl("reward_loss_bwd", &reward_loss_bwd);
}
