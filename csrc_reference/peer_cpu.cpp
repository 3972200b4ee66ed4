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
#include <optional>
#include <string>
#include <type_traits>
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

// Every float8_e4m3fn value as a float, by its bits: c10's conversion is bit manipulation with a
// branch per value, which does not vectorize (about 10x slower per table row than a lookup).
struct Float8Values {
  float value[256];
  Float8Values() {
    for (int bits = 0; bits < 256; ++bits)
      value[bits] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(bits), c10::Float8_e4m3fn::from_bits()));
  }
};
const Float8Values kFloat8Values;

// A stored value in the compute type.
template <typename acc_t, typename src_t>
inline acc_t to_acc(src_t v) {
  if constexpr (std::is_same_v<src_t, c10::Float8_e4m3fn>) {
    return kFloat8Values.value[v.x];
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t d) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += to_acc<acc_t>(a[i]) * to_acc<acc_t>(b[i]);
  return sum;
}

template <typename acc_t, typename src_t>
inline void axpy(acc_t alpha, const src_t* src, acc_t* dst, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) dst[i] += alpha * to_acc<acc_t>(src[i]);
}

// Entries grouped by the table row they add to: row r's entries are order[start[r] .. start[r+1]),
// in increasing entry order (a stable counting sort), so every row sums in a fixed order; `touched`
// lists the rows with at least one entry, ascending.
struct RowGroups {
  std::vector<int64_t> start, order, touched;
};

template <typename RowOf>
RowGroups group_by_row(int64_t entries, int64_t rows, RowOf row_of) {
  RowGroups groups;
  groups.start.assign(rows + 1, 0);
  groups.order.resize(entries);
  for (int64_t m = 0; m < entries; ++m) ++groups.start[row_of(m) + 1];
  for (int64_t r = 0; r < rows; ++r) {
    if (groups.start[r + 1]) groups.touched.push_back(r);
    groups.start[r + 1] += groups.start[r];
  }
  std::vector<int64_t> next(groups.start.begin(), groups.start.end() - 1);
  for (int64_t m = 0; m < entries; ++m) groups.order[next[row_of(m)]++] = m;
  return groups;
}

// For each touched row r: sum over its entries m of coef(m) * source(m)[0..d), written to row r of
// `out` (a dense table whose untouched rows the caller has zeroed) or, when `compact`, to row i of
// `out` for the i-th touched row (the values of a sparse gradient). Each row is summed by one thread.
template <typename acc_t, typename out_t, typename Coef, typename Source>
void sum_touched_rows(const RowGroups& groups, int64_t d, bool compact, out_t* out, const Coef& coef,
                      const Source& source) {
  const int64_t count = static_cast<int64_t>(groups.touched.size());
  parallel_chunks(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(d);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = groups.touched[i];
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t p = groups.start[r]; p < groups.start[r + 1]; ++p) axpy(coef(groups.order[p]), source(groups.order[p]), total.data(), d);
      std::copy(total.begin(), total.end(), out + (compact ? i : r) * d);
    }
  });
}

// A table's gradient: dense (like `table`, zeros but for the touched rows) or, when `sparse`, the
// touched rows' values (rows, d) with `rows` filled with their ids (int64, ascending).
struct TableGrad {
  Tensor values, rows;
};

