// CPU implementation of the PEER op after the query projection (SPEC section 1), forward and backward:
// product-key retrieval, gating and single-neuron expert mixing, written from the spec's formulas.
//
// Parallel with OpenMP on torch's threads (torch.set_num_threads), in dynamically scheduled chunks:
// over tokens, or for a few tokens (the "decode" schedule, which peer_kernels.tuning picks by the
// token count) over heads, halves and key rows in the retrieval and over rows and columns in the
// expert stage, so that one token's work still spreads over the threads. float64 computes in
// float64; float32, bfloat16 and float16 compute in float32 (at::opmath_type) and return outputs in
// the input dtype, retrieval scores in the compute dtype. Parameters are read where they are
// stored, never re-laid out per call. Only the dense sub-key scores q . keys go through matmuls
// (ATen's BLAS) for many tokens, in chunks of tokens so their scores stay in cache; everything after
// them is the per-token math of peer_math.h.
//
// Gradients of the tables (w_down, w_up, keys) are dense and many tokens hit the same row: the
// contributions are grouped by row with a stable counting sort and each row is then summed by one
// thread in a fixed order, so there are no races and the result is bitwise reproducible. The same
// pass writes the zeros of rows nobody touched, so each table is written exactly once.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
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
// Expert rows per task of the down projections: one token's h*k rows still spread over the threads.
constexpr int64_t kSlotGrain = 32;
constexpr int64_t kRowGrain = 256;
constexpr int64_t kGateGrain = int64_t(1) << 14;
// Tokens per matmul of the "token_tiles" sub-key scan: their (tokens, n) scores stay in cache.
constexpr int64_t kMatmulTokens = 64;

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
// descheduled does not hold up the others with a fixed share. An exception (ATen's, from a matmul
// in a task) must not leave the parallel region, where it would end the process: the first one
// is kept, the chunks not yet begun are skipped, and it is rethrown after the region.
template <typename F>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t chunks = (end - begin + grain - 1) / grain;
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // written once, by the thread that set `failed`
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      f(begin + c * grain, std::min(end, begin + (c + 1) * grain));
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
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
// The vector loops below are compiled twice, for AVX2 with FMA (x86-64-v3) and for the build's
// baseline, and the CPU picks one when the library loads (GCC's function multiversioning on
// x86-64 Linux), so a build stays portable across the machines that share its cache.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PEER_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PEER_VECTOR_CLONES
#endif

// Values per step of axpy: four 256-bit vectors of floats; an 8-bit table's values are widened a
// whole vector at a time (GCC widens them 128 bits at a time in a plain loop).
constexpr int64_t kVectorLanes = 32;

// A vector (Lanes) of values in the compute type: one vector load for values stored in it (GCC
// assembled some vectors lane by lane from single loads); 16-bit floats converted in registers;
// others converted through memory first. That last way stores the converted values in halves and
// loads them whole, which the CPU cannot forward from its store buffer: the decode scan over
// bfloat16 keys took 9x as long as over float32 ones, twice the bytes (docs/serving.md).
typedef uint32_t Words __attribute__((vector_size(32)));

// 8 16-bit values' bits, each in the upper half of a 32-bit word.
__attribute__((always_inline)) inline Words upper_halves(const void* values) {
  typedef uint16_t Bits __attribute__((vector_size(16)));
  Bits bits;
  std::memcpy(&bits, values, sizeof bits);
  return __builtin_convertvector(bits, Words) << 16;
}

template <typename acc_t, typename Lanes, typename src_t>
__attribute__((always_inline)) inline Lanes load_lanes(const src_t* values) {
  Lanes lanes;
  constexpr int64_t kCount = sizeof(Lanes) / sizeof(acc_t);
  if constexpr (std::is_same_v<src_t, acc_t>) {
    std::memcpy(&lanes, values, sizeof(Lanes));
  } else if constexpr (std::is_same_v<src_t, c10::BFloat16> && std::is_same_v<acc_t, float> && kCount == 8) {
    const Words word = upper_halves(values);  // a bfloat16 is a float's upper half
    std::memcpy(&lanes, &word, sizeof lanes);
  } else if constexpr (std::is_same_v<src_t, c10::Half> && std::is_same_v<acc_t, float> && kCount == 8) {
    // c10's float16 -> float (c10::detail::fp16_ieee_to_fp32_value), 8 values at a time: normal
    // values rebiased by a multiply, subnormal ones by a subtraction, both on normal floats.
    const Words word = upper_halves(values);
    const Words twice = word + word;  // the sign shifted out
    const Words normal_bits = (twice >> 4) + (0xE0u << 23), subnormal_bits = (twice >> 17) | (126u << 23);
    Lanes normal, subnormal;
    std::memcpy(&normal, &normal_bits, sizeof normal);
    std::memcpy(&subnormal, &subnormal_bits, sizeof subnormal);
    normal *= 0x1.0p-112f;
    subnormal -= 0.5f;
    Words normal_word, subnormal_word;
    std::memcpy(&normal_word, &normal, sizeof normal_word);
    std::memcpy(&subnormal_word, &subnormal, sizeof subnormal_word);
    // (twice < 2^27 by a shift: SSE2, the baseline, compares no unsigned vectors, and GCC did it lane by lane)
    const Words result = (word & 0x80000000u) | ((twice >> 27) == 0 ? subnormal_word : normal_word);
    std::memcpy(&lanes, &result, sizeof lanes);
  } else {
    acc_t wide[sizeof(Lanes) / sizeof(acc_t)];
#pragma omp simd
    for (int64_t lane = 0; lane < int64_t(sizeof(Lanes) / sizeof(acc_t)); ++lane) wide[lane] = to_acc<acc_t>(values[lane]);
    std::memcpy(&lanes, wide, sizeof(Lanes));
  }
  return lanes;
}

