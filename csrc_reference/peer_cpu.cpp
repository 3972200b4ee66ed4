// CPU implementation of the PEER op after the query projection (SPEC section 1), forward and backward:
// product-key retrieval, gating and single-neuron expert mixing, written from the spec's formulas.
//
// Parallel over tokens with OpenMP on torch's threads (torch.set_num_threads), in dynamically
// scheduled chunks. float64 computes in float64; float32, bfloat16 and float16 compute in
// float32 (at::opmath_type) and return outputs in the input dtype, retrieval scores in the compute
// dtype. Only the dense sub-key scores q . keys go through a matmul (ATen's BLAS), in token chunks
// so their memory stays bounded; everything after it is the per-token math of peer_math.h.
//
// Gradients of the tables (w_down, w_up, keys) are dense and many tokens hit the same row: the
// contributions are grouped by row with a stable counting sort and each row is then summed by one
// thread in a fixed order, so there are no races and the result is bitwise reproducible. The same
// pass writes the zeros of rows nobody touched, so each table is written exactly once.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "peer_math.h"
#include "peer_torch.h"

namespace peer {
namespace {

using at::Tensor;

// Work per parallel task. Each parallel region costs a wake-up and a barrier (a scheduler time slice
// when the machine is busy), so small stages run serially: a token is microseconds of work, a
// table row mostly a memset, and gating a few flops per score.
constexpr int64_t kTokenGrain = 16;
constexpr int64_t kRowGrain = 256;
constexpr int64_t kGateGrain = int64_t(1) << 14;
// Sub-key scores per retrieval chunk (chunk tokens * heads * 2 * n): 16 MiB in float32.
constexpr int64_t kSubScoresPerChunk = int64_t(1) << 22;

// A dense gradient table (E, d), about to be written once in full. Fresh large allocations are
// mmap'ed pages that fault in 4 KiB at a time, which costs more than writing them: ask for
// transparent huge pages (Linux, when THP is in "madvise" mode; a no-op elsewhere).
Tensor empty_table(const Tensor& like) {
  Tensor table = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(table.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(table.data_ptr()) + table.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#endif
  return table;
}

// Expert rows are gathered in random order: fetch the next one while the current one is used.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < d * int64_t(sizeof(scalar_t)); offset += 64) __builtin_prefetch(bytes + offset);
}

// f(chunk_begin, chunk_end) over [begin, end) in chunks of `grain`, on torch's OpenMP threads
// (torch.set_num_threads). Chunks are handed out dynamically: on a busy machine a thread that is
// descheduled does not hold up the others with a fixed share. f must not throw.
template <typename F>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t chunks = (end - begin + grain - 1) / grain;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) f(begin + c * grain, std::min(end, begin + (c + 1) * grain));
}

// Serial, before any parallel work: a bad id raises here instead of being dereferenced.
void check_ids(const Tensor& ids, int64_t rows, const char* name, const char* what) {
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0, count = ids.numel(); i < count; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, name, ": expected values in [0, ", rows, ") (", what,
                "), got ", id[i], " at flat position ", i);
}

template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t d) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return sum;
}

template <typename acc_t, typename src_t>
inline void axpy(acc_t alpha, const src_t* src, acc_t* dst, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) dst[i] += alpha * static_cast<acc_t>(src[i]);
}

// Entries grouped by the table row they add to: row r's entries are order[start[r] .. start[r+1]),
// in increasing entry order (a stable counting sort), so every row sums in a fixed order.
struct RowGroups {
  std::vector<int64_t> start, order;
};

template <typename RowOf>
RowGroups group_by_row(int64_t entries, int64_t rows, RowOf row_of) {
  RowGroups groups;
  groups.start.assign(rows + 1, 0);
  groups.order.resize(entries);
  for (int64_t m = 0; m < entries; ++m) ++groups.start[row_of(m) + 1];
  for (int64_t r = 0; r < rows; ++r) groups.start[r + 1] += groups.start[r];
  std::vector<int64_t> next(groups.start.begin(), groups.start.end() - 1);
  for (int64_t m = 0; m < entries; ++m) groups.order[next[row_of(m)]++] = m;
  return groups;
}

