// Fused reward head + pairwise loss kernels, the decomposition of kernels/reward_loss.py's Triton ones: forward = one
// block per scored row + the pair kernel; backward = one kernel (scored columns + zero rows). fp32 accumulation
// whatever the storage dtype.
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
                                  float* __restrict__ rewards, float* __restrict__ rstd_out, int* __restrict__ row_ok,
                                  int64_t num_scored, int64_t n_rows, int64_t n_cols, int64_t stride_t, float eps,
                                  bool check) {
  __shared__ float smem[33];
  const int64_t s = blockIdx.x;
  int64_t row = idx[s];
  int ok = 1;
  if (check) {
    // in bounds, and no other entry names the same row (it would give that gradient row two writers); a bad row
    // is flagged and row 0 read instead, so the launch never faults
    float same = 0.f;
    for (int64_t i = threadIdx.x; i < num_scored; i += blockDim.x) same += idx[i] == row ? 1.f : 0.f;
    same = block_sum(same, smem);  // every thread takes part (it synchronises the block)
    ok = row >= 0 && row < n_rows && same == 1.f;
    if (!ok) row = 0;
  }
  const T* x = hidden + row * stride_t;
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
    row_ok[s] = ok;
  }
}

// Thread s of the grid writes coef[s] = dloss/dr_s: a pair adds -sigmoid(-d)/P to its chosen reward and
// +sigmoid(-d)/P to its rejected one. Pairs are staged kThreads at a time in shared memory (each pair's slope and
// loss term computed once per block), then every thread scans the chunk in order (deterministic, no atomics).
// Block 0 also writes the loss, the accuracy and the index-check verdict (row_ok == nullptr: verdict 1).
__global__ void pair_loss_kernel(const float* __restrict__ r, const int64_t* __restrict__ pairs,
                                 const float* __restrict__ margin, const int* __restrict__ row_ok, float* loss,
                                 float* acc, int* ok, float* __restrict__ coef, int64_t num_scored, int64_t num_pairs,
                                 float center) {
  __shared__ float smem[33];
  __shared__ int64_t chosen[kThreads], rejected[kThreads];
  __shared__ float slope[kThreads];  // sigmoid(-d) of each staged pair, 0 for an out-of-range one
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float c = 0.f, l = 0.f, correct = 0.f, bad = 0.f;
  for (int64_t base = 0; base < num_pairs; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    int64_t ic = -1, ir = -1;
    float sig_neg = 0.f;
    if (p < num_pairs) {
      ic = pairs[2 * p];
      ir = pairs[2 * p + 1];
      if (ic < 0 || ic >= num_scored || ir < 0 || ir >= num_scored) {
        bad += 1.f;
        ic = ir = -1;  // matches no row and is never dereferenced
      } else {
        float d = r[ic] - r[ir];
        correct += d > 0.f ? 1.f : 0.f;
        if (margin != nullptr) d -= margin[p];
        // softplus(-d) = -logsigmoid(d) and its slope sigmoid(-d), both from e = exp(-|d|) <= 1: no overflow
        const float e = expf(-fabsf(d));
        l += fmaxf(-d, 0.f) + log1pf(e);
        sig_neg = (d > 0.f ? e : 1.f) / (1.f + e);
      }
    }
    chosen[threadIdx.x] = ic;
    rejected[threadIdx.x] = ir;
    slope[threadIdx.x] = sig_neg;
    __syncthreads();
    const int64_t staged = num_pairs - base < blockDim.x ? num_pairs - base : blockDim.x;
    for (int64_t k = 0; k < staged; ++k) {
      c += (chosen[k] == s ? -slope[k] : 0.f) + (rejected[k] == s ? slope[k] : 0.f);
    }
    __syncthreads();
  }
  if (s < num_scored) {
    coef[s] = c / static_cast<float>(num_pairs) + 2.f * center * r[s] / static_cast<float>(num_scored);
  }
  if (blockIdx.x != 0) return;
  float sq = 0.f;
  for (int64_t i = threadIdx.x; i < num_scored; i += blockDim.x) {
    sq += r[i] * r[i];
    if (row_ok != nullptr && row_ok[i] == 0) bad += 1.f;
  }
  l = block_sum(l, smem);
  correct = block_sum(correct, smem);
  sq = block_sum(sq, smem);
  bad = block_sum(bad, smem);
  if (threadIdx.x == 0) {
    *loss = l / static_cast<float>(num_pairs) + center * sq / static_cast<float>(num_scored);
    *acc = correct / static_cast<float>(num_pairs);
    *ok = row_ok == nullptr || bad == 0.f;
  }
}

