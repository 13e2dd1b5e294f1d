// Fused reward head + pairwise loss kernels. One block per scored row; fp32 accumulation whatever the storage dtype.
#include "reward_loss.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vlr {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sum over the block, result in every thread. smem needs 33 floats; the result slot (32) is separate from the
// per-warp slots so back-to-back calls need no trailing barrier.
__device__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? smem[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) smem[32] = v;
  }
  __syncthreads();
  return smem[32];
}

template <typename T, typename W>
__global__ void reward_fwd_kernel(const T* __restrict__ hidden, const int64_t* __restrict__ idx,
                                  const W* __restrict__ w, const W* __restrict__ b, const W* __restrict__ g,
                                  float* __restrict__ rewards, float* __restrict__ rstd_out, int64_t n_cols,
                                  int64_t stride_t, float eps) {
  __shared__ float smem[33];
  const int64_t s = blockIdx.x;
  const T* x = hidden + idx[s] * stride_t;
  float dot = 0.f, sq = 0.f;
  for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) {
    const float xv = to_f(x[c]);
    float wv = to_f(w[c]);
    if (g != nullptr) {
      wv *= to_f(g[c]);
      sq += xv * xv;
    }
    dot += xv * wv;
  }
  dot = block_sum(dot, smem);
  float rstd = 1.f;
  if (g != nullptr) rstd = rsqrtf(block_sum(sq, smem) / static_cast<float>(n_cols) + eps);
  if (threadIdx.x == 0) {
    rewards[s] = dot * rstd + to_f(b[0]);
    rstd_out[s] = rstd;
  }
}

__global__ void pair_loss_kernel(const float* __restrict__ r, const int64_t* __restrict__ pairs,
                                 const float* __restrict__ margin, float* loss, float* acc, int64_t num_scored,
                                 int64_t num_pairs, float center) {
  __shared__ float smem[33];
  float l = 0.f, correct = 0.f, sq = 0.f;
  for (int64_t p = threadIdx.x; p < num_pairs; p += blockDim.x) {
    float d = r[pairs[2 * p]] - r[pairs[2 * p + 1]];
    correct += d > 0.f ? 1.f : 0.f;
    if (margin != nullptr) d -= margin[p];
    l += fmaxf(-d, 0.f) + log1pf(expf(-fabsf(d)));  // softplus(-d) = -logsigmoid(d), no overflow
  }
  for (int64_t i = threadIdx.x; i < num_scored; i += blockDim.x) sq += r[i] * r[i];
  l = block_sum(l, smem);
  correct = block_sum(correct, smem);
  sq = block_sum(sq, smem);
  if (threadIdx.x == 0) {
    *loss = l / static_cast<float>(num_pairs) + center * sq / static_cast<float>(num_scored);
    *acc = correct / static_cast<float>(num_pairs);
  }
}

template <typename T, typename W>
__global__ void reward_bwd_kernel(const T* __restrict__ hidden, const int64_t* __restrict__ idx,
                                  const int64_t* __restrict__ pairs, const float* __restrict__ margin,
                                  const W* __restrict__ w, const W* __restrict__ b, const W* __restrict__ g,
                                  const float* __restrict__ rewards, const float* __restrict__ rstd_in,
                                  const float* __restrict__ dloss, const float* __restrict__ drewards,
                                  T* __restrict__ dhidden, float* __restrict__ dr, float* __restrict__ dw_part,
                                  float* __restrict__ dg_part, int64_t num_scored, int64_t num_pairs, int64_t n_cols,
                                  int64_t stride_t, int64_t stride_dt, float center) {
  __shared__ float smem[33];
  const int64_t s = blockIdx.x;
  // dL/dr_s: every pair adds -sigmoid(-d)/P to its chosen reward and +sigmoid(-d)/P to its rejected one
  float acc = 0.f;
  for (int64_t p = threadIdx.x; p < num_pairs; p += blockDim.x) {
    const int64_t ic = pairs[2 * p], ir = pairs[2 * p + 1];
    if (ic != s && ir != s) continue;
    float d = rewards[ic] - rewards[ir];
    if (margin != nullptr) d -= margin[p];
    const float sig_neg = 1.f / (1.f + expf(d));
    acc += (ic == s ? -sig_neg : 0.f) + (ir == s ? sig_neg : 0.f);
  }
  acc = block_sum(acc, smem);
  const float r_s = rewards[s];
  float g_r = (acc / static_cast<float>(num_pairs) + 2.f * center * r_s / static_cast<float>(num_scored)) * dloss[0];
  if (drewards != nullptr) g_r += drewards[s];
  if (threadIdx.x == 0) dr[s] = g_r;
  const float rstd = rstd_in[s];
  // mean(dL/dxhat * xhat) = g_r * (r_s - b) / H is known from the forward: one pass over the row suffices
  const float proj = g_r * (r_s - to_f(b[0])) / static_cast<float>(n_cols);
  const int64_t row = idx[s];
  const T* x = hidden + row * stride_t;
  T* dx = dhidden + row * stride_dt;
  float* dw_row = dw_part + s * n_cols;
  for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) {
    const float xv = to_f(x[c]), wv = to_f(w[c]);
    float dxv;
    if (g != nullptr) {
      const float gv = to_f(g[c]), xh = xv * rstd;
      dxv = rstd * (g_r * wv * gv - xh * proj);
      dw_row[c] = g_r * xh * gv;
      dg_part[s * n_cols + c] = g_r * xh * wv;
    } else {
      dxv = g_r * wv;
      dw_row[c] = g_r * xv;
    }
    dx[c] = from_f<T>(dxv);
  }
}