TableGrad table_grad_outputs(const RowGroups& groups, const Tensor& table, bool sparse) {
  if (!sparse) return {empty_table(table).zero_(), at::empty({0}, table.options().dtype(at::kLong))};
  Tensor rows = at::empty({static_cast<int64_t>(groups.touched.size())}, table.options().dtype(at::kLong));
  std::copy(groups.touched.begin(), groups.touched.end(), rows.data_ptr<int64_t>());
  return {at::empty({rows.size(0), table.size(1)}, table.options()), rows};
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
  Tensor dkeys = at::zeros_like(kk);

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
    sum_touched_rows<scalar_t>(groups, dk, false, dkeys.data_ptr<scalar_t>(), [&](int64_t m) { return ds[m / 2]; },
                               [&](int64_t m) {
                                 const int64_t token_head = m / 2 / k;
                                 return q_p + token_head / heads * q_token + token_head % heads * q_head +
                                        m % 2 * q_half;
                               });
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

// ---- experts ------------------------------------------------------------------------------------
// The stage in two halves, as the Triton ops have them: down, z = w_down[e] . x[t]; and mix,
// y[t] = sum_{h,j} gates[t,h,j] * act(z[t,h,j]) * w_up[e], e = expert_ids[t,h,j]. experts_forward and
// experts_backward compose them. x (T, d_in) and dy (T, d_out) are small: they are converted to the
// compute dtype; the tables (w_down (E, d_in), w_up (E, d_out)) are read as they are stored.
//
// Quantized tables (the forward only): int8 or float8_e4m3fn values with one float scale per row, the
// row being its values times its scale. A row's scale is common to all its terms, so it multiplies
// the row's dot product (down) or its coefficient (mix) instead of every value.

// The compute type of a table's values: double for double tables, float for every other dtype.
template <typename scalar_t>
using row_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A quantized table's per-row scales, contiguous; an undefined tensor for a float table.
Tensor row_scales(const std::optional<Tensor>& scale, const Tensor& table, const char* name) {
  const bool quantized = table.scalar_type() == at::kChar || table.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(scale.has_value() == quantized, name, ": int8 and float8_e4m3fn tables come with their per-row scale, ",
              "float tables without; got a ", table.scalar_type(), " table ", scale.has_value() ? "with" : "without",
              " a scale");
  if (!quantized) return Tensor();
  TORCH_CHECK(scale->dim() == 1 && scale->size(0) == table.size(0) && scale->scalar_type() == at::kFloat, name,
              "_scale: expected shape (", table.size(0), ",) float32, got ", scale->sizes(), " ", scale->scalar_type());
  return scale->contiguous();
}

// The row scale multiplying a row's terms: 1 for a float table (no scales).
inline float row_scale(const float* scales, int64_t row) { return scales ? scales[row] : 1.0f; }

Tensor checked_ids(const Tensor& expert_ids, const Tensor& table) {
  TORCH_CHECK(expert_ids.dim() == 3, "expert_ids: expected shape (T, h, k), got ", expert_ids.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) >= 1, "expected a table (E, d) with d >= 1, got ", table.sizes());
  const Tensor ids = expert_ids.to(at::kLong).contiguous();
  check_ids(ids, table.size(0), "expert_ids", "rows of the expert tables");
  return ids;
}

// z (T, h, k) in the compute dtype of x.
Tensor down_forward(const Tensor& x_in, const Tensor& expert_ids, const Tensor& w_down_in,
                    const std::optional<Tensor>& w_down_scale) {
  TORCH_CHECK(x_in.dim() == 2 && expert_ids.size(0) == x_in.size(0) && w_down_in.size(1) == x_in.size(1) &&
                  (x_in.scalar_type() == at::kDouble) == (w_down_in.scalar_type() == at::kDouble),
              "down_forward: expected x (T, d), expert_ids (T, h, k), w_down (E, d), float64 only together; got ",
              x_in.sizes(), ", ", expert_ids.sizes(), ", ", w_down_in.sizes());
  const Tensor ids = checked_ids(expert_ids, w_down_in), w_down = w_down_in.contiguous();
  const Tensor scales = row_scales(w_down_scale, w_down, "w_down");
  const Tensor x = x_in.to(compute_type(x_in.scalar_type())).contiguous();
  const int64_t T = x.size(0), d = x.size(1), slots = ids.size(1) * ids.size(2);
  Tensor z = at::empty(ids.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND4(at::kBFloat16, at::kHalf, at::kChar, at::kFloat8_e4m3fn, w_down.scalar_type(),
                                  "peer_down_forward", [&] {
    using acc_t = row_acc_t<scalar_t>;
    const acc_t* x_p = x.data_ptr<acc_t>();
    const scalar_t* down_p = w_down.data_ptr<scalar_t>();
    const float* scale_p = scales.defined() ? scales.data_ptr<float>() : nullptr;
    const int64_t* id = ids.data_ptr<int64_t>();
    acc_t* z_p = z.data_ptr<acc_t>();
    parallel_chunks(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin * slots; slot < end * slots; ++slot) {
        if (slot + 1 < T * slots) prefetch_row(down_p + id[slot + 1] * d, d);
        z_p[slot] = dot<acc_t>(down_p + id[slot] * d, x_p + slot / slots * d, d) * row_scale(scale_p, id[slot]);
      }
    });
  });
  return z;
}