// One table of a segmented sum: out[r, :] = sum over the entries m of row r of coef(m) * source(m)[0..d).
template <typename out_t, typename Coef, typename Source>
struct RowSum {
  out_t* out;
  Coef coef;
  Source source;
};

template <typename out_t, typename Coef, typename Source>
RowSum<out_t, Coef, Source> row_sum(out_t* out, Coef coef, Source source) {
  return {out, coef, source};
}

// Row r of one table: zeros when no entry touches it, else the sum accumulated in `total`.
template <typename acc_t, typename Sum>
void sum_row(const RowGroups& groups, int64_t r, int64_t d, std::vector<acc_t>& total, const Sum& sum) {
  auto* row = sum.out + r * d;
  if (groups.start[r] == groups.start[r + 1]) {
    std::fill(row, row + d, 0);
    return;
  }
  std::fill(total.begin(), total.end(), acc_t(0));
  for (int64_t p = groups.start[r]; p < groups.start[r + 1]; ++p) {
    const int64_t m = groups.order[p];
    axpy(sum.coef(m), sum.source(m), total.data(), d);
  }
  std::copy(total.begin(), total.end(), row);
}

// Every row of every table grouped the same way (one pass over the rows for all of them).
template <typename acc_t, typename... Sums>
void sum_rows(const RowGroups& groups, int64_t d, const Sums&... sums) {
  const int64_t rows = static_cast<int64_t>(groups.start.size()) - 1;
  parallel_chunks(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(d);
    for (int64_t r = begin; r < end; ++r) (sum_row(groups, r, d, total, sums), ...);
  });
}

// ---- retrieval -----------------------------------------------------------------------------------

// queries (T, h, 2, dk), keys (h or 1, n, 2, dk) -> scores (T, h, k) in the compute dtype, sorted
// descending, and expert ids (T, h, k) int64 = a*n + b.
std::vector<Tensor> retrieval_forward(const Tensor& queries, const Tensor& keys, int64_t k, int64_t k_sub) {
  const int64_t n = check_retrieval(queries, keys, k, k_sub);
  const int64_t T = queries.size(0), heads = queries.size(1);
  const auto acc = compute_type(queries.scalar_type());
  const Tensor q = queries.to(acc);
  const Tensor keys_t = keys.to(acc).permute({0, 2, 3, 1});  // (h or 1, 2, dk, n)
  Tensor scores = at::empty({T, heads, k}, queries.options().dtype(acc));
  Tensor ids = at::empty({T, heads, k}, queries.options().dtype(at::kLong));
  const int64_t chunk = std::max<int64_t>(1, kSubScoresPerChunk / (heads * 2 * n));

  AT_DISPATCH_FLOATING_TYPES(acc, "peer_retrieval_forward", [&] {
    scalar_t* scores_p = scores.data_ptr<scalar_t>();
    int64_t* ids_p = ids.data_ptr<int64_t>();
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int64_t t1 = std::min(T, t0 + chunk);
      // (h, 2, rows, dk) @ (h or 1, 2, dk, n) -> (h, 2, rows, n): one batched BLAS call per chunk.
      const Tensor sub = at::matmul(q.slice(0, t0, t1).permute({1, 2, 0, 3}), keys_t).contiguous();
      const scalar_t* sub_p = sub.data_ptr<scalar_t>();
      const int64_t block = sub.stride(1);  // between the (head, half) blocks of the chunk
      parallel_chunks(t0, t1, kTokenGrain, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch_scores(2 * k_sub);
        std::vector<int64_t> scratch_ids(2 * k_sub);
        for (int64_t t = begin; t < end; ++t)
          for (int64_t h = 0; h < heads; ++h) {
            const scalar_t* sub1 = sub_p + (h * 2 + 0) * block + (t - t0) * n;
            const scalar_t* sub2 = sub_p + (h * 2 + 1) * block + (t - t0) * n;
            product_key_topk_one<scalar_t>(sub1, sub2, n, k_sub, k, scratch_scores.data(), scratch_ids.data(),
                                           scores_p + (t * heads + h) * k, ids_p + (t * heads + h) * k);
          }
      });
    }
  });
  return {scores, ids};
}