constexpr int kColTile = 64;                   // columns per scored-columns block
constexpr int kRowLanes = kThreads / kColTile;  // scored rows in flight per block
constexpr int kZeroRows = 8;                   // gradient rows per zero block

// Columns [tile * kColTile, +kColTile) of every scored row: dL/dhidden there, and the column sums of dw/dg taken
// over the S rows in registers + one small shared-memory step (deterministic, no [S, H] partials).
template <typename T, typename W>
__device__ void scored_columns(int64_t tile, const T* hidden, const int64_t* idx, const W* w, const W* b, const W* g,
                               const float* rewards, const float* rstd, const float* coef, const float* dloss,
                               const float* drewards, T* dhidden, W* dw, W* dg, W* db, int64_t num_scored,
                               int64_t n_cols, int64_t stride_t) {
  __shared__ float part[kRowLanes][kColTile];
  __shared__ float smem[33];
  const int lane = threadIdx.x / kColTile, col = threadIdx.x % kColTile;
  const int64_t c = tile * kColTile + col;
  const bool in = c < n_cols;
  const float wv = in ? to_f(w[c]) : 0.f;
  const float gv = in && g != nullptr ? to_f(g[c]) : 1.f;
  const float bias = to_f(b[0]), dl = dloss[0];
  float acc = 0.f, g_sum = 0.f;  // sum_s dL/dr_s * xhat_s[c]; sum_s dL/dr_s
  for (int64_t s = lane; s < num_scored; s += kRowLanes) {
    float g_r = coef[s] * dl;
    if (drewards != nullptr) g_r += drewards[s];
    g_sum += g_r;
    if (!in) continue;
    const int64_t row = idx[s];
    const float xv = to_f(hidden[row * stride_t + c]);
    float xh = xv, dx = g_r * wv * gv;
    if (g != nullptr) {
      // mean(dL/dxhat * xhat) = g_r * (r_s - b) / H, known from the forward: one pass over the row suffices
      const float rs = rstd[s], proj = g_r * (rewards[s] - bias) / static_cast<float>(n_cols);
      xh = xv * rs;
      dx = rs * (dx - xh * proj);
    }
    acc += g_r * xh;
    dhidden[row * n_cols + c] = from_f<T>(dx);
  }
  part[lane][col] = acc;
  __syncthreads();
  if (lane == 0 && in) {
    float sum = 0.f;
    for (int k = 0; k < kRowLanes; ++k) sum += part[k][col];
    dw[c] = from_f<W>(sum * gv);  // gv = 1 without a norm
    if (g != nullptr) dg[c] = from_f<W>(sum * wv);
  }
  if (tile == 0) {
    const float total = block_sum(col == 0 ? g_sum : 0.f, smem);  // one copy of each lane's row sum
    if (threadIdx.x == 0) db[0] = from_f<W>(total);
  }
}

// Rows [z * kZeroRows, +kZeroRows) of dL/dhidden get zeros unless scored (those belong to scored_columns); 16-byte
// stores when rows are 16-byte aligned.
template <typename T>
__device__ void zero_unscored_rows(int64_t z, const int64_t* idx, T* dhidden, int64_t num_scored, int64_t n_rows,
                                   int64_t n_cols) {
  __shared__ int keep[kZeroRows];
  const int64_t r0 = z * kZeroRows;
  if (threadIdx.x < kZeroRows) keep[threadIdx.x] = r0 + threadIdx.x < n_rows;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < num_scored; i += blockDim.x) {
    const int64_t row = idx[i];
    if (row >= r0 && row < r0 + kZeroRows) keep[row - r0] = 0;
  }
  __syncthreads();
  const int64_t row_bytes = n_cols * static_cast<int64_t>(sizeof(T));
  const bool vec = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(dhidden) % 16 == 0;
  for (int r = 0; r < kZeroRows; ++r) {
    if (!keep[r]) continue;
    T* out = dhidden + (r0 + r) * n_cols;
    if (vec) {
      uint4* out4 = reinterpret_cast<uint4*>(out);
      for (int64_t v = threadIdx.x; v < row_bytes / 16; v += blockDim.x) out4[v] = make_uint4(0u, 0u, 0u, 0u);
    } else {
      for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) out[c] = from_f<T>(0.f);
    }
  }
}

