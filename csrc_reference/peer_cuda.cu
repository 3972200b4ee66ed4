// Plain CUDA kernels of the PEER op after the query projection (SPEC section 1): the hand-written
// CUDA baseline. One block per token, no tiling, no tensor cores: a block computes its token's
// sub-key scores into shared memory, one thread selects the top-k (peer_math.h, as on the CPU), and
// the expert stage gives one warp per (head, expert) dot product and one thread per output column.
// Table gradients (w_down, w_up, keys) are accumulated with atomicAdd into zeroed outputs.
#include <cuda_runtime.h>

#include "peer_cuda.h"
#include "peer_math.h"

namespace peer {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename scalar_t>
__device__ scalar_t warp_sum(scalar_t value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// Block t: token t, one head after the other. Shared memory: top-k scratch ids (2*k_sub int64), then
// the head's sub-key scores (2*n) and top-k scratch scores (2*k_sub).
template <typename scalar_t>
__global__ void retrieval_forward_kernel(const scalar_t* queries, QueryStrides strides, const scalar_t* keys,
                                         scalar_t* scores, int64_t* ids, int heads, int key_heads, int n, int dk,
                                         int k, int k_sub) {
  extern __shared__ int64_t shared[];
  int64_t* scratch_ids = shared;
  scalar_t* sub = reinterpret_cast<scalar_t*>(shared + 2 * k_sub);
  scalar_t* scratch_scores = sub + 2 * n;
  const int64_t t = blockIdx.x;
  for (int h = 0; h < heads; ++h) {
    const int64_t key_head = key_heads == 1 ? 0 : h;
    for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
      const int half = i / n, key = i % n;
      const scalar_t* q = queries + t * strides.token + h * strides.head + half * strides.half;
      const scalar_t* key_row = keys + ((key_head * n + key) * 2 + half) * dk;
      scalar_t s = 0;
      for (int c = 0; c < dk; ++c) s += q[c] * key_row[c];
      sub[i] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t out = (t * heads + h) * k;
      product_key_topk_one<scalar_t>(sub, sub + n, n, k_sub, k, scratch_scores, scratch_ids, scores + out, ids + out);
    }
    __syncthreads();
  }
}

// Block t: token t; thread c owns column c of every (head, half) dk-vector.
template <typename scalar_t>
__global__ void retrieval_backward_kernel(const scalar_t* dscores, const scalar_t* queries, QueryStrides strides,
                                          const scalar_t* keys, const int64_t* ids, scalar_t* dqueries,
                                          scalar_t* dkeys, int heads, int key_heads, int n, int dk, int k) {
  const int64_t t = blockIdx.x;
  for (int h = 0; h < heads; ++h) {
    const int64_t key_head = key_heads == 1 ? 0 : h, first = (t * heads + h) * k;
    for (int half = 0; half < 2; ++half)
      for (int c = threadIdx.x; c < dk; c += blockDim.x) {
        const scalar_t q = queries[t * strides.token + h * strides.head + half * strides.half + c];
        scalar_t dq = 0;
        for (int64_t pick = first; pick < first + k; ++pick) {
          const int64_t sub = half == 0 ? ids[pick] / n : ids[pick] % n;
          const int64_t at = ((key_head * n + sub) * 2 + half) * dk + c;
          dq += dscores[pick] * keys[at];
          atomicAdd(dkeys + at, dscores[pick] * q);
        }
        dqueries[((t * heads + h) * 2 + half) * dk + c] = dq;
      }
  }
}

template <typename scalar_t>
__global__ void gates_forward_kernel(const scalar_t* scores, scalar_t* gates, int64_t groups, int k, int gating) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < groups) gate_forward<scalar_t>(gating, scores + i * k, gates + i * k, k);
}

template <typename scalar_t>
__global__ void gates_backward_kernel(const scalar_t* scores, const scalar_t* gates, const scalar_t* dgates,
                                      scalar_t* dscores, int64_t groups, int k, int gating) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < groups) gate_backward<scalar_t>(gating, scores + i * k, gates + i * k, dgates + i * k, dscores + i * k, k);
}

