// Fused reward head + pairwise loss: CUDA launchers (raw pointers, no torch headers, so nvcc compiles the .cu alone).
// Tensor checks, allocation and the torch.library registration live in reward_loss_binding.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vlr {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// rewards[s] = rstd_s * dot(hidden[idx[s]], w * g) + b; rstd_s = 1 without g (norm weight).
// hidden rows have `stride_t` elements between them and unit stride along H; w, b, g share dtype `wt`.
// row_ok[s] = 0 when `check` finds idx[s] outside [0, n_rows) or repeated in idx (1 otherwise, and without check).
cudaError_t launch_reward_fwd(const void* hidden, DType ht, const int64_t* idx, const void* w, const void* b,
                              const void* g, DType wt, float* rewards, float* rstd, int* row_ok, int64_t num_scored,
                              int64_t n_rows, int64_t n_cols, int64_t stride_t, float eps, bool check,
                              cudaStream_t stream);

// loss = mean_p softplus(-(r_c - r_r - margin_p)) + center * mean_s r_s^2;  acc = mean_p [r_c > r_r];
// coef[s] = dloss/dr_s (float32 [num_scored]); ok = 0 when a pair entry is outside [0, num_scored) or (row_ok given)
// a row_ok entry is 0. margin and row_ok may be null (margin float32 otherwise).
cudaError_t launch_pair_loss(const float* rewards, const int64_t* pairs, const float* margin, const int* row_ok,
                             float* loss, float* acc, int* ok, float* coef, int64_t num_scored, int64_t num_pairs,
                             float center, cudaStream_t stream);

// Backward, one kernel. Writes every row of the contiguous [n_rows, n_cols] dhidden (its contents on entry do not
// matter): scored rows get dloss[0] * coef[s] (+ drewards[s]) times dr/dx, the others zeros. drewards may be null;
// g null means no norm (dg then untouched). Writes dw [n_cols], dg [n_cols], db [1] in dtype `wt`.
cudaError_t launch_reward_bwd(const void* hidden, DType ht, const int64_t* idx, const void* w, const void* b,
                              const void* g, DType wt, const float* rewards, const float* rstd, const float* coef,
                              const float* dloss, const float* drewards, void* dhidden, void* dw, void* dg, void* db,
                              int64_t num_scored, int64_t n_rows, int64_t n_cols, int64_t stride_t,
                              cudaStream_t stream);

}  // namespace vlr
