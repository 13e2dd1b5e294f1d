// Fused reward head + pairwise loss: CUDA launchers (raw pointers, no torch headers, so nvcc compiles the .cu alone).
// Tensor checks, allocation and the torch.library registration live in reward_loss_binding.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vlr {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// rewards[s] = rstd_s * dot(hidden[idx[s]], w * g) + b; rstd_s = 1 without g (norm weight).
// hidden rows have `stride_t` elements between them and unit stride along H; w, b, g share dtype `wt`.
cudaError_t launch_reward_fwd(const void* hidden, DType ht, const int64_t* idx, const void* w, const void* b,
                              const void* g, DType wt, float* rewards, float* rstd, int64_t num_scored,
                              int64_t n_cols, int64_t stride_t, float eps, cudaStream_t stream);

// loss = mean_p softplus(-(r_c - r_r - margin_p)) + center * mean_s r_s^2;  acc = mean_p [r_c > r_r].
// margin may be null (float32 otherwise).
cudaError_t launch_pair_loss(const float* rewards, const int64_t* pairs, const float* margin, float* loss,
                             float* acc, int64_t num_scored, int64_t num_pairs, float center, cudaStream_t stream);

// Backward. dhidden must be zero-filled by the caller (only scored rows are written). drewards and margin may be
// null; g null means no norm (dg then untouched). dw_part/dg_part are float32 [num_scored, n_cols] scratch.
// Writes dw [n_cols], dg [n_cols], db [1] in dtype `wt`.
cudaError_t launch_reward_bwd(const void* hidden, DType ht, const int64_t* idx, const int64_t* pairs,
                              const float* margin, const void* w, const void* b, const void* g, DType wt,
                              const float* rewards, const float* rstd, const float* dloss, const float* drewards,
                              void* dhidden, float* dr, float* dw_part, float* dg_part, void* dw, void* dg, void* db,
                              int64_t num_scored, int64_t num_pairs, int64_t n_cols, int64_t stride_t,
                              int64_t stride_dt, float center, cudaStream_t stream);

}  // namespace vlr