// a . b: four independent chains of vector multiply-adds (each waits for the last only every fourth
// instruction), their lanes summed pairwise at the end. The chains are GCC vector types, which stay
// in registers: an array of per-lane sums was kept in memory, zeroed by a string store per call, and
// a dot of a 128-value key half took longer than its key's bytes take to arrive.
template <typename acc_t, typename a_t, typename b_t>
PEER_VECTOR_CLONES acc_t dot(const a_t* a, const b_t* b, int64_t d) {
  typedef acc_t Lanes __attribute__((vector_size(32)));
  constexpr int64_t kLanes = 32 / sizeof(acc_t), kChains = 4;
  Lanes chain[kChains] = {};
  int64_t i = 0;
  for (; i + kChains * kLanes <= d; i += kChains * kLanes)
    for (int64_t c = 0; c < kChains; ++c)
      chain[c] += load_lanes<acc_t, Lanes>(a + i + c * kLanes) * load_lanes<acc_t, Lanes>(b + i + c * kLanes);
  const Lanes total = (chain[0] + chain[1]) + (chain[2] + chain[3]);
  acc_t lanes[kLanes];
  for (int64_t lane = 0; lane < kLanes; ++lane) lanes[lane] = total[lane];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  acc_t sum = lanes[0];
  // Fused as the chains are, whatever the values' types (GCC contracted the loop for some of them).
  for (; i < d; ++i) sum = std::fma(to_acc<acc_t>(a[i]), to_acc<acc_t>(b[i]), sum);
  return sum;
}

// Rows read side by side by the gathers and by the direct projection (project_rows). Rows at random
// addresses arrive at the rate of the misses in flight, and a loop over one row keeps too few in
// flight: the hardware walks a row's lines as one stream. kGatherRows rows read together are that
// many streams at once (the measurements are in docs/serving.md).
constexpr int kGatherRows = 8;

// Rows stored in another type than the compute type are read kWiden values at a time, widened into
// a small buffer first (widen): a conversion of its own is vectorized 256 bits wide, but only 128
// bits wide, or not at all, inside the rows' multiply-adds. Rows in the compute type are read in
// one pass (blocks of them measured slower).
//
// Such narrow rows are also short (an int8 row of 1024 values is 16 cache lines), too short for the
// hardware's stream prefetch to get going: alone, each block waited on its rows' misses. So the
// caller passes the rows of its next group (`ahead`), and each block prefetches the same bytes of
// those that it reads of its own: the next group arrives while this one is summed, a few lines per
// row at a time (all of a group's lines at once would queue behind the current loads). Rows in the
// compute type are long and stream at the copy bandwidth without it (a prefetch measured slower).
constexpr int64_t kWiden = 64;

// values[0..count) in the compute type into wide: 16-bit floats 8 at a time in registers (load_lanes:
// c10's float16 conversion does not vectorize), other types by a loop that GCC vectorizes.
template <typename acc_t, typename src_t>
PEER_VECTOR_CLONES void widen(const src_t* values, acc_t* wide, int64_t count) {
  int64_t begin = 0;
  if constexpr ((std::is_same_v<src_t, c10::BFloat16> || std::is_same_v<src_t, c10::Half>) &&
                std::is_same_v<acc_t, float>) {
    typedef float Lanes __attribute__((vector_size(32)));
    for (; begin + 8 <= count; begin += 8) {
      const Lanes lanes = load_lanes<float, Lanes>(values + begin);
      std::memcpy(wide + begin, &lanes, sizeof lanes);
    }
  }
#pragma omp simd
  for (int64_t j = begin; j < count; ++j) wide[j] = to_acc<acc_t>(values[j]);
}

// kGatherRows rows, block by block: `for (RowBlocks<acc_t, row_t> block(rows, ahead, d); block.next();)`
// gives each block's values [begin, begin + width) of every row in the compute type. `ahead`: the
// next group's rows, or nullptr.
template <typename acc_t, typename row_t>
class RowBlocks {
 public:
  RowBlocks(const row_t* const* rows, const row_t* const* ahead, int64_t d)
      : rows_(rows), ahead_(kInPlace ? nullptr : ahead), d_(d), block_(kInPlace ? d : std::min(kWiden, d)) {}

  bool next() {
    begin_ = end_;
    if (begin_ >= d_) return false;
    end_ = std::min(d_, begin_ + block_);
    const int64_t width = end_ - begin_;
    if (ahead_)
      for (int r = 0; r < kGatherRows; ++r) prefetch_row(ahead_[r] + begin_, width);
    for (int r = 0; r < kGatherRows; ++r) {
      const row_t* row = rows_[r] + begin_;
      if constexpr (kInPlace) {
        values_[r] = row;
      } else {
        widen(row, buffer_[r], width);
        values_[r] = buffer_[r];
      }
    }
    return true;
  }
  int64_t begin() const { return begin_; }
  int64_t width() const { return end_ - begin_; }
  const std::array<const acc_t*, kGatherRows>& values() const { return values_; }

 private:
  static constexpr bool kInPlace = std::is_same_v<row_t, acc_t>;
  const row_t* const* rows_;
  const row_t* const* ahead_;
  int64_t d_, block_, begin_ = 0, end_ = 0;
  acc_t buffer_[kInPlace ? 1 : kGatherRows][kWiden];
  std::array<const acc_t*, kGatherRows> values_;
};