// Block t: token t. Warps compute z = w_down[e] . x[t] per slot; then thread c sums column c of
// gate * act(z) * w_up[e] over the slots. Shared memory: one coefficient per slot.
template <typename scalar_t>
__global__ void experts_forward_kernel(const scalar_t* x, const int64_t* ids, const scalar_t* gates,
                                       const scalar_t* w_down, const scalar_t* w_up, scalar_t* y, scalar_t* z,
                                       int slots, int d, int activation) {
  extern __shared__ int64_t shared[];
  scalar_t* coef = reinterpret_cast<scalar_t*>(shared);
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int slot = threadIdx.x / kWarp; slot < slots; slot += warps) {
    const int64_t at = t * slots + slot;
    const scalar_t* down = w_down + ids[at] * d;
    scalar_t partial = 0;
    for (int c = lane; c < d; c += kWarp) partial += down[c] * x[t * d + c];
    const scalar_t z_s = warp_sum(partial);
    if (lane == 0) {
      scalar_t a, slope;
      activate<scalar_t>(activation, z_s, &a, &slope);
      z[at] = z_s;
      coef[slot] = gates[at] * a;
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    scalar_t total = 0;
    for (int slot = 0; slot < slots; ++slot) total += coef[slot] * w_up[ids[t * slots + slot] * d + c];
    y[t * d + c] = total;
  }
}

// Block t: token t. Warps compute w = w_up[e] . dy[t] per slot and the slot's scalars; then thread c
// handles column c: dx, and the atomic adds into dw_down / dw_up.
template <typename scalar_t>
__global__ void experts_backward_kernel(const scalar_t* dy, const scalar_t* x, const int64_t* ids,
                                        const scalar_t* gates, const scalar_t* z, const scalar_t* w_down,
                                        const scalar_t* w_up, scalar_t* dx, scalar_t* dgates, scalar_t* dw_down,
                                        scalar_t* dw_up, int slots, int d, int activation) {
  extern __shared__ int64_t shared[];
  scalar_t* dz = reinterpret_cast<scalar_t*>(shared);
  scalar_t* gate_act = dz + slots;
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int slot = threadIdx.x / kWarp; slot < slots; slot += warps) {
    const int64_t at = t * slots + slot;
    const scalar_t* up = w_up + ids[at] * d;
    scalar_t partial = 0;
    for (int c = lane; c < d; c += kWarp) partial += up[c] * dy[t * d + c];
    const scalar_t w = warp_sum(partial);
    if (lane == 0) {
      scalar_t a, slope;
      activate<scalar_t>(activation, z[at], &a, &slope);
      dgates[at] = a * w;
      dz[slot] = gates[at] * w * slope;
      gate_act[slot] = gates[at] * a;
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const scalar_t x_c = x[t * d + c], dy_c = dy[t * d + c];
    scalar_t total = 0;
    for (int slot = 0; slot < slots; ++slot) {
      const int64_t at = ids[t * slots + slot] * d + c;
      total += dz[slot] * w_down[at];
      atomicAdd(dw_down + at, dz[slot] * x_c);
      atomicAdd(dw_up + at, gate_act[slot] * dy_c);
    }
    dx[t * d + c] = total;
  }
}

// Dynamic shared memory above the default 48 KiB needs an opt-in per kernel.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

int64_t blocks_for(int64_t items) { return (items + kThreads - 1) / kThreads; }

}  // namespace

template <typename scalar_t>
void retrieval_forward(const scalar_t* queries, QueryStrides strides, const scalar_t* keys, scalar_t* scores,
                       int64_t* ids, int64_t tokens, int heads, int key_heads, int n, int dk, int k, int k_sub,
                       cudaStream_t stream) {
  if (tokens == 0) return;
  const size_t shared = 2 * k_sub * sizeof(int64_t) + (2 * n + 2 * k_sub) * sizeof(scalar_t);
  allow_shared_memory(retrieval_forward_kernel<scalar_t>, shared);
  retrieval_forward_kernel<scalar_t><<<tokens, kThreads, shared, stream>>>(queries, strides, keys, scores, ids, heads,
                                                                           key_heads, n, dk, k, k_sub);
}