// dscores (T, h, k) -> dqueries (T, h, 2, dk), dkeys (h or 1, n, 2, dk), through the picks `ids`:
// score = q1 . keys[a, 0] + q2 . keys[b, 1] for id = a*n + b.
std::vector<Tensor> retrieval_backward(const Tensor& dscores, const Tensor& queries, const Tensor& keys,
                                       const Tensor& expert_ids) {
  const int64_t T = queries.size(0), heads = queries.size(1), dk = queries.size(3);
  const int64_t key_heads = keys.size(0), n = keys.size(1), k = expert_ids.size(2);
  TORCH_CHECK(expert_ids.dim() == 3 && expert_ids.size(0) == T && expert_ids.size(1) == heads &&
                  dscores.sizes() == expert_ids.sizes(),
              "retrieval_backward: expected expert_ids and dscores of shape (", T, ", ", heads, ", k), got ",
              expert_ids.sizes(), " and ", dscores.sizes());
  const Tensor ids = expert_ids.to(at::kLong).contiguous();
  check_ids(ids, n * n, "expert_ids", "product-key ids a*n + b, n*n experts");

  const auto acc = compute_type(queries.scalar_type());
  const Tensor dsigma = dscores.to(acc).contiguous();
  // The module's queries are a strided view (its projection is laid out (half, head, dk)): read them
  // in place when each dk-vector is contiguous.
  Tensor q = queries.to(acc);
  if (q.stride(3) != 1) q = q.contiguous();
  const Tensor kk = keys.to(acc).contiguous();
  Tensor dq = at::empty({T, heads, 2, dk}, q.options());
  Tensor dkeys = at::empty_like(kk);

  AT_DISPATCH_FLOATING_TYPES(acc, "peer_retrieval_backward", [&] {
    const scalar_t* ds = dsigma.data_ptr<scalar_t>();
    const scalar_t* q_p = q.data_ptr<scalar_t>();
    const int64_t q_token = q.stride(0), q_head = q.stride(1), q_half = q.stride(2);
    const scalar_t* keys_p = kk.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    scalar_t* dq_p = dq.data_ptr<scalar_t>();
    // Entry m = 2*pick + half: pick used key row (h', sub-key, half), stored in key_rows[m].
    std::vector<int64_t> key_rows(2 * ids.numel());
    parallel_chunks(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t first = (t * heads + h) * k, key_head = key_heads == 1 ? 0 : h;
          for (int64_t half = 0; half < 2; ++half) {
            scalar_t* dq_row = dq_p + ((t * heads + h) * 2 + half) * dk;
            std::fill(dq_row, dq_row + dk, scalar_t(0));
            for (int64_t pick = first; pick < first + k; ++pick) {
              const int64_t sub = half == 0 ? id[pick] / n : id[pick] % n;
              const int64_t row = key_rows[2 * pick + half] = (key_head * n + sub) * 2 + half;
              axpy(ds[pick], keys_p + row * dk, dq_row, dk);
            }
          }
        }
    });
    // dkeys[row] += dsigma[pick] * q[t, h, half] over the entries of each key row.
    const RowGroups groups = group_by_row(2 * ids.numel(), key_heads * n * 2, [&](int64_t m) { return key_rows[m]; });
    sum_rows<scalar_t>(groups, dk, row_sum(dkeys.data_ptr<scalar_t>(), [&](int64_t m) { return ds[m / 2]; },
                                           [&](int64_t m) {
                                             const int64_t token_head = m / 2 / k;
                                             return q_p + token_head / heads * q_token +
                                                    token_head % heads * q_head + m % 2 * q_half;
                                           }));
  });
  return {dq.to(queries.scalar_type()), dkeys.to(keys.scalar_type())};
}

// ---- gating over the last dim (one head's k scores) ---------------------------------------------

Tensor gates_forward(const Tensor& scores_in, const std::string& gating_name) {
  const int gating = gating_code(gating_name);
  const Tensor scores = scores_in.contiguous();
  const int64_t k = scores.size(-1), groups = scores.numel() / std::max<int64_t>(k, 1);
  Tensor gates = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peer_gates_forward", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    scalar_t* g = gates.data_ptr<scalar_t>();
    parallel_chunks(0, groups, kGateGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) gate_forward<scalar_t>(gating, s + i * k, g + i * k, k);
    });
  });
  return gates;
}