// The whole backward in one launch: blocks [0, n_col_tiles) handle the scored rows and the parameter gradients, the
// rest write the zeros of every other row, so each row of the uninitialised contiguous [T, H] gradient has exactly
// one writer and no separate fill precedes the kernel.
template <typename T, typename W>
__global__ void reward_bwd_kernel(const T* __restrict__ hidden, const int64_t* __restrict__ idx,
                                  const W* __restrict__ w, const W* __restrict__ b, const W* __restrict__ g,
                                  const float* __restrict__ rewards, const float* __restrict__ rstd,
                                  const float* __restrict__ coef, const float* __restrict__ dloss,
                                  const float* __restrict__ drewards, T* __restrict__ dhidden, W* dw, W* dg, W* db,
                                  int64_t num_scored, int64_t n_rows, int64_t n_cols, int64_t stride_t,
                                  int64_t n_col_tiles) {
  if (blockIdx.x < n_col_tiles) {
    scored_columns<T, W>(blockIdx.x, hidden, idx, w, b, g, rewards, rstd, coef, dloss, drewards, dhidden, dw, dg, db,
                         num_scored, n_cols, stride_t);
  } else {
    zero_unscored_rows<T>(blockIdx.x - n_col_tiles, idx, dhidden, num_scored, n_rows, n_cols);
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
                              const void* g, DType wt, float* rewards, float* rstd, int* row_ok, int64_t num_scored,
                              int64_t n_rows, int64_t n_cols, int64_t stride_t, float eps, bool check,
                              cudaStream_t stream) {
  dispatch(ht, [&](auto th) {
    dispatch(wt, [&](auto tw) {
      using T = typename decltype(th)::type;
      using W = typename decltype(tw)::type;
      reward_fwd_kernel<T, W><<<static_cast<unsigned>(num_scored), kThreads, 0, stream>>>(
          static_cast<const T*>(hidden), idx, static_cast<const W*>(w), static_cast<const W*>(b),
          static_cast<const W*>(g), rewards, rstd, row_ok, num_scored, n_rows, n_cols, stride_t, eps, check);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_pair_loss(const float* rewards, const int64_t* pairs, const float* margin, const int* row_ok,
                             float* loss, float* acc, int* ok, float* coef, int64_t num_scored, int64_t num_pairs,
                             float center, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((num_scored + kThreads - 1) / kThreads);
  pair_loss_kernel<<<blocks, kThreads, 0, stream>>>(rewards, pairs, margin, row_ok, loss, acc, ok, coef, num_scored,
                                                    num_pairs, center);
  return cudaGetLastError();
}

cudaError_t launch_reward_bwd(const void* hidden, DType ht, const int64_t* idx, const void* w, const void* b,
                              const void* g, DType wt, const float* rewards, const float* rstd, const float* coef,
                              const float* dloss, const float* drewards, void* dhidden, void* dw, void* dg, void* db,
                              int64_t num_scored, int64_t n_rows, int64_t n_cols, int64_t stride_t,
                              cudaStream_t stream) {
  const int64_t col_tiles = (n_cols + kColTile - 1) / kColTile;
  const unsigned blocks = static_cast<unsigned>(col_tiles + (n_rows + kZeroRows - 1) / kZeroRows);
  dispatch(ht, [&](auto th) {
    dispatch(wt, [&](auto tw) {
      using T = typename decltype(th)::type;
      using W = typename decltype(tw)::type;
      reward_bwd_kernel<T, W><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(hidden), idx, static_cast<const W*>(w), static_cast<const W*>(b),
          static_cast<const W*>(g), rewards, rstd, coef, dloss, drewards, static_cast<T*>(dhidden),
          static_cast<W*>(dw), static_cast<W*>(dg), static_cast<W*>(db), num_scored, n_rows, n_cols, stride_t,
          col_tiles);
    });
  });
  return cudaGetLastError();
}

}  // namespace vlr