// y (T, d_out) in the compute dtype (z's).
Tensor mix_forward(const Tensor& z_in, const Tensor& expert_ids, const Tensor& gates_in, const Tensor& w_up_in,
                   const std::string& activation, const std::optional<Tensor>& w_up_scale) {
  const int act = activation_code(activation);
  TORCH_CHECK(z_in.sizes() == expert_ids.sizes() && gates_in.sizes() == expert_ids.sizes(),
              "mix_forward: expected z, expert_ids and gates of one shape (T, h, k), got ", z_in.sizes(), ", ",
              expert_ids.sizes(), ", ", gates_in.sizes());
  const Tensor ids = checked_ids(expert_ids, w_up_in), w_up = w_up_in.contiguous();
  const Tensor scales = row_scales(w_up_scale, w_up, "w_up");
  const Tensor z = z_in.contiguous(), gates = gates_in.to(z.scalar_type()).contiguous();
  const int64_t T = z.size(0), d = w_up.size(1), slots = ids.size(1) * ids.size(2);
  Tensor y = at::empty({T, d}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND4(at::kBFloat16, at::kHalf, at::kChar, at::kFloat8_e4m3fn, w_up.scalar_type(),
                                  "peer_mix_forward", [&] {
    using acc_t = row_acc_t<scalar_t>;
    TORCH_CHECK(z.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "mix_forward: z must be in the compute dtype of w_up (float64 only together)");
    const scalar_t* up_p = w_up.data_ptr<scalar_t>();
    const float* scale_p = scales.defined() ? scales.data_ptr<float>() : nullptr;
    const int64_t* id = ids.data_ptr<int64_t>();
    const acc_t* z_p = z.data_ptr<acc_t>();
    const acc_t* g = gates.data_ptr<acc_t>();
    acc_t* y_p = y.data_ptr<acc_t>();
    parallel_chunks(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        acc_t* y_row = y_p + t * d;
        std::fill(y_row, y_row + d, acc_t(0));
        for (int64_t slot = t * slots; slot < (t + 1) * slots; ++slot) {
          if (slot + 1 < T * slots) prefetch_row(up_p + id[slot + 1] * d, d);
          acc_t a, slope;
          activate<acc_t>(act, z_p[slot], &a, &slope);
          axpy(g[slot] * a * row_scale(scale_p, id[slot]), up_p + id[slot] * d, y_row, d);
        }
      }
    });
  });
  return y;
}

// {dz (T, h, k), dgates (T, h, k) in gates' dtype, dw_up, dw_up's rows}: dw_up dense (E, d_out) or,
// with `sparse`, the touched rows' values with their ids in the last tensor (empty when dense).
std::vector<Tensor> mix_backward(const Tensor& dy_in, const Tensor& z_in, const Tensor& expert_ids,
                                 const Tensor& gates_in, const Tensor& w_up_in, const std::string& activation,
                                 bool sparse) {
  const int act = activation_code(activation);
  const Tensor ids = checked_ids(expert_ids, w_up_in), w_up = w_up_in.contiguous();
  const Tensor z = z_in.contiguous(), gates = gates_in.to(z.scalar_type()).contiguous();
  const int64_t T = z.size(0), d = w_up.size(1), slots = ids.size(1) * ids.size(2);
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(0) == T && dy_in.size(1) == d, "mix_backward: expected dy (", T, ", ", d,
              "), got ", dy_in.sizes());
  const Tensor dy = dy_in.to(z.scalar_type()).contiguous();
  Tensor dz = at::empty_like(z), dgates = at::empty_like(z);
  const RowGroups groups = group_by_row(ids.numel(), w_up.size(0), [&](int64_t slot) { return ids.data_ptr<int64_t>()[slot]; });
  TableGrad dw_up = table_grad_outputs(groups, w_up, sparse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w_up.scalar_type(), "peer_mix_backward", [&] {
    using acc_t = row_acc_t<scalar_t>;
    const acc_t* dy_p = dy.data_ptr<acc_t>();
    const scalar_t* up_p = w_up.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const acc_t* g = gates.data_ptr<acc_t>();
    const acc_t* z_p = z.data_ptr<acc_t>();
    acc_t* dz_p = dz.data_ptr<acc_t>();
    acc_t* dg = dgates.data_ptr<acc_t>();
    // Per slot, the coefficient of dy[t] in dw_up[e]: gate * act(z).
    std::vector<acc_t> gate_act(ids.numel());
    parallel_chunks(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin * slots; slot < end * slots; ++slot) {
        if (slot + 1 < T * slots) prefetch_row(up_p + id[slot + 1] * d, d);
        const acc_t w = dot<acc_t>(up_p + id[slot] * d, dy_p + slot / slots * d, d);
        acc_t a, slope;
        activate<acc_t>(act, z_p[slot], &a, &slope);
        dg[slot] = a * w;
        dz_p[slot] = g[slot] * w * slope;
        gate_act[slot] = g[slot] * a;
      }
    });
    sum_touched_rows<acc_t>(groups, d, sparse, dw_up.values.data_ptr<scalar_t>(),
                            [&](int64_t slot) { return gate_act[slot]; },
                            [&](int64_t slot) { return dy_p + slot / slots * d; });
  });
  return {dz, dgates.to(gates_in.scalar_type()), dw_up.values, dw_up.rows};
}