// Hand-written AVX2 paths, taken on CPUs with AVX2 and FMA unless the environment variable
// PEER_KERNELS_CPU_PORTABLE=1 asks for the portable loops (which other CPUs run, and tests compare):
// - int8 rows, the quantized tables' (peer_kernels.quantize_): each 8 values are widened in
//   registers by two instructions and meet the multiply-add there. The widening through RowBlocks'
//   buffer costs a store and a load per value, and its loops bound the 8-bit gather by the CPU, not
//   the memory (measured 4x slower with the rows in cache). The next group's lines are prefetched as
//   in RowBlocks, one line of each row per 64 values read of this group's.
// - the candidates of the sub-key selection (top_sub_keys_bounded): the scores that reach a bound,
//   8 compares to a mask and the mask's lanes packed by a table, with no branch per score.
#if defined(__GNUC__) && defined(__x86_64__)
#define PEER_AVX2 1
__attribute__((target("avx2,fma"))) inline __m256 widen8(const int8_t* values) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(values))));
}

__attribute__((target("avx2,fma"))) inline void prefetch_ahead(const int8_t* const* ahead, int64_t j) {
  if (ahead && j % 64 == 0)
    for (int r = 0; r < kGatherRows; ++r) __builtin_prefetch(ahead[r] + j);
}

__attribute__((target("avx2,fma"))) void dot_rows_int8(const float* q, const int8_t* const* rows,
                                                       const int8_t* const* ahead, int64_t d, float* out) {
  __m256 sums[kGatherRows];
  for (int r = 0; r < kGatherRows; ++r) sums[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    prefetch_ahead(ahead, j);
    const __m256 qj = _mm256_loadu_ps(q + j);
    for (int r = 0; r < kGatherRows; ++r) sums[r] = _mm256_fmadd_ps(qj, widen8(rows[r] + j), sums[r]);
  }
  for (int r = 0; r < kGatherRows; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, sums[r]);
    float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (int64_t i = j; i < d; ++i) sum += q[i] * float(rows[r][i]);
    out[r] = sum;
  }
}

__attribute__((target("avx2,fma"))) void axpy_rows_int8(const float* coef, const int8_t* const* rows,
                                                        const int8_t* const* ahead, float* dst, int64_t d) {
  __m256 c[kGatherRows];
  for (int r = 0; r < kGatherRows; ++r) c[r] = _mm256_set1_ps(coef[r]);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    prefetch_ahead(ahead, j);
    __m256 sum = _mm256_loadu_ps(dst + j);
    for (int r = 0; r < kGatherRows; ++r) sum = _mm256_fmadd_ps(c[r], widen8(rows[r] + j), sum);
    _mm256_storeu_ps(dst + j, sum);
  }
  for (; j < d; ++j) {
    float sum = dst[j];
    for (int r = 0; r < kGatherRows; ++r) sum = std::fma(coef[r], float(rows[r][j]), sum);
    dst[j] = sum;
  }
}

// byte j of kLeftPack[mask]: the lane of mask's j-th set bit.
const std::array<uint64_t, 256> kLeftPack = [] {
  std::array<uint64_t, 256> table{};
  for (int mask = 0; mask < 256; ++mask)
    for (int lane = 0, at = 0; lane < 8; ++lane)
      if (mask >> lane & 1) table[mask] |= uint64_t(lane) << (8 * at++);
  return table;
}();

// The indices i < 8 * groups with scores[i] >= bound, ascending, into candidates (each 8 scores
// store 8 lanes there, of which the count's advance keeps the passing ones); returns their count.
__attribute__((target("avx2,fma"))) int64_t collect_candidates_avx2(const float* scores, int64_t groups, float bound,
                                                                       int32_t* candidates) {
  const __m256 at_least = _mm256_set1_ps(bound);
  int64_t count = 0;
  for (int64_t i = 0; i < 8 * groups; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + i), at_least, _CMP_GE_OQ));
    const __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kLeftPack[mask])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(candidates + count),
                        _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int>(i))));
    count += __builtin_popcount(mask);
  }
  return count;
}

// Set while the library loads, among other constructors: the CPU's features are read first.
const bool kAvx2 = [] {
  __builtin_cpu_init();
  const char* portable = std::getenv("PEER_KERNELS_CPU_PORTABLE");
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !(portable && std::string(portable) == "1");
}();
#else
#define PEER_AVX2 0
#endif

// q . rows[r][0..d) into out[r] for r < kGatherRows. A row's sum is the same whichever rows share its
// call: a caller with fewer rows repeats its last one. `ahead`: the caller's next rows (RowBlocks).
template <typename acc_t, typename row_t>
PEER_VECTOR_CLONES void dot_rows(const acc_t* q, const row_t* const* rows, const row_t* const* ahead, int64_t d,
                                 acc_t* out) {
#if PEER_AVX2
  if constexpr (std::is_same_v<row_t, int8_t> && std::is_same_v<acc_t, float>)
    if (kAvx2) return dot_rows_int8(q, rows, ahead, d, out);
#endif
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
  for (RowBlocks<acc_t, row_t> block(rows, ahead, d); block.next();) {
    const auto [v0, v1, v2, v3, v4, v5, v6, v7] = block.values();
    const acc_t* qi = q + block.begin();
    const int64_t width = block.width();
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t j = 0; j < width; ++j) {
      s0 += qi[j] * v0[j];
      s1 += qi[j] * v1[j];
      s2 += qi[j] * v2[j];
      s3 += qi[j] * v3[j];
      s4 += qi[j] * v4[j];
      s5 += qi[j] * v5[j];
      s6 += qi[j] * v6[j];
      s7 += qi[j] * v7[j];
    }
  }
  const acc_t sums[kGatherRows] = {s0, s1, s2, s3, s4, s5, s6, s7};
  std::copy(sums, sums + kGatherRows, out);
}

