// Per-token math of SPEC section 1 shared by the CPU (peer_cpu.cpp) and CUDA (peer_cuda.cu) builds:
// activations and their derivatives, gating forward/backward over one head's k scores, and the
// deterministic top-k list used by product-key retrieval. Plain C++ (no torch, no CUDA headers) so
// the .cu file compiles with nvcc alone; PEER_HD marks the functions for both host and device.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define PEER_HD __host__ __device__ inline
#else
#define PEER_HD inline
#endif

namespace peer {

#ifndef __CUDACC__
// The float overloads on the host (nvcc provides its own for device code).
using std::erf;
using std::exp;
using std::tanh;
#endif

// Codes shared with the Python side (peer_kernels/csrc.py passes the names, the bindings map them).
enum Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kIdentity = 4 };
enum Gating : int { kSoftmax = 0, kSigmoid = 1, kGateRelu = 2 };

// act(z) and act'(z) together: the backward needs both, the forward only the first.
template <typename acc_t>
PEER_HD void activate(int activation, acc_t z, acc_t* value, acc_t* slope) {
  const acc_t half = acc_t(0.5), one = acc_t(1);
  switch (activation) {
    case kRelu:  // NaN in, NaN out; the slope at NaN is 1, as in torch's relu backward
      *value = z <= acc_t(0) ? acc_t(0) : z;
      *slope = z <= acc_t(0) ? acc_t(0) : one;
      return;
    case kGelu: {  // 0.5 z (1 + erf(z / sqrt 2)); d/dz adds z * standard normal density
      const acc_t cdf = half * (one + erf(z * acc_t(0.70710678118654752440)));
      *value = z * cdf;
      *slope = cdf + z * acc_t(0.39894228040143267794) * exp(-half * z * z);
      return;
    }
    case kGeluTanh: {  // 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
      const acc_t c = acc_t(0.79788456080286535588), cubic = acc_t(0.044715);
      const acc_t th = tanh(c * (z + cubic * z * z * z));
      *value = half * z * (one + th);
      *slope = half * (one + th) + half * z * (one - th * th) * c * (one + acc_t(3) * cubic * z * z);
      return;
    }
    case kSilu: {  // z * sigmoid(z)
      const acc_t s = one / (one + exp(-z));
      *value = z * s;
      *slope = s * (one + z * (one - s));
      return;
    }
    default:  // identity
      *value = z;
      *slope = one;
      return;
  }
}

// gates[0..k) of one head from its scores (softmax normalizes over the head's k experts).
template <typename acc_t>
PEER_HD void gate_forward(int gating, const acc_t* scores, acc_t* gates, int k) {
  if (gating == kSoftmax) {
    acc_t top = scores[0];
    for (int j = 1; j < k; ++j) top = scores[j] > top ? scores[j] : top;
    acc_t total = 0;
    for (int j = 0; j < k; ++j) total += gates[j] = exp(scores[j] - top);
    for (int j = 0; j < k; ++j) gates[j] /= total;
  } else if (gating == kSigmoid) {
    for (int j = 0; j < k; ++j) gates[j] = acc_t(1) / (acc_t(1) + exp(-scores[j]));
  } else {  // relu; NaN in, NaN out
    for (int j = 0; j < k; ++j) gates[j] = scores[j] <= acc_t(0) ? acc_t(0) : scores[j];
  }
}

// dscores[0..k) from dgates through the gating (gates as returned by gate_forward).
template <typename acc_t>
PEER_HD void gate_backward(int gating, const acc_t* scores, const acc_t* gates, const acc_t* dgates,
                           acc_t* dscores, int k) {
  if (gating == kSoftmax) {
    acc_t mean = 0;
    for (int j = 0; j < k; ++j) mean += gates[j] * dgates[j];
    for (int j = 0; j < k; ++j) dscores[j] = gates[j] * (dgates[j] - mean);
  } else if (gating == kSigmoid) {
    for (int j = 0; j < k; ++j) dscores[j] = dgates[j] * gates[j] * (acc_t(1) - gates[j]);
  } else {
    for (int j = 0; j < k; ++j) dscores[j] = scores[j] <= acc_t(0) ? acc_t(0) : dgates[j];
  }
}