Tensor gates_backward(const Tensor& scores_in, const Tensor& gates_in, const Tensor& dgates_in,
                      const std::string& gating_name) {
  const int gating = gating_code(gating_name);
  TORCH_CHECK(gates_in.sizes() == scores_in.sizes() && dgates_in.sizes() == scores_in.sizes(),
              "gates_backward: expected scores, gates and dgates of one shape, got ", scores_in.sizes(), ", ",
              gates_in.sizes(), ", ", dgates_in.sizes());
  const Tensor scores = scores_in.contiguous();
  const Tensor gates = gates_in.to(scores.scalar_type()).contiguous();
  const Tensor dgates_c = dgates_in.to(scores.scalar_type()).contiguous();
  const int64_t k = scores.size(-1), groups = scores.numel() / std::max<int64_t>(k, 1);
  Tensor dscores = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peer_gates_backward", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* dg = dgates_c.data_ptr<scalar_t>();
    scalar_t* ds = dscores.data_ptr<scalar_t>();
    parallel_chunks(0, groups, kGateGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        gate_backward<scalar_t>(gating, s + i * k, g + i * k, dg + i * k, ds + i * k, k);
    });
  });
  return dscores;
}

// ---- experts -------------------------------------------------------------------------------------

// y[t] = sum_{h,j} gates[t,h,j] * act(z[t,h,j]) * w_up[e], z = w_down[e] . x[t], e = expert_ids[t,h,j].
// Returns y (T, d) in x's dtype and z (T, h, k) in the compute dtype (saved for the backward).
std::vector<Tensor> experts_forward(const Tensor& x_in, const Tensor& expert_ids, const Tensor& gates_in,
                                    const Tensor& w_down_in, const Tensor& w_up_in, const std::string& activation) {
  const int act = activation_code(activation);
  TORCH_CHECK(x_in.dim() == 2 && expert_ids.dim() == 3 && expert_ids.size(0) == x_in.size(0) &&
                  gates_in.sizes() == expert_ids.sizes(),
              "experts_forward: expected x (T, d), expert_ids and gates (T, h, k), got ", x_in.sizes(), ", ",
              expert_ids.sizes(), ", ", gates_in.sizes());
  check_tables(x_in, w_down_in, w_up_in);
  const Tensor w_down = w_down_in.contiguous(), w_up = w_up_in.contiguous();
  const Tensor ids = expert_ids.to(at::kLong).contiguous();
  check_ids(ids, w_down.size(0), "expert_ids", "rows of w_down");
  // x is small (T, d): it is converted to the compute dtype; the tables are read as they are stored.
  const auto acc = compute_type(x_in.scalar_type());
  const Tensor x = x_in.to(acc).contiguous(), gates = gates_in.to(acc).contiguous();
  const int64_t T = x.size(0), d = x.size(1), slots = ids.size(1) * ids.size(2);
  Tensor y = at::empty_like(x);
  Tensor z = at::empty(ids.sizes(), x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w_down.scalar_type(), "peer_experts_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* x_p = x.data_ptr<acc_t>();
    const scalar_t* down_p = w_down.data_ptr<scalar_t>();
    const scalar_t* up_p = w_up.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const acc_t* g = gates.data_ptr<acc_t>();
    acc_t* z_p = z.data_ptr<acc_t>();
    acc_t* y_p = y.data_ptr<acc_t>();
    parallel_chunks(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_row(d), y_row(d);
      for (int64_t t = begin; t < end; ++t) {
        std::copy(x_p + t * d, x_p + (t + 1) * d, x_row.begin());
        std::fill(y_row.begin(), y_row.end(), acc_t(0));
        for (int64_t slot = t * slots; slot < (t + 1) * slots; ++slot) {
          if (slot + 1 < T * slots) {
            prefetch_row(down_p + id[slot + 1] * d, d);
            prefetch_row(up_p + id[slot + 1] * d, d);
          }
          const acc_t z_s = dot<acc_t>(down_p + id[slot] * d, x_row.data(), d);
          acc_t a, slope;
          activate<acc_t>(act, z_s, &a, &slope);
          z_p[slot] = z_s;
          axpy(g[slot] * a, up_p + id[slot] * d, y_row.data(), d);
        }
        std::copy(y_row.begin(), y_row.end(), y_p + t * d);
      }
    });
  });
  return {y.to(x_in.scalar_type()), z};
}