// dst[0..d) += coef[r] * rows[r][0..d) for r < kGatherRows, the rows read side by side, added to
// each element in row order: the same sums as kGatherRows calls of axpy. `ahead` as dot_rows's.
template <typename acc_t, typename row_t>
PEER_VECTOR_CLONES void axpy_rows(const acc_t* coef, const row_t* const* rows, const row_t* const* ahead, acc_t* dst,
                                  int64_t d) {
#if PEER_AVX2
  if constexpr (std::is_same_v<row_t, int8_t> && std::is_same_v<acc_t, float>)
    if (kAvx2) return axpy_rows_int8(coef, rows, ahead, dst, d);
#endif
  const acc_t c0 = coef[0], c1 = coef[1], c2 = coef[2], c3 = coef[3];
  const acc_t c4 = coef[4], c5 = coef[5], c6 = coef[6], c7 = coef[7];
  for (RowBlocks<acc_t, row_t> block(rows, ahead, d); block.next();) {
    const auto [v0, v1, v2, v3, v4, v5, v6, v7] = block.values();
    acc_t* di = dst + block.begin();
    const int64_t width = block.width();
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      acc_t sum = di[j];
      sum += c0 * v0[j];
      sum += c1 * v1[j];
      sum += c2 * v2[j];
      sum += c3 * v3[j];
      sum += c4 * v4[j];
      sum += c5 * v5[j];
      sum += c6 * v6[j];
      sum += c7 * v7[j];
      di[j] = sum;
    }
  }
}

template <typename acc_t, typename src_t>
PEER_VECTOR_CLONES void axpy(acc_t alpha, const src_t* src, acc_t* dst, int64_t d) {
  int64_t i = 0;
  for (; i + kVectorLanes <= d; i += kVectorLanes)
#pragma omp simd
    for (int64_t j = 0; j < kVectorLanes; ++j) dst[i + j] += alpha * to_acc<acc_t>(src[i + j]);
  for (; i < d; ++i) dst[i] += alpha * to_acc<acc_t>(src[i]);
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

// ---- the query projection -------------------------------------------------------------------------

// x (T, d_in) @ weight (d_out, d_in)^T -> y (T, d_out) in x's dtype: the layer's bias-free query
// projection (peer_kernels._library.project). ATen's matmul of a few tokens runs on all threads by
// splitting the tokens, so each thread packs the whole weight (8 MB at the paper's shapes) for its
// share of a few rows: measured on 2 cores (Zen 3), 0.53 ms for one token read from memory and 2.4
// ms for 64 tokens. Here each parallel task takes a block of weight's rows for all the tokens,
// written into that block's columns of y: one single-threaded BLAS matmul per block took 0.32 and
// 1.8 ms. Blocks of at least kProjectColumns output features, two per thread (so a descheduled
// thread leaves one to the others). Up to kDirectProjectTokens tokens a task sums its rows itself,
// kGatherRows rows side by side, each streamed from memory once for all the tokens: BLAS's
// matrix-vector product read a weight from memory at 11-13 GB/s on either thread count, a plain
// 2-thread read at 31 GB/s (Zen 4, cold).
constexpr int64_t kProjectColumns = 64;
constexpr int64_t kDirectProjectTokens = 8;

// y[t, first..first + width) = x_acc[t] . weight rows, kGatherRows rows at a time for every token.
// Rows stored in another type than the compute type are converted once for all the tokens (the
// conversion cost as much as the sums, per token), so a token's sums are those of the same rows
// stored in the compute type, however many tokens there are.
template <typename acc_t, typename scalar_t>
void project_rows(const acc_t* x_acc, const scalar_t* weight, int64_t T, int64_t d_in, int64_t d_out, int64_t first,
                  int64_t width, scalar_t* y) {
  constexpr bool kConverted = !std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> converted(kConverted ? kGatherRows * d_in : 0);
  for (int64_t j = first; j < first + width; j += kGatherRows) {
    const int64_t group = std::min<int64_t>(kGatherRows, first + width - j);
    const acc_t* rows[kGatherRows];
    for (int64_t r = 0; r < kGatherRows; ++r) {
      const scalar_t* row = weight + (j + std::min(r, group - 1)) * d_in;
      if constexpr (kConverted) {
        widen(row, converted.data() + r * d_in, d_in);
        rows[r] = converted.data() + r * d_in;
      } else {
        rows[r] = row;
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      acc_t sums[kGatherRows];
      dot_rows(x_acc + t * d_in, rows, static_cast<const acc_t* const*>(nullptr), d_in, sums);
      for (int64_t r = 0; r < group; ++r) y[t * d_out + j + r] = static_cast<scalar_t>(sums[r]);
    }
  }
}

Tensor linear_forward(const Tensor& x_in, const Tensor& weight_in) {
  check_linear(x_in, weight_in);
  // Detached: the matmuls run on OpenMP threads, where autograd's thread-local state is not set.
  // Nor is inference mode's: y, made here under torch.inference_mode(), is an inference tensor,
  // which ATen lets only code in inference mode write, so the tasks enter the caller's mode.
  const Tensor x = x_in.detach(), weight = weight_in.detach();
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  Tensor y = at::empty({T, d_out}, x.options());
  const int64_t blocks = std::clamp<int64_t>(d_out / kProjectColumns, 1, 2 * at::get_num_threads());
  const int64_t columns = (d_out + blocks - 1) / blocks;
  if (T <= kDirectProjectTokens) {
    const Tensor w = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "peer_linear_forward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Tensor x_acc = x.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      const acc_t* x_p = x_acc.data_ptr<acc_t>();
      const scalar_t* w_p = w.data_ptr<scalar_t>();
      scalar_t* y_p = y.data_ptr<scalar_t>();
      parallel_chunks(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t first = block * columns, width = std::min(d_out, first + columns) - first;
          if (width > 0) project_rows(x_p, w_p, T, d_in, d_out, first, width, y_p);
        }
      });
    });
    return y;
  }
  const bool inference = c10::InferenceMode::is_enabled();
  parallel_chunks(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const c10::InferenceMode inference_mode(inference);
    const at::NoGradGuard no_grad;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * columns, width = std::min(d_out, first + columns) - first;
      if (width <= 0) continue;
      Tensor y_block = y.narrow(1, first, width);  // row-major with y's row stride: written in place
      at::mm_out(y_block, x, weight.narrow(0, first, width).t());
    }
  });
  return y;
}