// Column sums of the per-row partials (coalesced: adjacent threads, adjacent columns) and db = sum(dr).
template <typename W>
__global__ void param_grad_kernel(const float* __restrict__ dw_part, const float* __restrict__ dg_part,
                                  const float* __restrict__ dr, W* dw, W* dg, W* db, int64_t num_scored,
                                  int64_t n_cols) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < n_cols) {
    float sw = 0.f, sg = 0.f;
    for (int64_t s = 0; s < num_scored; ++s) {
      sw += dw_part[s * n_cols + c];
      if (dg_part != nullptr) sg += dg_part[s * n_cols + c];
    }
    dw[c] = from_f<W>(sw);
    if (dg_part != nullptr) dg[c] = from_f<W>(sg);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    float sb = 0.f;
    for (int64_t s = 0; s < num_scored; ++s) sb += dr[s];
    db[0] = from_f<W>(sb);
  }
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kF32: f(Tag<float>{}); break;
    case DType::kF16: f(Tag<__half>{}); break;
    case DType::kBF16: f(Tag<__nv_bfloat16>{}); break;
  }
}

}  // namespace

cudaError_t launch_reward_fwd(const void* hidden, DType ht, const int64_t* idx, const void* w, const void* b,
                              const void* g, DType wt, float* rewards, float* rstd, int64_t num_scored,
                              int64_t n_cols, int64_t stride_t, float eps, cudaStream_t stream) {
  dispatch(ht, [&](auto th) {
    dispatch(wt, [&](auto tw) {
      using T = typename decltype(th)::type;
      using W = typename decltype(tw)::type;
      reward_fwd_kernel<T, W><<<static_cast<unsigned>(num_scored), kThreads, 0, stream>>>(
          static_cast<const T*>(hidden), idx, static_cast<const W*>(w), static_cast<const W*>(b),
          static_cast<const W*>(g), rewards, rstd, n_cols, stride_t, eps);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_pair_loss(const float* rewards, const int64_t* pairs, const float* margin, float* loss,
                             float* acc, int64_t num_scored, int64_t num_pairs, float center, cudaStream_t stream) {
  pair_loss_kernel<<<1, kThreads * 4, 0, stream>>>(rewards, pairs, margin, loss, acc, num_scored, num_pairs, center);
  return cudaGetLastError();
}

cudaError_t launch_reward_bwd(const void* hidden, DType ht, const int64_t* idx, const int64_t* pairs,
                              const float* margin, const void* w, const void* b, const void* g, DType wt,
                              const float* rewards, const float* rstd, const float* dloss, const float* drewards,
                              void* dhidden, float* dr, float* dw_part, float* dg_part, void* dw, void* dg, void* db,
                              int64_t num_scored, int64_t num_pairs, int64_t n_cols, int64_t stride_t,
                              int64_t stride_dt, float center, cudaStream_t stream) {
  dispatch(ht, [&](auto th) {
    dispatch(wt, [&](auto tw) {
      using T = typename decltype(th)::type;
      using W = typename decltype(tw)::type;
      reward_bwd_kernel<T, W><<<static_cast<unsigned>(num_scored), kThreads, 0, stream>>>(
          static_cast<const T*>(hidden), idx, pairs, margin, static_cast<const W*>(w), static_cast<const W*>(b),
          static_cast<const W*>(g), rewards, rstd, dloss, drewards, static_cast<T*>(dhidden), dr, dw_part,
          g != nullptr ? dg_part : nullptr, num_scored, num_pairs, n_cols, stride_t, stride_dt, center);
    });
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((n_cols + kThreads - 1) / kThreads);
  dispatch(wt, [&](auto tw) {
    using W = typename decltype(tw)::type;
    param_grad_kernel<W><<<blocks, kThreads, 0, stream>>>(dw_part, g != nullptr ? dg_part : nullptr, dr,
                                                          static_cast<W*>(dw), static_cast<W*>(dg),
                                                          static_cast<W*>(db), num_scored, n_cols);
  });
  return cudaGetLastError();
}

}  // namespace vlr