// Returns dx (T, d), dgates (T, h, k) in gates' dtype, dw_down and dw_up (E, d) dense.
std::vector<Tensor> experts_backward(const Tensor& dy_in, const Tensor& x_in, const Tensor& expert_ids,
                                     const Tensor& gates_in, const Tensor& z_in, const Tensor& w_down_in,
                                     const Tensor& w_up_in, const std::string& activation) {
  const int act = activation_code(activation);
  check_tables(x_in, w_down_in, w_up_in);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "experts_backward: expected dy of shape ", x_in.sizes(), ", got ",
              dy_in.sizes());
  const Tensor w_down = w_down_in.contiguous(), w_up = w_up_in.contiguous();
  const Tensor ids = expert_ids.to(at::kLong).contiguous();
  check_ids(ids, w_down.size(0), "expert_ids", "rows of w_down");
  const auto acc = compute_type(x_in.scalar_type());
  const Tensor x = x_in.to(acc).contiguous(), dy = dy_in.to(acc).contiguous();
  const Tensor gates = gates_in.to(acc).contiguous(), z = z_in.to(acc).contiguous();
  const int64_t T = x.size(0), d = x.size(1), slots = ids.size(1) * ids.size(2);
  Tensor dx = at::empty_like(x);
  Tensor dgates = at::empty(ids.sizes(), x.options());
  Tensor dw_down = empty_table(w_down), dw_up = empty_table(w_up);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w_down.scalar_type(), "peer_experts_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* x_p = x.data_ptr<acc_t>();
    const acc_t* dy_p = dy.data_ptr<acc_t>();
    const scalar_t* down_p = w_down.data_ptr<scalar_t>();
    const scalar_t* up_p = w_up.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const acc_t* g = gates.data_ptr<acc_t>();
    const acc_t* z_p = z.data_ptr<acc_t>();
    acc_t* dg = dgates.data_ptr<acc_t>();
    acc_t* dx_p = dx.data_ptr<acc_t>();
    // Per slot: the coefficients of x[t] in dw_down[e] (dz) and of dy[t] in dw_up[e] (gate * act).
    std::vector<acc_t> dz(ids.numel()), gate_act(ids.numel());
    parallel_chunks(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dy_row(d), dx_row(d);
      for (int64_t t = begin; t < end; ++t) {
        std::copy(dy_p + t * d, dy_p + (t + 1) * d, dy_row.begin());
        std::fill(dx_row.begin(), dx_row.end(), acc_t(0));
        for (int64_t slot = t * slots; slot < (t + 1) * slots; ++slot) {
          if (slot + 1 < T * slots) {
            prefetch_row(down_p + id[slot + 1] * d, d);
            prefetch_row(up_p + id[slot + 1] * d, d);
          }
          const acc_t w = dot<acc_t>(up_p + id[slot] * d, dy_row.data(), d);
          acc_t a, slope;
          activate<acc_t>(act, z_p[slot], &a, &slope);
          dg[slot] = a * w;
          dz[slot] = g[slot] * w * slope;
          gate_act[slot] = g[slot] * a;
          axpy(dz[slot], down_p + id[slot] * d, dx_row.data(), d);
        }
        std::copy(dx_row.begin(), dx_row.end(), dx_p + t * d);
      }
    });
    const RowGroups groups = group_by_row(ids.numel(), w_down.size(0), [&](int64_t slot) { return id[slot]; });
    sum_rows<acc_t>(groups, d,
                    row_sum(dw_down.data_ptr<scalar_t>(), [&](int64_t slot) { return dz[slot]; },
                            [&](int64_t slot) { return x_p + slot / slots * d; }),
                    row_sum(dw_up.data_ptr<scalar_t>(), [&](int64_t slot) { return gate_act[slot]; },
                            [&](int64_t slot) { return dy_p + slot / slots * d; }));
  });
  return {dx.to(x_in.scalar_type()), dgates.to(gates_in.scalar_type()), dw_down, dw_up};
}

}  // namespace
}  // namespace peer

PEER_BIND_EXTENSION("PEER forward/backward on CPU (csrc_reference/peer_cpu.cpp)")