// ---- retrieval -----------------------------------------------------------------------------------

// Sub-key scores are scanned in one of two ways, by the schedule (peer_kernels.tuning.token_schedule
// picks it by the number of tokens); both read the keys in their stored layout, (h or 1, n, 2, dk),
// never re-laid out:
// - "decode" (a few tokens), directly: each parallel task takes one (head, slice of key rows),
//   reads each key row (both halves) once for up to kScanTokens tokens and keeps every token's best
//   k_sub of its slice in each half; the slices' lists are then merged per (token, head, half). The
//   work is spread over heads and key rows however few the tokens.
// - "token_tiles", by matmuls: each parallel task takes one (head, half, chunk of tokens), scores it
//   by one matmul with the half's keys and selects its tokens' best k_sub (16-bit keys are
//   converted to the compute dtype for the matmuls).
// The picks are the same either way (the tie rule orders equal scores by index whatever the order of
// the offers), up to the rounding of the two ways' sums.

// The best k_sub of scores[0..n) into `best` (empty), the same picks as top_sub_keys (peer_math.h),
// without its offers, each of which moves list entries on a mispredicted branch:
// - a bound: score i belongs to lane i % kSelectLanes; each lane keeps its `ranks` largest scores
//   (ranks = k_sub / kSelectLanes, rounded up) in one vector pass with no reduction across lanes,
//   and the least of the lanes' ranks-th largest is reached by at least lanes * ranks >= k_sub
//   scores, so every pick reaches it;
// - the candidates, the scores that reach it (~34 of 1024 Gaussian scores for k_sub = 16), in index
//   order;
// - each candidate's place in the tie rule's order, counted against all the others in vector
//   passes; the first k_sub places are the picks.
// With a NaN among the scores (no order for the bound), fewer whole lane rows than ranks or more than
// kMaxRanks ranks: top_sub_keys over all the scores; with more than kMaxCandidates candidates (a bound
// among many equal scores): the candidates offered to the list.
constexpr int64_t kSelectLanes = 8;
constexpr int kMaxRanks = 4;
constexpr int64_t kMaxCandidates = 64;

// The least of the lanes' kRanks-th largest scores over scores[0..rows * kSelectLanes) into bound;
// returns whether a NaN was seen. A row of lanes is one GCC vector, so the pass is vector compares
// and blends in each of top_sub_keys_bounded's clones (it is inlined there).
template <int kRanks, typename acc_t>
__attribute__((always_inline)) inline bool lane_bound(const acc_t* scores, int64_t rows, acc_t& bound) {
  typedef acc_t Lanes __attribute__((vector_size(kSelectLanes * sizeof(acc_t))));
  Lanes top[kRanks];  // each lane's largest, descending
  for (auto& rank : top)
    for (int64_t lane = 0; lane < kSelectLanes; ++lane) rank[lane] = -std::numeric_limits<acc_t>::infinity();
  decltype(top[0] != top[0]) nans = {};
  for (int64_t row = 0; row < rows; ++row) {
    Lanes value;
    std::memcpy(&value, scores + row * kSelectLanes, sizeof value);
    nans |= value != value;
    for (auto& kept : top) {
      const auto greater = value > kept;
      const Lanes higher = greater ? value : kept;
      value = greater ? kept : value;
      kept = higher;
    }
  }
  bound = top[kRanks - 1][0];
  bool nan = false;
  for (int64_t lane = 0; lane < kSelectLanes; ++lane) {
    bound = std::min(bound, top[kRanks - 1][lane]);
    nan |= nans[lane] != 0;
  }
  return nan;
}

// The indices i < n with scores[i] >= bound, ascending, into candidates (room for n + 8); returns
// their count.
template <typename acc_t>
int64_t collect_candidates(const acc_t* scores, int64_t n, acc_t bound, int32_t* candidates) {
  int64_t count = 0, i = 0;
#if PEER_AVX2
  if constexpr (std::is_same_v<acc_t, float>)
    if (kAvx2) {
      count = collect_candidates_avx2(scores, n / 8, bound, candidates);
      i = n / 8 * 8;
    }
#endif
  for (; i < n; ++i) {  // no branch per score: each index is stored, the count advances past the passing ones
    candidates[count] = int32_t(i);
    count += scores[i] >= bound;
  }
  return count;
}

