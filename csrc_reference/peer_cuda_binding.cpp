// Torch binding of the CUDA kernels (peer_cuda.cu): checks, dtype handling and allocation, with
// the same functions and signatures as the CPU extension (peer_cpu.cpp), so peer_kernels/csrc.py
// drives both. float64 computes in float64; other dtypes are converted to float32 (kernels are
// float/double only), outputs are returned in the input dtype and retrieval scores in float32.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "peer_cuda.h"
#include "peer_math.h"
#include "peer_torch.h"

namespace peer {
namespace {

using at::Tensor;

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
}

// One device reduction (and a sync): a bad id raises here instead of being read by a kernel.
void check_ids(const Tensor& ids, int64_t rows, const char* name, const char* what) {
  if (ids.numel() == 0) return;
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < rows, name, ": expected values in [0, ", rows, ") (", what, "), got [", lo, ", ", hi,
              "]");
}

// The compute-dtype queries with contiguous dk-vectors, and their strides.
std::pair<Tensor, cuda::QueryStrides> query_view(const Tensor& queries) {
  Tensor q = queries.to(compute_type(queries.scalar_type()));
  if (q.stride(3) != 1) q = q.contiguous();
  return {q, cuda::QueryStrides{q.stride(0), q.stride(1), q.stride(2)}};
}

// The forward functions take the schedule of the CPU extension's (peer_torch.h is_decode) and run one
// block per token whatever it is: the baseline has one way.
std::vector<Tensor> retrieval_forward(const Tensor& queries, const Tensor& keys, int64_t k, int64_t k_sub,
                                      const std::string& schedule) {
  is_decode(schedule);
  check_cuda(queries, "queries");
  check_cuda(keys, "keys");
  const int64_t n = check_retrieval(queries, keys, k, k_sub);
  const int64_t T = queries.size(0), heads = queries.size(1), dk = queries.size(3);
  const c10::cuda::CUDAGuard guard(queries.device());
  auto [q, strides] = query_view(queries);
  const Tensor kk = keys.to(q.scalar_type()).contiguous();
  Tensor scores = at::empty({T, heads, k}, q.options());
  Tensor ids = at::empty({T, heads, k}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "peer_cuda_retrieval_forward", [&] {
    cuda::retrieval_forward<scalar_t>(q.data_ptr<scalar_t>(), strides, kk.data_ptr<scalar_t>(),
                                      scores.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), T, heads, kk.size(0), n,
                                      dk, k, k_sub, c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, ids};
}

std::vector<Tensor> retrieval_backward(const Tensor& dscores, const Tensor& queries, const Tensor& keys,
                                       const Tensor& expert_ids) {
  check_cuda(queries, "queries");
  const int64_t T = queries.size(0), heads = queries.size(1), dk = queries.size(3), n = keys.size(1);
  TORCH_CHECK(expert_ids.dim() == 3 && expert_ids.size(0) == T && expert_ids.size(1) == heads &&
                  dscores.sizes() == expert_ids.sizes(),
              "retrieval_backward: expected expert_ids and dscores of shape (", T, ", ", heads, ", k), got ",
              expert_ids.sizes(), " and ", dscores.sizes());
  const c10::cuda::CUDAGuard guard(queries.device());
  const Tensor ids = expert_ids.to(at::kLong).contiguous();
  check_ids(ids, n * n, "expert_ids", "product-key ids a*n + b, n*n experts");
  auto [q, strides] = query_view(queries);
  const Tensor kk = keys.to(q.scalar_type()).contiguous();
  const Tensor ds = dscores.to(q.scalar_type()).contiguous();
  Tensor dq = at::empty({T, heads, 2, dk}, q.options());
  Tensor dkeys = at::zeros_like(kk);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "peer_cuda_retrieval_backward", [&] {
    cuda::retrieval_backward<scalar_t>(ds.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), strides,
                                       kk.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), dq.data_ptr<scalar_t>(),
                                       dkeys.data_ptr<scalar_t>(), T, heads, kk.size(0), n, dk, expert_ids.size(2),
                                       c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq.to(queries.scalar_type()), dkeys.to(keys.scalar_type())};
}

Tensor gates_forward(const Tensor& scores_in, const std::string& gating) {
  check_cuda(scores_in, "scores");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor scores = scores_in.contiguous();
  const int64_t k = scores.size(-1), groups = scores.numel() / std::max<int64_t>(k, 1);
  Tensor gates = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peer_cuda_gates_forward", [&] {
    cuda::gates_forward<scalar_t>(scores.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), groups, k,
                                  gating_code(gating), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gates;
}