// The best `capacity` (score, index) pairs offered so far, kept sorted by the tie rule of
// peer_kernels.reference: higher score first, NaN above every number, and among equal scores (or
// two NaNs) the smaller index first, so the picks never depend on the order of the offers.
template <typename acc_t>
struct TopList {
  acc_t* score;
  int64_t* index;
  int capacity;
  int size;

  PEER_HD static bool better(acc_t s, int64_t i, acc_t than_s, int64_t than_i) {
    // A number against a NaN: both compares are false, so it ranks below.
    if (s != s) return than_s == than_s || i < than_i;
    return s > than_s || (s == than_s && i < than_i);
  }

  PEER_HD void offer(acc_t s, int64_t i) {
    if (size == capacity && !better(s, i, score[size - 1], index[size - 1])) return;
    int at = size < capacity ? size++ : size - 1;
    for (; at > 0 && better(s, i, score[at - 1], index[at - 1]); --at) {
      score[at] = score[at - 1];
      index[at] = index[at - 1];
    }
    score[at] = s;
    index[at] = i;
  }
};

// The k_sub best of scores[0..n) into `best` (an empty TopList of capacity k_sub <= n). Indices come
// in increasing order, so once the list is full an equal score never wins: one compare per score
// (and a NaN, which ranks above everything, always does).
template <typename acc_t>
PEER_HD void top_sub_keys(const acc_t* scores, int n, TopList<acc_t>& best) {
  for (int i = 0; i < best.capacity; ++i) best.offer(scores[i], i);
  acc_t threshold = best.score[best.capacity - 1];
  for (int i = best.capacity; i < n; ++i)
    if (scores[i] > threshold || (scores[i] != scores[i] && threshold == threshold)) {
      best.offer(scores[i], i);
      threshold = best.score[best.capacity - 1];
    }
}

// The best k of the k_sub**2 sums of two halves' full top lists (k_sub entries each, sorted by the tie
// rule), ties going to the candidate whose (rank in the first half, rank in the second) comes first.
// Writes scores[0..k) (descending) and expert ids a*n + b.
template <typename acc_t>
PEER_HD void combine_halves(const TopList<acc_t>& best1, const TopList<acc_t>& best2, int n, int k, acc_t* scores,
                            int64_t* ids) {
  const int k_sub = best1.capacity;
  // The list's index is the pair's rank i * k_sub + j (the tie-breaker), turned into an id after.
  TopList<acc_t> picks{scores, ids, k, 0};
  for (int i = 0; i < k_sub; ++i)
    for (int j = 0; j < k_sub; ++j) picks.offer(best1.score[i] + best2.score[j], int64_t(i) * k_sub + j);
  for (int p = 0; p < k; ++p) ids[p] = best1.index[ids[p] / k_sub] * n + best2.index[ids[p] % k_sub];
}

// Product-key top-k of one (token, head), given its two halves' sub-key scores sub1, sub2 (n each):
// the k_sub best sub-keys per half, then the best k of their k_sub**2 sums, ties going to the
// candidate whose (rank in the first half, rank in the second) comes first. Writes scores[0..k)
// (descending) and expert ids a*n + b. Scratch: 2*k_sub scores and 2*k_sub indices.
template <typename acc_t>
PEER_HD void product_key_topk_one(const acc_t* sub1, const acc_t* sub2, int n, int k_sub, int k,
                                  acc_t* scratch_scores, int64_t* scratch_ids, acc_t* scores, int64_t* ids) {
  TopList<acc_t> best1{scratch_scores, scratch_ids, k_sub, 0};
  TopList<acc_t> best2{scratch_scores + k_sub, scratch_ids + k_sub, k_sub, 0};
  top_sub_keys(sub1, n, best1);
  top_sub_keys(sub2, n, best2);
  combine_halves(best1, best2, n, k, scores, ids);
}

}  // namespace peer
