// Launchers of the plain CUDA kernels in peer_cuda.cu (float and double; one block per token).
// Raw pointers and sizes only, so peer_cuda.cu needs no torch headers and compiles with nvcc alone;
// peer_cuda_binding.cpp checks and allocates the tensors. Outputs marked "zeroed" must be zero-filled
// by the caller (they are accumulated with atomics).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace peer {
namespace cuda {

// Element strides of queries (T, h, 2, dk) whose dk-vectors are contiguous.
struct QueryStrides {
  int64_t token, head, half;
};

// queries, keys (key_heads, n, 2, dk) -> scores (T, h, k) descending, ids (T, h, k) = a*n + b.
template <typename scalar_t>
void retrieval_forward(const scalar_t* queries, QueryStrides strides, const scalar_t* keys, scalar_t* scores,
                       int64_t* ids, int64_t tokens, int heads, int key_heads, int n, int dk, int k, int k_sub,
                       cudaStream_t stream);

// dscores (T, h, k) -> dqueries (T, h, 2, dk) contiguous, dkeys (key_heads, n, 2, dk) zeroed.
template <typename scalar_t>
void retrieval_backward(const scalar_t* dscores, const scalar_t* queries, QueryStrides strides, const scalar_t* keys,
                        const int64_t* ids, scalar_t* dqueries, scalar_t* dkeys, int64_t tokens, int heads,
                        int key_heads, int n, int dk, int k, cudaStream_t stream);

// Over groups of k: gates from scores, and dscores from dgates.
template <typename scalar_t>
void gates_forward(const scalar_t* scores, scalar_t* gates, int64_t groups, int k, int gating, cudaStream_t stream);
template <typename scalar_t>
void gates_backward(const scalar_t* scores, const scalar_t* gates, const scalar_t* dgates, scalar_t* dscores,
                    int64_t groups, int k, int gating, cudaStream_t stream);

// x (T, d), ids / gates (T, slots), w_down / w_up (E, d) -> y (T, d), z (T, slots).
template <typename scalar_t>
void experts_forward(const scalar_t* x, const int64_t* ids, const scalar_t* gates, const scalar_t* w_down,
                     const scalar_t* w_up, scalar_t* y, scalar_t* z, int64_t tokens, int slots, int d, int activation,
                     cudaStream_t stream);

// -> dx (T, d), dgates (T, slots), dw_down and dw_up (E, d) zeroed.
template <typename scalar_t>
void experts_backward(const scalar_t* dy, const scalar_t* x, const int64_t* ids, const scalar_t* gates,
                      const scalar_t* z, const scalar_t* w_down, const scalar_t* w_up, scalar_t* dx, scalar_t* dgates,
                      scalar_t* dw_down, scalar_t* dw_up, int64_t tokens, int slots, int d, int activation,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace peer