template <typename acc_t>
PEER_VECTOR_CLONES void top_sub_keys_bounded(const acc_t* scores, int64_t n, TopList<acc_t>& best,
                                             std::vector<int32_t>& scratch) {
  const int ranks = int((best.capacity + kSelectLanes - 1) / kSelectLanes);
  const int64_t rows = n / kSelectLanes;
  if (ranks > kMaxRanks || rows < ranks) return top_sub_keys(scores, int(n), best);
  acc_t bound;
  bool nan;
  switch (ranks) {
    case 1: nan = lane_bound<1>(scores, rows, bound); break;
    case 2: nan = lane_bound<2>(scores, rows, bound); break;
    case 3: nan = lane_bound<3>(scores, rows, bound); break;
    default: nan = lane_bound<kMaxRanks>(scores, rows, bound); break;
  }
  for (int64_t i = rows * kSelectLanes; i < n; ++i) nan |= scores[i] != scores[i];
  if (nan) return top_sub_keys(scores, int(n), best);

  scratch.resize(n + kSelectLanes);
  int32_t* candidates = scratch.data();
  const int64_t count = collect_candidates(scores, n, bound, candidates);
  if (count > kMaxCandidates) {
    for (int64_t c = 0; c < count; ++c) best.offer(scores[candidates[c]], candidates[c]);
    return;
  }

  // place[c]: how many candidates the tie rule ranks before candidate c (a higher score, or an equal
  // one at a smaller index; the candidates are in index order). Places are distinct; the width is
  // whole vectors, past the count padding that nobody reads.
  const int32_t width = int32_t((count + kSelectLanes - 1) / kSelectLanes * kSelectLanes);
  acc_t values[kMaxCandidates];
  int32_t place[kMaxCandidates];
  for (int32_t c = 0; c < width; ++c) {
    values[c] = c < count ? scores[candidates[c]] : acc_t(0);
    place[c] = 0;
  }
  for (int32_t j = 0; j < int32_t(count); ++j) {
    const acc_t value = values[j];
#pragma omp simd
    for (int32_t c = 0; c < width; ++c) place[c] += (value > values[c]) | ((value == values[c]) & (j < c));
  }
  // Placed without a branch per candidate: every place from k_sub on lands in one spare slot.
  acc_t picked_score[kMaxCandidates + 1];
  int64_t picked_index[kMaxCandidates + 1];
  for (int32_t c = 0; c < int32_t(count); ++c) {
    const int32_t at = std::min<int32_t>(place[c], best.capacity);
    picked_score[at] = values[c];
    picked_index[at] = candidates[c];
  }
  std::copy(picked_score, picked_score + best.capacity, best.score);
  std::copy(picked_index, picked_index + best.capacity, best.index);
  best.size = best.capacity;
}

// Key rows of a direct-scan task, at least: a task is a few microseconds of setup.
constexpr int64_t kMinSliceRows = 64;
// Tokens scored per pass over a task's key rows: their scores (2 halves x tokens x rows) stay in
// the core's L2. More tokens than this (a forced decode schedule) take further passes.
constexpr int64_t kScanTokens = 8;

// The direct scan into best (T, h, 2, k_sub) scores and sub-key indices; queries q (T, h, 2, dk) in
// the compute dtype with unit stride in dk, keys as stored.
template <typename acc_t, typename key_t>
void scan_sub_keys(const Tensor& q, const key_t* keys_p, int64_t key_heads, int64_t n, int64_t k_sub, acc_t* best_score,
                   int64_t* best_index) {
  const int64_t T = q.size(0), heads = q.size(1), dk = q.size(3);
  const acc_t* q_p = q.data_ptr<acc_t>();
  const int64_t q_token = q.stride(0), q_head = q.stride(1), q_half = q.stride(2);
  const int64_t threads = at::get_num_threads();
  const int64_t slices = std::max<int64_t>(1, std::min(n / kMinSliceRows, (4 * threads + heads - 1) / heads));
  const int64_t slice_rows = (n + slices - 1) / slices;
  // Each slice's lists: (T, h, 2, slices, k_sub).
  std::vector<acc_t> slice_score(T * heads * 2 * slices * k_sub);
  std::vector<int64_t> slice_index(slice_score.size());
  const auto list = [&](int64_t t, int64_t h, int64_t half, int64_t slice) {
    return ((t * heads + h) * 2 + half) * slices * k_sub + slice * k_sub;
  };
  // A task reads its key rows one after another, both halves of each: one stream in address order,
  // which the hardware prefetches at the copy bandwidth. Rows read side by side (kGatherRows at a
  // time, as the gathers read theirs) are that many short streams 1 KB apart, and a task per half
  // read every other 512 bytes: either streamed at less than half that rate (docs/serving.md).
  // The scores are kept and each list selected at the end, as the token tiles select theirs: an
  // offer per score cost as much as the score's dot product.
  parallel_chunks(0, heads * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(2 * std::min(T, kScanTokens) * slice_rows);  // (half, token, row)
    std::vector<int32_t> selection_scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / slices, slice = task % slices;
      const int64_t first = slice * slice_rows, rows = std::min(n, first + slice_rows) - first;
      if (rows <= 0) continue;
      const key_t* slice_keys = keys_p + ((key_heads == 1 ? 0 : h) * n + first) * 2 * dk;
      for (int64_t t0 = 0; t0 < T; t0 += kScanTokens) {
        const int64_t tokens = std::min(kScanTokens, T - t0);
        const auto at = [&](int64_t half, int64_t t, int64_t i) { return (half * tokens + t) * rows + i; };
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t half = 0; half < 2; ++half)
            for (int64_t t = 0; t < tokens; ++t)
              scores[at(half, t, i)] = dot<acc_t>(q_p + (t0 + t) * q_token + h * q_head + half * q_half,
                                                  slice_keys + (i * 2 + half) * dk, dk);
        for (int64_t half = 0; half < 2; ++half)
          for (int64_t t = 0; t < tokens; ++t) {
            const int64_t m = list(t0 + t, h, half, slice);
            TopList<acc_t> best{slice_score.data() + m, slice_index.data() + m, int(k_sub), 0};
            const acc_t* row_scores = scores.data() + at(half, t, 0);
            if (rows >= k_sub) {
              top_sub_keys_bounded(row_scores, rows, best, selection_scratch);
            } else {
              for (int64_t i = 0; i < rows; ++i) best.offer(row_scores[i], i);
            }
            for (int j = 0; j < best.size; ++j) best.index[j] += first;
          }
      }
    }
  });
  // A slice shorter than k_sub leaves its list short: those slots hold no offer, so merge by sizes.
  parallel_chunks(0, T * heads * 2, kTokenGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      TopList<acc_t> best{best_score + m * k_sub, best_index + m * k_sub, int(k_sub), 0};
      for (int64_t slice = 0; slice < slices; ++slice) {
        const int64_t at = m * slices * k_sub + slice * k_sub;
        const int64_t rows = std::min(n, (slice + 1) * slice_rows) - slice * slice_rows;
        const int64_t offered = std::min(k_sub, std::max<int64_t>(0, rows));
        for (int64_t j = 0; j < offered; ++j) best.offer(slice_score[at + j], slice_index[at + j]);
      }
    }
  });
}