Tensor gates_backward(const Tensor& scores_in, const Tensor& gates_in, const Tensor& dgates_in,
                      const std::string& gating) {
  check_cuda(scores_in, "scores");
  TORCH_CHECK(gates_in.sizes() == scores_in.sizes() && dgates_in.sizes() == scores_in.sizes(),
              "gates_backward: expected scores, gates and dgates of one shape");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor scores = scores_in.contiguous();
  const Tensor gates = gates_in.to(scores.scalar_type()).contiguous();
  const Tensor dgates = dgates_in.to(scores.scalar_type()).contiguous();
  const int64_t k = scores.size(-1), groups = scores.numel() / std::max<int64_t>(k, 1);
  Tensor dscores = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peer_cuda_gates_backward", [&] {
    cuda::gates_backward<scalar_t>(scores.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                   dgates.data_ptr<scalar_t>(), dscores.data_ptr<scalar_t>(), groups, k,
                                   gating_code(gating), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dscores;
}

// The CUDA baseline (bench/) runs the whole expert stage on square tables with dense gradients; the
// split halves, sparse gradients and d_in != d_out are the CPU extension's and the Triton ops'.
[[noreturn]] void not_in_baseline(const char* what) {
  TORCH_CHECK(false, what, " is not in the plain CUDA baseline of csrc_reference/ (a benchmark of the whole expert "
              "stage): use backend='triton' for CUDA tensors");
}

Tensor down_forward(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::string&) {
  not_in_baseline("down_forward");
}
Tensor mix_forward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::string&,
                   const std::optional<Tensor>&, const std::string&) {
  not_in_baseline("mix_forward");
}
std::vector<Tensor> down_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool) {
  not_in_baseline("down_backward");
}
std::vector<Tensor> mix_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const std::string&, bool) {
  not_in_baseline("mix_backward");
}

std::vector<Tensor> experts_forward(const Tensor& x_in, const Tensor& expert_ids, const Tensor& gates_in,
                                    const Tensor& w_down_in, const Tensor& w_up_in, const std::string& activation,
                                    const std::optional<Tensor>& w_down_scale, const std::optional<Tensor>& w_up_scale,
                                    const std::string& schedule) {
  is_decode(schedule);
  check_cuda(x_in, "x");
  if (w_down_scale.has_value() || w_up_scale.has_value()) not_in_baseline("quantized tables (int8 / float8_e4m3fn)");
  if (w_up_in.dim() == 2 && w_up_in.size(1) != x_in.size(1)) not_in_baseline("d_out != d_in");
  TORCH_CHECK(x_in.dim() == 2 && expert_ids.dim() == 3 && expert_ids.size(0) == x_in.size(0) &&
                  gates_in.sizes() == expert_ids.sizes() && w_down_in.dim() == 2 &&
                  w_down_in.size(1) == x_in.size(1) && w_up_in.sizes() == w_down_in.sizes(),
              "experts_forward: expected x (T, d), expert_ids and gates (T, h, k), w_down and w_up (E, d)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = compute_type(x_in.scalar_type());
  const Tensor ids = expert_ids.to(at::kLong).contiguous();
  check_ids(ids, w_down_in.size(0), "expert_ids", "rows of w_down");
  const Tensor x = x_in.to(acc).contiguous(), gates = gates_in.to(acc).contiguous();
  const Tensor w_down = w_down_in.to(acc).contiguous(), w_up = w_up_in.to(acc).contiguous();
  const int64_t T = x.size(0), d = x.size(1), slots = ids.size(1) * ids.size(2);
  Tensor y = at::empty_like(x);
  Tensor z = at::empty(ids.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "peer_cuda_experts_forward", [&] {
    cuda::experts_forward<scalar_t>(x.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), gates.data_ptr<scalar_t>(),
                                    w_down.data_ptr<scalar_t>(), w_up.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                    z.data_ptr<scalar_t>(), T, slots, d, activation_code(activation),
                                    c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y.to(x_in.scalar_type()), z};
}

std::vector<Tensor> experts_backward(const Tensor& dy_in, const Tensor& x_in, const Tensor& expert_ids,
                                     const Tensor& gates_in, const Tensor& z_in, const Tensor& w_down_in,
                                     const Tensor& w_up_in, const std::string& activation, bool sparse) {
  check_cuda(x_in, "x");
  if (sparse) not_in_baseline("sparse table gradients");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "experts_backward: expected dy of shape ", x_in.sizes(), ", got ",
              dy_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = compute_type(x_in.scalar_type());
  const Tensor ids = expert_ids.to(at::kLong).contiguous();
  check_ids(ids, w_down_in.size(0), "expert_ids", "rows of w_down");
  const Tensor dy = dy_in.to(acc).contiguous(), x = x_in.to(acc).contiguous();
  const Tensor gates = gates_in.to(acc).contiguous(), z = z_in.to(acc).contiguous();
  const Tensor w_down = w_down_in.to(acc).contiguous(), w_up = w_up_in.to(acc).contiguous();
  const int64_t T = x.size(0), d = x.size(1), slots = ids.size(1) * ids.size(2);
  Tensor dx = at::empty_like(x), dgates = at::empty_like(gates);
  Tensor dw_down = at::zeros_like(w_down), dw_up = at::zeros_like(w_up);
  AT_DISPATCH_FLOATING_TYPES(acc, "peer_cuda_experts_backward", [&] {
    cuda::experts_backward<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(),
                                     gates.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), w_down.data_ptr<scalar_t>(),
                                     w_up.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(),
                                     dw_down.data_ptr<scalar_t>(), dw_up.data_ptr<scalar_t>(), T, slots, d,
                                     activation_code(activation), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto table = w_down_in.scalar_type();
  return {dx.to(x_in.scalar_type()), dgates.to(gates_in.scalar_type()), dw_down.to(table), dw_up.to(table),
          at::empty({0}, ids.options())};
}

// The query projection: cuBLAS spreads a matmul of a few tokens over the device itself (the CPU
// extension's reason for its own does not hold here).
Tensor linear_forward(const Tensor& x, const Tensor& weight) {
  check_linear(x, weight);
  return at::mm(x, weight.t());
}

std::string vector_paths() { return "cuda"; }

}  // namespace
}  // namespace peer

PEER_BIND_EXTENSION("PEER forward/backward with plain CUDA kernels (csrc_reference/peer_cuda.cu)")