// {dx (T, d_in) in x's dtype, dw_down, dw_down's rows} (as mix_backward's dw_up).
std::vector<Tensor> down_backward(const Tensor& dz_in, const Tensor& x_in, const Tensor& expert_ids,
                                  const Tensor& w_down_in, bool sparse) {
  const Tensor ids = checked_ids(expert_ids, w_down_in), w_down = w_down_in.contiguous();
  const auto acc = compute_type(x_in.scalar_type());
  const Tensor x = x_in.to(acc).contiguous(), dz = dz_in.to(acc).contiguous();
  const int64_t T = x.size(0), d = x.size(1), slots = ids.size(1) * ids.size(2);
  TORCH_CHECK(dz.sizes() == ids.sizes() && w_down.size(1) == d, "down_backward: expected dz like expert_ids and ",
              "w_down (E, ", d, "), got ", dz.sizes(), ", ", w_down.sizes());
  Tensor dx = at::empty_like(x);
  const RowGroups groups = group_by_row(ids.numel(), w_down.size(0), [&](int64_t slot) { return ids.data_ptr<int64_t>()[slot]; });
  TableGrad dw_down = table_grad_outputs(groups, w_down, sparse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w_down.scalar_type(), "peer_down_backward", [&] {
    using acc_t = row_acc_t<scalar_t>;
    const acc_t* x_p = x.data_ptr<acc_t>();
    const scalar_t* down_p = w_down.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    const acc_t* dz_p = dz.data_ptr<acc_t>();
    acc_t* dx_p = dx.data_ptr<acc_t>();
    parallel_chunks(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        acc_t* dx_row = dx_p + t * d;
        std::fill(dx_row, dx_row + d, acc_t(0));
        for (int64_t slot = t * slots; slot < (t + 1) * slots; ++slot) {
          if (slot + 1 < T * slots) prefetch_row(down_p + id[slot + 1] * d, d);
          axpy(dz_p[slot], down_p + id[slot] * d, dx_row, d);
        }
      }
    });
    sum_touched_rows<acc_t>(groups, d, sparse, dw_down.values.data_ptr<scalar_t>(),
                            [&](int64_t slot) { return dz_p[slot]; },
                            [&](int64_t slot) { return x_p + slot / slots * d; });
  });
  return {dx.to(x_in.scalar_type()), dw_down.values, dw_down.rows};
}

// {y (T, d_out) in x's dtype, z (T, h, k) in the compute dtype, saved for the backward}.
std::vector<Tensor> experts_forward(const Tensor& x, const Tensor& expert_ids, const Tensor& gates,
                                    const Tensor& w_down, const Tensor& w_up, const std::string& activation,
                                    const std::optional<Tensor>& w_down_scale, const std::optional<Tensor>& w_up_scale) {
  check_tables(x, w_down, w_up);
  const Tensor z = down_forward(x, expert_ids, w_down, w_down_scale);
  return {mix_forward(z, expert_ids, gates, w_up, activation, w_up_scale).to(x.scalar_type()), z};
}

// {dx, dgates, dw_down, dw_up, rows}: rows (the touched rows of both tables, ascending) when
// `sparse`, and then dw_down / dw_up are their values; else the dense gradients and an empty rows.
std::vector<Tensor> experts_backward(const Tensor& dy, const Tensor& x, const Tensor& expert_ids, const Tensor& gates,
                                     const Tensor& z, const Tensor& w_down, const Tensor& w_up,
                                     const std::string& activation, bool sparse) {
  check_tables(x, w_down, w_up);
  const std::vector<Tensor> mix = mix_backward(dy, z, expert_ids, gates, w_up, activation, sparse);
  const std::vector<Tensor> down = down_backward(mix[0], x, expert_ids, w_down, sparse);
  return {down[0], mix[1], down[1], mix[2], down[2]};
}

}  // namespace
}  // namespace peer

PEER_BIND_EXTENSION("PEER forward/backward on CPU (csrc_reference/peer_cpu.cpp)")