template <typename scalar_t>
void retrieval_backward(const scalar_t* dscores, const scalar_t* queries, QueryStrides strides, const scalar_t* keys,
                        const int64_t* ids, scalar_t* dqueries, scalar_t* dkeys, int64_t tokens, int heads,
                        int key_heads, int n, int dk, int k, cudaStream_t stream) {
  if (tokens == 0) return;
  const int threads = dk < kThreads ? ((dk + kWarp - 1) / kWarp) * kWarp : kThreads;
  retrieval_backward_kernel<scalar_t><<<tokens, threads, 0, stream>>>(dscores, queries, strides, keys, ids, dqueries,
                                                                      dkeys, heads, key_heads, n, dk, k);
}

template <typename scalar_t>
void gates_forward(const scalar_t* scores, scalar_t* gates, int64_t groups, int k, int gating, cudaStream_t stream) {
  if (groups == 0) return;
  gates_forward_kernel<scalar_t><<<blocks_for(groups), kThreads, 0, stream>>>(scores, gates, groups, k, gating);
}

template <typename scalar_t>
void gates_backward(const scalar_t* scores, const scalar_t* gates, const scalar_t* dgates, scalar_t* dscores,
                    int64_t groups, int k, int gating, cudaStream_t stream) {
  if (groups == 0) return;
  gates_backward_kernel<scalar_t><<<blocks_for(groups), kThreads, 0, stream>>>(scores, gates, dgates, dscores, groups,
                                                                               k, gating);
}

template <typename scalar_t>
void experts_forward(const scalar_t* x, const int64_t* ids, const scalar_t* gates, const scalar_t* w_down,
                     const scalar_t* w_up, scalar_t* y, scalar_t* z, int64_t tokens, int slots, int d, int activation,
                     cudaStream_t stream) {
  if (tokens == 0) return;
  const size_t shared = slots * sizeof(scalar_t);
  allow_shared_memory(experts_forward_kernel<scalar_t>, shared);
  experts_forward_kernel<scalar_t><<<tokens, kThreads, shared, stream>>>(x, ids, gates, w_down, w_up, y, z, slots, d,
                                                                         activation);
}

template <typename scalar_t>
void experts_backward(const scalar_t* dy, const scalar_t* x, const int64_t* ids, const scalar_t* gates,
                      const scalar_t* z, const scalar_t* w_down, const scalar_t* w_up, scalar_t* dx, scalar_t* dgates,
                      scalar_t* dw_down, scalar_t* dw_up, int64_t tokens, int slots, int d, int activation,
                      cudaStream_t stream) {
  if (tokens == 0) return;
  const size_t shared = 2 * slots * sizeof(scalar_t);
  allow_shared_memory(experts_backward_kernel<scalar_t>, shared);
  experts_backward_kernel<scalar_t><<<tokens, kThreads, shared, stream>>>(dy, x, ids, gates, z, w_down, w_up, dx,
                                                                          dgates, dw_down, dw_up, slots, d, activation);
}

#define PEER_INSTANTIATE(scalar_t)                                                                                   \
  template void retrieval_forward<scalar_t>(const scalar_t*, QueryStrides, const scalar_t*, scalar_t*, int64_t*,      \
                                            int64_t, int, int, int, int, int, int, cudaStream_t);                     \
  template void retrieval_backward<scalar_t>(const scalar_t*, const scalar_t*, QueryStrides, const scalar_t*,         \
                                             const int64_t*, scalar_t*, scalar_t*, int64_t, int, int, int, int, int,  \
                                             cudaStream_t);                                                            \
  template void gates_forward<scalar_t>(const scalar_t*, scalar_t*, int64_t, int, int, cudaStream_t);                 \
  template void gates_backward<scalar_t>(const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t, int,  \
                                         int, cudaStream_t);                                                           \
  template void experts_forward<scalar_t>(const scalar_t*, const int64_t*, const scalar_t*, const scalar_t*,          \
                                          const scalar_t*, scalar_t*, scalar_t*, int64_t, int, int, int,              \
                                          cudaStream_t);                                                               \
  template void experts_backward<scalar_t>(const scalar_t*, const scalar_t*, const int64_t*, const scalar_t*,         \
                                           const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, scalar_t*,   \
                                           scalar_t*, scalar_t*, int64_t, int, int, int, cudaStream_t);

PEER_INSTANTIATE(float)
PEER_INSTANTIATE(double)

}  // namespace cuda
}  // namespace peer