// The "token_tiles" scan into best (T, h, 2, k_sub): tasks of (head, half, kMatmulTokens tokens),
// each one matmul (BLAS, single-threaded inside the task) of the tokens' half-queries with the half's
// key rows, read in place as the matmul's strided operand, into a task-local (tokens, n) block of
// scores that then gives each token its best k_sub.
template <typename acc_t>
void matmul_sub_keys(const Tensor& q, const Tensor& keys, int64_t n, int64_t k_sub, acc_t* best_score,
                     int64_t* best_index) {
  const int64_t T = q.size(0), heads = q.size(1), key_heads = keys.size(0);
  const int64_t chunks = (T + kMatmulTokens - 1) / kMatmulTokens;
  parallel_chunks(0, heads * 2 * chunks, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;
    Tensor block = at::empty({std::min(T, kMatmulTokens), n}, q.options());
    std::vector<int32_t> selection_scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / (2 * chunks), half = task / chunks % 2, t0 = task % chunks * kMatmulTokens;
      const int64_t t1 = std::min(T, t0 + kMatmulTokens);
      Tensor sub = block.narrow(0, 0, t1 - t0);
      at::mm_out(sub, q.slice(0, t0, t1).select(1, h).select(1, half),
                 keys.select(0, key_heads == 1 ? 0 : h).select(1, half).t());
      const acc_t* sub_p = sub.data_ptr<acc_t>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = (t * heads + h) * 2 + half;
        TopList<acc_t> best{best_score + m * k_sub, best_index + m * k_sub, int(k_sub), 0};
        top_sub_keys_bounded(sub_p + (t - t0) * n, n, best, selection_scratch);
      }
    }
  });
}

// queries (T, h, 2, dk), keys (h or 1, n, 2, dk) -> scores (T, h, k) in the compute dtype, sorted
// descending, and expert ids (T, h, k) int64 = a*n + b.
std::vector<Tensor> retrieval_forward(const Tensor& queries, const Tensor& keys_in, int64_t k, int64_t k_sub,
                                      const std::string& schedule) {
  const bool decode = is_decode(schedule);
  const int64_t n = check_retrieval(queries, keys_in, k, k_sub);
  const int64_t T = queries.size(0), heads = queries.size(1), key_heads = keys_in.size(0);
  const auto acc = compute_type(queries.scalar_type());
  // The queries are activations (small): converted, and made unit-stride in dk if they are not. The
  // keys are a parameter: read as stored (a layer's are contiguous; others are made so). Detached:
  // the matmuls below run on OpenMP threads, where autograd's thread-local state is not set.
  Tensor q = queries.to(acc).detach();
  if (q.stride(3) != 1) q = q.contiguous();
  const Tensor keys = keys_in.contiguous().detach();
  Tensor scores = at::empty({T, heads, k}, queries.options().dtype(acc));
  Tensor ids = at::empty({T, heads, k}, queries.options().dtype(at::kLong));
  if (T == 0) return {scores, ids};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "peer_retrieval_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Each (token, head, half)'s best k_sub sub-keys, then each (token, head)'s best k pairs.
    std::vector<acc_t> best_score(T * heads * 2 * k_sub);
    std::vector<int64_t> best_index(best_score.size());
    if (decode) {
      scan_sub_keys<acc_t>(q, keys.data_ptr<scalar_t>(), key_heads, n, k_sub, best_score.data(), best_index.data());
    } else {
      // 16-bit keys meet the matmuls in the compute dtype: a copy, but only for many tokens.
      matmul_sub_keys<acc_t>(q, keys.to(acc), n, k_sub, best_score.data(), best_index.data());
    }
    acc_t* scores_p = scores.data_ptr<acc_t>();
    int64_t* ids_p = ids.data_ptr<int64_t>();
    parallel_chunks(0, T * heads, kTokenGrain * heads, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const TopList<acc_t> best1{best_score.data() + 2 * m * k_sub, best_index.data() + 2 * m * k_sub, int(k_sub),
                                   int(k_sub)};
        const TopList<acc_t> best2{best1.score + k_sub, best1.index + k_sub, int(k_sub), int(k_sub)};
        combine_halves(best1, best2, int(n), int(k), scores_p + m * k, ids_p + m * k);
      }
    });
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

