// Torch-side helpers shared by the CPU extension (peer_cpu.cpp) and the CUDA binding
// (peer_cuda_binding.cpp): the compute dtype and the option names -> peer_math.h codes.
#pragma once

#include <torch/extension.h>

#include <string>

#include "peer_math.h"

namespace peer {

// float64 computes in float64; float32, bfloat16 and float16 in float32.
inline at::ScalarType compute_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline int activation_code(const std::string& name) {
  if (name == "relu") return kRelu;
  if (name == "gelu") return kGelu;
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "silu") return kSilu;
  if (name == "identity") return kIdentity;
  TORCH_CHECK(false, "activation: expected one of relu, gelu, gelu_tanh, silu, identity, got '", name, "'");
}

inline int gating_code(const std::string& name) {
  if (name == "softmax") return kSoftmax;
  if (name == "sigmoid") return kSigmoid;
  if (name == "relu") return kGateRelu;
  TORCH_CHECK(false, "gating: expected one of softmax, sigmoid, relu, got '", name, "'");
}

// A schedule name of peer_kernels.tuning.token_schedule: true for "decode" (few tokens: one token's
// work spread over the threads), false for "token_tiles" (the tokens spread over the threads).
inline bool is_decode(const std::string& schedule) {
  if (schedule == "decode") return true;
  if (schedule == "token_tiles") return false;
  TORCH_CHECK(false, "schedule: expected one of decode, token_tiles, got '", schedule, "'");
}

// The retrieval arguments, for callers that bypass peer_kernels._checks; returns n.
inline int64_t check_retrieval(const at::Tensor& queries, const at::Tensor& keys, int64_t k, int64_t k_sub) {
  TORCH_CHECK(queries.dim() == 4 && queries.size(2) == 2, "queries: expected shape (T, h, 2, dk), got ",
              queries.sizes());
  const int64_t heads = queries.size(1), dk = queries.size(3);
  TORCH_CHECK(heads >= 1 && dk >= 1, "queries: expected at least one head and one feature, got shape ",
              queries.sizes());
  TORCH_CHECK(keys.dim() == 4 && keys.size(2) == 2 && keys.size(3) == dk &&
                  (keys.size(0) == 1 || keys.size(0) == heads),
              "keys: expected shape (", heads, " or 1, n, 2, ", dk, "), got ", keys.sizes());
  const int64_t n = keys.size(1);
  TORCH_CHECK(k_sub >= 1 && k_sub <= n, "k_sub: expected in [1, n = ", n, "], got ", k_sub);
  TORCH_CHECK(k >= 1 && k <= k_sub * k_sub, "k: expected in [1, k_sub**2 = ", k_sub * k_sub, "], got ", k);
  return n;
}

// The expert tables for x (T, d): w_down and w_up (E, d) of one dtype, which is float64 exactly when
// x's is (float64 computes in float64 and mixes with nothing; other dtypes mix freely).
inline void check_tables(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up) {
  TORCH_CHECK(x.dim() == 2 && w_down.dim() == 2 && w_up.dim() == 2 && w_down.size(1) == x.size(1) &&
                  w_up.size(0) == w_down.size(0) && w_up.scalar_type() == w_down.scalar_type() &&
                  (x.scalar_type() == at::kDouble) == (w_down.scalar_type() == at::kDouble),
              "expected x (T, d_in), w_down (E, d_in) and w_up (E, d_out) of one dtype, float64 only with a float64 x;"
              " got x ", x.sizes(), " ", x.scalar_type(), ", w_down ", w_down.sizes(), " ", w_down.scalar_type(),
              ", w_up ", w_up.sizes(), " ", w_up.scalar_type());
}

// linear_forward's inputs: x (T, d_in) and weight (d_out, d_in) of one dtype.
inline void check_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.scalar_type() == weight.scalar_type(),
              "linear_forward: expected x (T, d_in) and weight (d_out, d_in) of one dtype, got x ", x.sizes(), " ",
              x.scalar_type(), " and weight ", weight.sizes(), " ", weight.scalar_type());
}

}  // namespace peer

// Both extensions bind the same functions under the same names, so peer_kernels/csrc.py drives
// either; each translation unit defines them (in peer::) before expanding this. The forward
// functions' scales (of quantized tables) default to None: float tables.
#define PEER_BIND_EXTENSION(DOC)                                                                         \
  PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {                                                           \
    m.doc() = DOC;                                                                                     \
    m.def("retrieval_forward", &peer::retrieval_forward, "queries, keys, k, k_sub, schedule -> scores, expert_ids"); \
    m.def("retrieval_backward", &peer::retrieval_backward,                                             \
          "dscores, queries, keys, expert_ids -> dqueries, dkeys");                                    \
    m.def("experts_forward", &peer::experts_forward,                                                   \
          "x, expert_ids, gates, w_down, w_up, activation, w_down_scale, w_up_scale, schedule -> y, z",  \
          pybind11::arg("x"), pybind11::arg("expert_ids"), pybind11::arg("gates"), pybind11::arg("w_down"), \
          pybind11::arg("w_up"), pybind11::arg("activation"), pybind11::arg("w_down_scale") = pybind11::none(), \
          pybind11::arg("w_up_scale") = pybind11::none(), pybind11::arg("schedule") = "token_tiles");  \
    m.def("experts_backward", &peer::experts_backward,                                                 \
          "dy, x, expert_ids, gates, z, w_down, w_up, activation, sparse -> dx, dgates, dw_down, dw_up, rows"); \
    m.def("down_forward", &peer::down_forward, "x, expert_ids, w_down, w_down_scale, schedule -> z",   \
          pybind11::arg("x"), pybind11::arg("expert_ids"), pybind11::arg("w_down"),                      \
          pybind11::arg("w_down_scale") = pybind11::none(), pybind11::arg("schedule") = "token_tiles"); \
    m.def("down_backward", &peer::down_backward, "dz, x, expert_ids, w_down, sparse -> dx, dw_down, rows"); \
    m.def("mix_forward", &peer::mix_forward, "z, expert_ids, gates, w_up, activation, w_up_scale, schedule -> y", \
          pybind11::arg("z"), pybind11::arg("expert_ids"), pybind11::arg("gates"), pybind11::arg("w_up"),    \
          pybind11::arg("activation"), pybind11::arg("w_up_scale") = pybind11::none(),                   \
          pybind11::arg("schedule") = "token_tiles");                                                   \
    m.def("mix_backward", &peer::mix_backward,                                                         \
          "dy, z, expert_ids, gates, w_up, activation, sparse -> dz, dgates, dw_up, rows");            \
    m.def("gates_forward", &peer::gates_forward, "scores (..., k), gating -> gates");                  \
    m.def("gates_backward", &peer::gates_backward, "scores, gates, dgates, gating -> dscores");        \
    m.def("linear_forward", &peer::linear_forward, "x (T, d_in), weight (d_out, d_in) -> x @ weight.T"); \
    m.def("vector_paths", &peer::vector_paths,                                                         \
          "the hand-written vector paths taken: 'avx2' or 'portable' (CPU), 'cuda'");                  \
  }