// z (T, h, k) in the compute dtype of x. A parallel task takes kSlotGrain slots ("decode": one
// token's rows spread over the threads) or kTokenGrain tokens ("token_tiles").
Tensor down_forward(const Tensor& x_in, const Tensor& expert_ids, const Tensor& w_down_in,
                    const std::optional<Tensor>& w_down_scale, const std::string& schedule) {
  const bool decode = is_decode(schedule);
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
    parallel_chunks(0, T * slots, decode ? kSlotGrain : kTokenGrain * slots, [&](int64_t begin, int64_t end) {
      // Groups of up to kGatherRows slots of one token (they share x), read side by side; a group
      // that is short repeats its last row. The rows of [slot, slot + count) into `rows`, and their
      // scales fetched: they are as scattered as the rows, and waited for after the rows' sums.
      const auto group = [&](int64_t slot, const scalar_t** rows) {
        const int64_t count = std::min({int64_t(kGatherRows), end - slot, (slot / slots + 1) * slots - slot});
        for (int64_t r = 0; r < kGatherRows; ++r) {
          const int64_t row = id[slot + std::min(r, count - 1)];
          rows[r] = down_p + row * d;
          if (scale_p) __builtin_prefetch(scale_p + row);
        }
        return count;
      };
      const scalar_t* rows[kGatherRows];
      const scalar_t* ahead[kGatherRows];
      for (int64_t slot = begin, count = group(begin, rows); slot < end;) {
        const int64_t next = slot + count, next_count = next < end ? group(next, ahead) : 0;
        acc_t sums[kGatherRows];
        dot_rows(x_p + slot / slots * d, rows, next_count ? ahead : nullptr, d, sums);
        for (int64_t r = 0; r < count; ++r) z_p[slot + r] = sums[r] * row_scale(scale_p, id[slot + r]);
        slot = next, count = next_count;
        if (count) std::copy(ahead, ahead + kGatherRows, rows);
      }
    });
  });
  return z;
}

// y (T, d_out) in the compute dtype (z's).
Tensor mix_forward(const Tensor& z_in, const Tensor& expert_ids, const Tensor& gates_in, const Tensor& w_up_in,
                   const std::string& activation, const std::optional<Tensor>& w_up_scale,
                   const std::string& schedule) {
  const bool decode = is_decode(schedule);
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
    // Each slot's coefficient g act(z), once (a column block below would recompute it). The scales
    // are scattered like the rows, and the activation's call between two of them keeps their misses
    // from overlapping: they are fetched kScaleAhead slots ahead.
    constexpr int64_t kScaleAhead = 16;
    std::vector<acc_t> coef(T * slots);
    parallel_chunks(0, T * slots, kGateGrain, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) {
        if (scale_p && slot + kScaleAhead < end) __builtin_prefetch(scale_p + id[slot + kScaleAhead]);
        acc_t a, slope;
        activate<acc_t>(act, z_p[slot], &a, &slope);
        coef[slot] = g[slot] * a * row_scale(scale_p, id[slot]);
      }
    });
    // A task sums one token's slots over a block of columns: "decode" splits the rows into column
    // blocks (multiples of 16 values) until every thread has several tasks, "token_tiles" takes
    // whole rows, kTokenGrain tokens per task. Each element of y is summed by one task in slot order.
    const int64_t threads = at::get_num_threads();
    const int64_t per_token = (4 * threads + T - 1) / std::max<int64_t>(T, 1);
    const int64_t blocks = decode ? std::max<int64_t>(1, std::min((d + 15) / 16, per_token)) : 1;
    const int64_t columns = ((d + blocks - 1) / blocks + 15) / 16 * 16;
    // A token's whole groups of kGatherRows slots, each prefetching the next group (RowBlocks),
    // the task's last one the next task's first; then its other slots one by one.
    const int64_t groups = slots / kGatherRows;
    const auto group = [&](int64_t task, int64_t index, const scalar_t** rows) {
      const int64_t first = task / blocks * slots + index * kGatherRows, c0 = std::min(d, task % blocks * columns);
      for (int64_t r = 0; r < kGatherRows; ++r) rows[r] = up_p + id[first + r] * d + c0;
    };
    parallel_chunks(0, T * blocks, decode ? 1 : kTokenGrain, [&](int64_t begin, int64_t end) {
      const scalar_t* rows[kGatherRows];
      const scalar_t* ahead[kGatherRows];
      if (groups) group(begin, 0, rows);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / blocks, c0 = std::min(d, task % blocks * columns);
        const int64_t width = std::min(d, c0 + columns) - c0;
        acc_t* y_part = y_p + t * d + c0;
        std::fill(y_part, y_part + width, acc_t(0));
        for (int64_t index = 0; index < groups; ++index) {
          const bool more = index + 1 < groups || task + 1 < end;
          if (more) index + 1 < groups ? group(task, index + 1, ahead) : group(task + 1, 0, ahead);
          axpy_rows(coef.data() + t * slots + index * kGatherRows, rows, more ? ahead : nullptr, y_part, width);
          if (more) std::copy(ahead, ahead + kGatherRows, rows);
        }
        for (int64_t slot = t * slots + groups * kGatherRows; slot < (t + 1) * slots; ++slot)
          axpy(coef[slot], up_p + id[slot] * d + c0, y_part, width);
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
                                    const std::optional<Tensor>& w_down_scale, const std::optional<Tensor>& w_up_scale,
                                    const std::string& schedule) {
  check_tables(x, w_down, w_up);
  const Tensor z = down_forward(x, expert_ids, w_down, w_down_scale, schedule);
  return {mix_forward(z, expert_ids, gates, w_up, activation, w_up_scale, schedule).to(x.scalar_type()), z};
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

std::string vector_paths() {
#if PEER_AVX2
  if (kAvx2) return "avx2";
#endif
  return "portable";
}

}  // namespace
}  // namespace peer

PEER_BIND_EXTENSION("PEER forward/backward on CPU (csrc_reference/peer_cpu.cpp)")
