// Native CPU kernels for the classic recurrent cells (LSTM, GRU in both forms, Elman), called from JAX through
// jax.ffi: one call runs a whole sequence forward, one call runs its backward pass.
//
// Matrix products go through oneDNN's matmul primitive: the recurrent weight is reordered ("packed") once per
// call into oneDNN's blocked layout and reused at every step; the input projection, the input gradient and the
// weight gradients are single products over all T*N rows. A multi-head cell's block-diagonal recurrent weight
// ([heads, H/heads, G/heads]) runs each gate's products as one product batched over the heads (GateProducts), with
// the gates laid out as for the dense weight, so everything else is the dense cell's code. The gate math is plain
// C++ loops over rows, compiled with -O3 -ffast-math so glibc's vector expf/tanhf apply, and spread over the cores
// with OpenMP (the same GNU OpenMP runtime oneDNN uses, so there is one thread pool). With bf16 set, every product
// takes bfloat16 operands and accumulates in float32; gates, cell state and carries stay float32 (the
// mixed-precision policy).
//
// Layout: everything is time-major and batch-flattened: x [T, N, F], ys [T, N, H], masks [T, N] (uint8).
// Semantics equal rnnjax.unroll's: at a reset step the carry is first replaced by zeros; at an invalid step the
// carry is held and the output is zero; reverse runs from the last step to the first.

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind : int64_t { kLstm = 0, kGru = 1, kGruCho = 2, kElmanTanh = 3, kElmanRelu = 4 };


dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// One call at a time: each uses all the cores, and two at once (e.g. the two directions of a bidirectional layer
// run side by side by XLA) would oversubscribe them.
std::mutex& call_mutex() {
  static std::mutex m;
  return m;
}

using bf16 = uint16_t;

inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Asks Linux to back the 2 MiB-aligned interior of a buffer this call is about to write in full with huge pages
// (transparent huge pages in "madvise" mode, the common default), where it can. XLA allocates its output buffers
// afresh for every call, and large allocations come as fresh mappings, so their first writes fault in one page
// at a time: with huge pages training's forward call of the LSTM at B=16 T=512 H=512 took 103 ms instead of 128
// (bfloat16, AMD Zen 4), and fwd+bwd ran 7-15% faster at C1 and C2 (docs/performance.md). Only advice: without
// it, or where the kernel refuses it, nothing changes.
void advise_huge_pages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

memory::desc matrix_desc(int64_t rows, int64_t cols, memory::data_type dt, int64_t ld, bool transposed) {
  return transposed ? memory::desc({rows, cols}, dt, {1, ld}) : memory::desc({rows, cols}, dt, {ld, 1});
}

memory::data_type op_type(bool use_bf16) { return use_bf16 ? memory::data_type::bf16 : memory::data_type::f32; }

// A batch of products: A and C hold `count` matrices, `a_stride` and `c_stride` elements apart; B is one matrix
// shared by all (b_stride 0) or `count` matrices b_stride apart (the heads of a block-diagonal weight).
struct Batch {
  int64_t count = 0, a_stride = 0, c_stride = 0, b_stride = 0;
};

// A [count, rows, cols] batch of matrices, each row-major with leading dim ld (or transposed), `stride` apart.
memory::desc batch_desc(int64_t count, int64_t rows, int64_t cols, memory::data_type dt, int64_t ld, bool transposed,
                        int64_t stride) {
  return transposed ? memory::desc({count, rows, cols}, dt, {stride, 1, ld})
                    : memory::desc({count, rows, cols}, dt, {stride, ld, 1});
}

// Weights packed once per call and shared by the threads whose products want the same layout: one copy in the
// caches instead of one per thread (the recurrent weight of H = 1,024 is 16 MiB in float32). Keyed by the layout
// and the plain weights' address (the heads of a block-diagonal weight share a layout).
class Packs {
 public:
  memory get(const memory::desc& want, memory& plain, dnnl::stream& strm) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& p : packed_)
      if (p.desc == want && p.source == plain.get_data_handle()) return p.mem;
    memory mem(want, cpu_engine());
    dnnl::reorder(plain, mem).execute(strm, plain, mem);
    strm.wait();
    packed_.push_back({want, plain.get_data_handle(), mem});
    return mem;
  }

 private:
  struct Packed {
    memory::desc desc;
    const void* source;
    memory mem;
  };
  std::mutex mutex_;
  std::vector<Packed> packed_;
};

bool is_brgemm(const dnnl::matmul::primitive_desc& pd) { return std::string(pd.impl_info_str()).rfind("brg", 0) == 0; }

// Where oneDNN has no blocked ("brgemm") matmul for the CPU (oneDNN 3.2 on AVX2 CPUs, e.g. AMD Zen 3), it runs
// float32 products on its jit sgemm, which re-packs B at every call: there the weight is a plain copy whose rows are
// padded by 16 elements, since rows a power of two bytes apart (G = 1,024 or 4,096 floats) alias in the cache and
// measured at half the speed (32x256x1024: 29 against 58 GFLOP/s on one Zen 3 core; 8x512x2048: 16 against 34).
memory::desc padded_weights(int64_t K, int64_t N, memory::data_type dt, int64_t count) {
  const int64_t ld = N + 16;
  return count > 0 ? memory::desc({count, K, N}, dt, {K * ld, ld, 1}) : memory::desc({K, N}, dt, {ld, 1});
}

// A product's B operand as it is stored: float32 (converted where the product runs in bf16) or already bf16.
struct BOperand {
  const void* data;
  bool is_bf16;
  BOperand(const float* p) : data(p), is_bf16(false) {}  // NOLINT: implicit, as the float32 weights are passed
  BOperand(const bf16* p) : data(p), is_bf16(true) {}    // NOLINT
  memory::data_type type() const { return is_bf16 ? memory::data_type::bf16 : memory::data_type::f32; }
  BOperand plus(int64_t elements) const {  // the operand `elements` further on
    BOperand out = *this;
    out.data = static_cast<const char*>(data) + elements * (is_bf16 ? sizeof(bf16) : sizeof(float));
    return out;
  }
};

// C[M, N] (+)= A[M, K] B[K, N] (+ bias[N]), C float32 with leading dim ldc (or a Batch of them); A row-major or
// transposed, B row-major with leading dim ldb (a transposed weight is copied so, see Operand). With `packed`, B
// is reordered once into oneDNN's preferred layout (for products run at every step); otherwise it is read in
// place (a float32 B of a bf16 product as a bf16 copy). Each Matmul has its own stream, so threads running their
// own Matmuls need no lock; called inside an OpenMP parallel region, oneDNN runs it on the calling thread alone.
class Matmul {
 public:
  Matmul(int64_t M, int64_t K, int64_t N, int64_t lda, bool a_transposed, BOperand b, int64_t ldb, int64_t ldc,
         bool use_bf16, bool accumulate, bool packed, const float* bias = nullptr, Batch batch = {},
         Packs* packs = nullptr) {
    auto& eng = cpu_engine();
    auto dt = op_type(use_bf16);
    auto a_md = matrix_desc(M, K, dt, lda, a_transposed);
    auto b_plain = matrix_desc(K, N, b.type(), ldb, false);
    auto b_md = packed ? memory::desc({K, N}, dt, memory::format_tag::any) : matrix_desc(K, N, dt, ldb, false);
    auto c_md = memory::desc({M, N}, memory::data_type::f32, {ldc, 1});
    auto bias_md = memory::desc({1, N}, memory::data_type::f32, {N, 1});
    const int64_t b_count = batch.b_stride > 0 ? batch.count : 1;
    if (batch.count > 0) {  // plain A and C with batch strides; B (and the bias) broadcast over the batch or not
      a_md = batch_desc(batch.count, M, K, dt, lda, a_transposed, batch.a_stride);
      const int64_t b_stride = batch.b_stride > 0 ? batch.b_stride : K * ldb;
      b_plain = batch_desc(b_count, K, N, b.type(), ldb, false, b_stride);
      b_md = packed ? memory::desc({b_count, K, N}, dt, memory::format_tag::any)
                    : batch_desc(b_count, K, N, dt, ldb, false, b_stride);
      c_md = memory::desc({batch.count, M, N}, memory::data_type::f32, {batch.c_stride, ldc, 1});
      bias_md = memory::desc({1, 1, N}, memory::data_type::f32, {N, N, 1});
    }
    dnnl::primitive_attr attr;
    if (accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr.set_post_ops(ops);
    }
    auto make_pd = [&] {
      return bias != nullptr ? dnnl::matmul::primitive_desc(eng, a_md, b_md, bias_md, c_md, attr)
                             : dnnl::matmul::primitive_desc(eng, a_md, b_md, c_md, attr);
    };
    auto pd = make_pd();
    if (packed && !use_bf16 && !is_brgemm(pd)) {  // see padded_weights
      b_md = padded_weights(K, N, dt, batch.count > 0 ? b_count : 0);
      pd = make_pd();
    }
    if (bias != nullptr) args_[DNNL_ARG_BIAS] = memory(bias_md, eng, const_cast<float*>(bias));
    prim_ = dnnl::matmul(pd);
    a_mem_ = memory(pd.src_desc(), eng, DNNL_MEMORY_NONE);
    c_mem_ = memory(pd.dst_desc(), eng, DNNL_MEMORY_NONE);
    memory plain(b_plain, eng, const_cast<void*>(b.data));
    memory weights = plain;
    if (packs != nullptr) {
      weights = packs->get(pd.weights_desc(), plain, strm_);
    } else if (packed || (use_bf16 && !b.is_bf16)) {
      weights = memory(pd.weights_desc(), eng);
      dnnl::reorder(plain, weights).execute(strm_, plain, weights);
    }
    args_[DNNL_ARG_SRC] = a_mem_;
    args_[DNNL_ARG_WEIGHTS] = weights;
    args_[DNNL_ARG_DST] = c_mem_;
  }

  void run(const void* a, float* c) {
    a_mem_.set_data_handle(const_cast<void*>(a));  // the memories in args_ share these handles
    c_mem_.set_data_handle(c);
    prim_.execute(strm_, args_);
  }

 private:
  dnnl::stream strm_{cpu_engine()};
  dnnl::matmul prim_;
  memory a_mem_, c_mem_;
  std::unordered_map<int, memory> args_;
};

inline void store(float* out, float v) { *out = v; }
inline void store(bf16* out, float v) { *out = to_bf16(v); }

// out[m] = in[m]^T for `count` [rows, cols] matrices, over the cores, in tiles of 16 rows by 128 columns: each row of
// a tile is 512 contiguous bytes of the input, which the hardware prefetcher streams, where the 128 bytes of a row of
// a 32 x 32 tile were not. The weight the backward call transposes has usually left the caches since the forward
// call: from memory, 512 x 2048 float32 to bf16 took 0.54 ms against 0.98 with 32 x 32 tiles, 1024 x 4096 1.9
// against 3.1 ms (2 threads, AMD Zen 4; no slower from the caches).
template <typename T>
void transpose_into(const float* in, T* out, int64_t count, int64_t rows, int64_t cols) {
  constexpr int64_t kRows = 16, kCols = 128;
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t m = 0; m < count; ++m)
    for (int64_t j0 = 0; j0 < cols; j0 += kCols)
      for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
        const float* a = in + m * rows * cols;
        T* b = out + m * rows * cols;
        const int64_t i1 = std::min(rows, i0 + kRows), j1 = std::min(cols, j0 + kCols);
        float tile[kCols][kRows];
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) tile[j - j0][i - i0] = a[i * cols + j];
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t i = i0; i < i1; ++i) store(b + j * rows + i, tile[j - j0][i - i0]);
      }
}

// A float32 array converted to bf16 (a copy) or left as it is; or, made by transposed(), a copy of `count` [rows,
// cols] matrices each transposed to [cols, rows] (in bf16 or float32). The copies are made over the cores.
//
// Weights are passed to the products this way, as plain row-major operands of the product's own type, copied
// before the time loop's threads start: oneDNN packs such a weight on its fast path (a 2048 x 512 bf16 weight in
// 0.04 ms on an AMD Zen 4), but a transposed or a float32-to-bf16 one on a generic one (1.3 ms and 0.6 ms), and on
// the one thread that first needs it while the others wait: at LSTM B=64 T=8 H=512 in bf16 that was 2.5 ms of the
// 12.6 ms of forward and backward.
class Operand {
 public:
  Operand(const float* data, int64_t n, bool use_bf16) : f32_(data) {
    if (!use_bf16) return;
    bf16_.reset(new bf16[n]);  // not value-initialised: every element is written below
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) bf16_[i] = to_bf16(data[i]);
  }
  static Operand transposed(const float* data, int64_t count, int64_t rows, int64_t cols, bool use_bf16) {
    Operand out(nullptr, 0, false);
    const int64_t n = count * rows * cols;
    if (use_bf16) {
      out.bf16_.reset(new bf16[n]);
      transpose_into(data, out.bf16_.get(), count, rows, cols);
    } else {
      out.f32_copy_.reset(new float[n]);
      transpose_into(data, out.f32_copy_.get(), count, rows, cols);
      out.f32_ = out.f32_copy_.get();
    }
    return out;
  }
  const void* get() const { return b().data; }
  BOperand b() const { return bf16_ ? BOperand(bf16_.get()) : BOperand(f32_); }

 private:
  const float* f32_;
  std::unique_ptr<bf16[]> bf16_;
  std::unique_ptr<float[]> f32_copy_;
};

// The threads that run the time loop, each on its own rows of the batch: rows are independent in a recurrence, so
// each thread runs every step on its shard (its own recurrent product, then its rows' gates) with no barrier
// between steps. Fewer than kMinRows rows per thread would make the per-thread products too thin.
constexpr int64_t kMinRows = 4;

int loop_threads(int64_t N) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), N / kMinRows)));
}

struct Shard {
  int64_t n0, n1;
};

Shard shard_of(int64_t N, int nt, int id) { return Shard{N * id / nt, N * (id + 1) / nt}; }

// Runs fn() with OpenMP's thread count (and so oneDNN's) set to 1 on this thread meanwhile.
template <typename Fn>
void on_one_thread(Fn fn) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  fn();
  omp_set_num_threads(saved);
}

struct Sizes {
  int64_t T, N, F, H, G;  // G: the gate width, gates * H
  int64_t kind;
  bool reverse, use_bf16;
  int64_t heads;  // > 1: W_hh is block-diagonal, stored as [heads, H / heads, G / heads]
};

Sizes sizes_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w_hh, int64_t kind, bool reverse, bool use_bf16) {
  auto xd = x.dimensions();
  auto wd = w_hh.dimensions();
  if (wd.size() == 3) return Sizes{xd[0], xd[1], xd[2], wd[0] * wd[1], wd[0] * wd[2], kind, reverse, use_bf16, wd[0]};
  return Sizes{xd[0], xd[1], xd[2], wd[0], wd[1], kind, reverse, use_bf16, 1};
}

// The products with the recurrent weight over its gate blocks [g0, g1) (columns [g0 * H, g1 * H) of the dense
// W_hh [H, G]), with A and C laid out as for the dense weight (gate-major):
//   forward    C[M, (g1 - g0) * H] (+)= A[M, H] W_hh[:, g0 * H : g1 * H]
//   transposed C[M, H] (+)= A[M, (g1 - g0) * H] W_hh[:, g0 * H : g1 * H]^T
// `w` is W_hh as stored (forward) or its transpose W_hh^T [G, H] (transposed; with heads, each head's block
// transposed: [heads, G / heads, H / heads]), in the products' type (Operand). Dense, that is one product. With
// heads (each head's block of W_hh [d, gates * d] holds its gates side by side), it is one product per gate,
// batched over the heads: gate g of head k maps units [k d, (k + 1) d) to units [k d, (k + 1) d) of the gate's
// block, so each is a [M, d] x [d, d] product whose A and C are strided views.
class GateProducts {
 public:
  GateProducts(const Sizes& s, int64_t M, int64_t g0, int64_t g1, int64_t lda, BOperand w, bool transposed,
               int64_t ldc, bool accumulate, Packs* packs)
      : H_(s.H), transposed_(transposed), elem_(s.use_bf16 ? sizeof(bf16) : sizeof(float)) {
    const int64_t H = s.H, G = s.G, width = (g1 - g0) * H;
    const bool b16 = s.use_bf16;
    if (s.heads == 1) {
      // Forward: W_hh's columns [g0 H, g1 H) (leading dim G); transposed: W_hh^T's rows [g0 H, g1 H) (leading dim H).
      parts_.push_back(std::make_unique<Matmul>(M, transposed ? width : H, transposed ? H : width, lda, false,
                                                w.plus(g0 * H * (transposed ? H : 1)), transposed ? H : G, ldc, b16,
                                                accumulate, true, nullptr, Batch{}, packs));
      return;
    }
    const int64_t n = s.heads, d = H / n, gw = G / n;
    for (int64_t g = g0; g < g1; ++g)
      parts_.push_back(std::make_unique<Matmul>(M, d, d, lda, false, w.plus(g * d * (transposed ? d : 1)),
                                                transposed ? d : gw, ldc, b16,
                                                accumulate || (transposed && g > g0), true, nullptr,
                                                Batch{n, d, d, d * gw}, packs));
  }

  // Part i covers gate block g0 + i: its C (forward) or A (transposed) starts i * H columns further.
  void run(const void* a, float* c) {
    for (size_t i = 0; i < parts_.size(); ++i) {
      const int64_t shift = static_cast<int64_t>(i) * H_;
      if (transposed_) {
        parts_[i]->run(static_cast<const char*>(a) + shift * elem_, c);
      } else {
        parts_[i]->run(a, c + shift);
      }
    }
  }

 private:
  int64_t H_;
  bool transposed_;
  size_t elem_;
  std::vector<std::unique_ptr<Matmul>> parts_;
};

// oneDNN's blocked ("brgemm") matmul, which keeps a packed weight, needs AVX-512; without it (oneDNN 3.2 on AVX2)
// each product runs oneDNN's jit sgemm, which packs its B anew at every call. There, a batch of fewer than
// kTeamRows rows runs as one shard whose products use all the cores (oneDNN splits each one): thin per-thread
// products would each pack the whole weight. Measured on a 2-core AMD Zen 3, LSTM B=16 T=512 H=512: forward 19.0k
// against 16.5k tokens/s, forward and backward 6.3k against 4.8k; at B=64 row shards stay faster (86-100k against
// 60k forward). The team synchronises at every step, so only products of at least kTeamWork multiply-adds per step
// (about 0.1 ms on one core) run that way: smaller ones stay on row shards, which never wait for each other, also
// when the process has more threads than cores (pytest -n 2 on 2 cores).
constexpr int64_t kTeamRows = 32, kTeamWork = int64_t(1) << 22;

bool has_blocked_matmul() {
  static const bool yes = dnnl::get_effective_cpu_isa() >= dnnl::cpu_isa::avx512_core;
  return yes;
}

// Runs shard(Shard) on loop_threads(N) threads. With one, the shard runs on the calling thread with OpenMP's thread
// count set to 1 meanwhile: a team of one is not an active parallel region, so oneDNN would otherwise fork all the
// cores for every tiny per-step product (B = 1), and wait for them at every step.
template <typename Fn>
void run_shards(const Sizes& s, Fn shard) {
  const int64_t N = s.N;
  const int nt = loop_threads(N);
  if (nt == 1) return on_one_thread([&] { shard(Shard{0, N}); });
  if (N < kTeamRows && N * s.H * s.G / s.heads >= kTeamWork && !has_blocked_matmul()) return shard(Shard{0, N});
#pragma omp parallel num_threads(nt)
  shard(shard_of(N, omp_get_num_threads(), omp_get_thread_num()));
}

inline int64_t time_at(const Sizes& s, int64_t step) { return s.reverse ? s.T - 1 - step : step; }

// Whether a shard is a team's: every row, run outside a parallel region with oneDNN splitting its products over the
// cores. Its per-row work (the gate math between products) is split over them too, not left to one core.
inline bool in_team() { return !omp_in_parallel() && omp_get_max_threads() > 1; }

template <typename Fn>
void for_rows(Shard sh, bool team, Fn fn) {
#pragma omp parallel for schedule(static) if (team)
  for (int64_t n = sh.n0; n < sh.n1; ++n) fn(n);
}

inline bool is_valid(const uint8_t* valid, int64_t t, int64_t N, int64_t n) {
  return valid == nullptr || valid[t * N + n] != 0;
}

using F = float* __restrict;
using CF = const float* __restrict;

// ---------------------------------------------------------------------------------------------------------------
// Forward. Each thread runs the whole sequence on its own rows, a chunk of steps at a time: first the input
// projection of the chunk's steps for its rows (one batched product, with b_ih), written straight into the gate
// rows, then step by step its recurrent product and its rows' gates, which overwrite the projection in place with
// the activations. Training keeps every step's gates and extras (the residuals of the backward pass) in XLA's
// buffers; inference (save=false) keeps only a chunk of them, in a workspace of the thread's own.

// Where a step's gate row [G] and extra row [H] live: row(t, n) = base + (t - t0) * t_stride + (n - n0) * width.
struct Rows {
  float* base;
  int64_t t0, n0, t_stride, width;
  float* at(int64_t t, int64_t n) const { return base + (t - t0) * t_stride + (n - n0) * width; }
};

struct Fwd {
  const Sizes& s;
  const float* x;        // [T, N, F]
  BOperand w_ih;         // [F, G], in the products' type
  BOperand w_hh;         // [H, G] (with heads [heads, H / heads, G / heads]), in the products' type
  const float* b_ih;     // [G]
  const float* b_hh;     // [G]
  const uint8_t* valid;  // [T, N] or null
  const uint8_t* resets;  // [T, N] or null
  float* ys;             // [T, N, H]
  float* hs_prev;        // [T, N, H]: h read by each step (training only)
  float* gates;          // [T, N, G] (training only)
  float* extra;          // [T, N, H]: LSTM c_prev, GRU h_n, Cho GRU r*h (training only)
  float* h;              // [N, H] carry
  float* c;              // [N, H] LSTM cell state
  bf16* hb;              // [N, H] bf16 copy of h (bf16 only)
  Packs* packs;          // the packed weights the threads share
};

// The gate loops take restrict-qualified parameters (GCC honours restrict on parameters and then vectorizes them
// with glibc's vector expf/tanhf); x holds a row's projection on entry and its activations on return.
void sigmoid_add(F x, CF z, CF b, int64_t m) {
  for (int64_t j = 0; j < m; ++j) x[j] = sigmoid(x[j] + z[j] + b[j]);
}

void tanh_add(F x, CF z, CF b, int64_t m) {
  for (int64_t j = 0; j < m; ++j) x[j] = tanhf(x[j] + z[j] + b[j]);
}

void relu_add(F x, CF z, CF b, int64_t m) {
  for (int64_t j = 0; j < m; ++j) x[j] = std::max(x[j] + z[j] + b[j], 0.0f);
}

void lstm_state_loop(CF g, F c, F c_prev, F hn, int64_t H, bool v) {  // g: i, f, g, o
  for (int64_t j = 0; j < H; ++j) {
    const float cp = c[j], cn = g[H + j] * cp + g[j] * g[2 * H + j];
    c_prev[j] = cp;
    hn[j] = g[3 * H + j] * tanhf(cn);
    c[j] = v ? cn : cp;
  }
}

void gru_n_loop(F g, CF z, CF b, CF h, F hh, F hn, int64_t H) {  // g: r, z, n (the projection on entry)
  for (int64_t j = 0; j < H; ++j) {
    hh[j] = z[2 * H + j] + b[2 * H + j];
    const float ng = tanhf(g[2 * H + j] + g[j] * hh[j]);
    g[2 * H + j] = ng;
    hn[j] = ng + g[H + j] * (h[j] - ng);
  }
}

void times(CF a, CF b, F out, int64_t m) {
  for (int64_t j = 0; j < m; ++j) out[j] = a[j] * b[j];
}

void mix_loop(CF ng, CF zg, CF h, F hn, int64_t H) {
  for (int64_t j = 0; j < H; ++j) hn[j] = ng[j] + zg[j] * (h[j] - ng[j]);
}

// One row's step up to its new h (written to ys); the Cho GRU's first half only (r, z and r*h).
void gates_row(const Fwd& f, float* g, float* e, const float* z, int64_t t, int64_t n) {
  const int64_t H = f.s.H;
  const float* b = f.b_hh;
  float* y = f.ys + (t * f.s.N + n) * H;
  switch (f.s.kind) {
    case kLstm:
      for (int k : {0, 1, 3}) sigmoid_add(g + k * H, z + k * H, b + k * H, H);
      tanh_add(g + 2 * H, z + 2 * H, b + 2 * H, H);
      return lstm_state_loop(g, f.c + n * H, e, y, H, is_valid(f.valid, t, f.s.N, n));
    case kGru:
      sigmoid_add(g, z, b, 2 * H);
      return gru_n_loop(g, z, b, f.h + n * H, e, y, H);
    case kGruCho:
      sigmoid_add(g, z, b, 2 * H);
      return times(g, f.h + n * H, e, H);
    case kElmanRelu:
      relu_add(g, z, b, H);
      return (void)std::memcpy(y, g, sizeof(float) * H);
    default:
      tanh_add(g, z, b, H);
      return (void)std::memcpy(y, g, sizeof(float) * H);
  }
}

// The new h was written to the output row: at a valid step it becomes the carry (and its bf16 copy); at an
// invalid step the carry is held and the output is zero.
void store_h(const Fwd& f, int64_t t, int64_t n) {
  const int64_t H = f.s.H, row = t * f.s.N + n;
  float* y = f.ys + row * H;
  float* h = f.h + n * H;
  if (is_valid(f.valid, t, f.s.N, n)) {
    std::memcpy(h, y, sizeof(float) * H);
    if (f.hb != nullptr)
      for (int64_t j = 0; j < H; ++j) f.hb[n * H + j] = to_bf16(h[j]);
  } else {
    std::fill(y, y + H, 0.0f);
  }
}

// Zeroes the carry of the shard's rows that reset at step t, and records the h each row reads.
void begin_step(const Fwd& f, Shard sh, int64_t t) {
  const int64_t N = f.s.N, H = f.s.H;
  for (int64_t n = sh.n0; n < sh.n1 && f.resets != nullptr; ++n) {
    if (!f.resets[t * N + n]) continue;
    std::fill(f.h + n * H, f.h + (n + 1) * H, 0.0f);
    if (f.c != nullptr) std::fill(f.c + n * H, f.c + (n + 1) * H, 0.0f);
    if (f.hb != nullptr) std::fill(f.hb + n * H, f.hb + (n + 1) * H, bf16(0));
  }
  if (f.hs_prev != nullptr)
    std::memcpy(f.hs_prev + (t * N + sh.n0) * H, f.h + sh.n0 * H, sizeof(float) * (sh.n1 - sh.n0) * H);
}

// Steps per chunk: about 1 MiB of one thread's gate rows.
int64_t chunk_steps(int64_t M, int64_t G) { return std::max<int64_t>(1, (1 << 20) / (4 * M * G)); }

// The thread's input projection of steps [t_lo, t_lo + k) for its rows, into their gate rows.
class Projection {
 public:
  Projection(const Fwd& f, Shard sh, const Rows& gates) : f_(f), sh_(sh), gates_(gates) {}

  void run(int64_t t_lo, int64_t k) {
    const Sizes& s = f_.s;
    const int64_t M = sh_.n1 - sh_.n0, F = s.F, N = s.N;
    const float* x = f_.x + (t_lo * N + sh_.n0) * F;
    const void* a = x;
    int64_t a_stride = N * F;
    if (s.use_bf16) {  // the chunk's rows as a dense bf16 [k, M, F] copy
      xb_.resize(k * M * F);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < M * F; ++j) xb_[i * M * F + j] = to_bf16(x[i * N * F + j]);
      a = xb_.data();
      a_stride = M * F;
    }
    // One thread holding every row reads (and writes) the chunk's rows contiguously: one [k*M, F] product (its
    // last chunk, if shorter, has a product of its own). Otherwise its rows are k blocks of M rows, N rows apart:
    // one [M, F] product per step. (Not a batch of k products with those strides: oneDNN runs such a batch on its
    // plain gemm, which packs the weight anew for every product, not on its blocked matmul: measured on an AMD
    // Zen 4 at LSTM B16 T512 H512, the forward call of training ran at 0.57x inference in bfloat16.)
    if (M == N) {
      if (k_full_ == 0) k_full_ = k;
      auto& slot = k == k_full_ ? full_ : rest_;  // every chunk but the last has the same length
      if (slot == nullptr) slot = product(k * M);
      return slot->run(a, gates_.at(t_lo, sh_.n0));
    }
    if (step_ == nullptr) step_ = product(M);
    const size_t elem = s.use_bf16 ? sizeof(bf16) : sizeof(float);
    for (int64_t i = 0; i < k; ++i)
      step_->run(static_cast<const char*>(a) + i * a_stride * elem, gates_.at(t_lo + i, sh_.n0));
  }

 private:
  std::unique_ptr<Matmul> product(int64_t rows) const {
    return std::make_unique<Matmul>(rows, f_.s.F, f_.s.G, f_.s.F, false, f_.w_ih, f_.s.G, f_.s.G,
                                    f_.s.use_bf16, false, true, f_.b_ih, Batch{}, f_.packs);
  }

  const Fwd& f_;
  Shard sh_;
  const Rows& gates_;
  int64_t k_full_ = 0;
  std::unique_ptr<Matmul> full_, rest_, step_;  // a whole chunk, a shorter last chunk, one step
  std::vector<bf16> xb_;
};

// One thread's time loop over its shard of rows.
void forward_shard(const Fwd& f, Shard sh) {
  const Sizes& s = f.s;
  const int64_t H = s.H, G = s.G, N = s.N, M = sh.n1 - sh.n0;
  if (M == 0) return;
  const bool cho = s.kind == kGruCho, b16 = s.use_bf16, save = f.gates != nullptr, team = in_team();
  const int64_t rz = cho ? 2 * H : G, K = chunk_steps(M, G);
  std::vector<float> work(save ? 0 : K * M * G), extra(save ? 0 : M * H), z(M * rz), z2(cho ? M * H : 0);
  std::vector<bf16> rhb(b16 && cho ? M * H : 0);
  // Training: rows of the whole [T, N, *] outputs; inference: this thread's chunk workspace, extras of one step.
  Rows gates = save ? Rows{f.gates, 0, 0, N * G, G} : Rows{work.data(), 0, sh.n0, M * G, G};
  Rows extras = save ? Rows{f.extra, 0, 0, N * H, H} : Rows{extra.data(), 0, sh.n0, 0, H};
  Projection proj(f, sh, gates);
  GateProducts rec(s, M, 0, rz / H, H, f.w_hh, false, rz, false, f.packs);
  std::unique_ptr<GateProducts> cand;  // the Cho GRU's candidate product reads r*h from the extras (or its bf16 copy)
  if (cho) cand = std::make_unique<GateProducts>(s, M, 2, 3, H, f.w_hh, false, H, false, f.packs);
  for (int64_t s0 = 0; s0 < s.T; s0 += K) {
    const int64_t k = std::min(K, s.T - s0), t_lo = s.reverse ? s.T - s0 - k : s0;
    if (!save) gates.t0 = t_lo;
    proj.run(t_lo, k);
    for (int64_t step = s0; step < s0 + k; ++step) {
      const int64_t t = time_at(s, step);
      begin_step(f, sh, t);
      rec.run(b16 ? static_cast<const void*>(f.hb + sh.n0 * H) : f.h + sh.n0 * H, z.data());
      for_rows(sh, team, [&](int64_t n) {
        gates_row(f, gates.at(t, n), extras.at(t, n), &z[(n - sh.n0) * rz], t, n);
        if (!cho) return store_h(f, t, n);
        if (b16)
          for (int64_t j = 0; j < H; ++j) rhb[(n - sh.n0) * H + j] = to_bf16(extras.at(t, n)[j]);
      });
      if (!cho) continue;
      cand->run(b16 ? static_cast<const void*>(rhb.data()) : extras.at(t, sh.n0), z2.data());
      for_rows(sh, team, [&](int64_t n) {
        float* g = gates.at(t, n);
        tanh_add(g + 2 * H, &z2[(n - sh.n0) * H], f.b_hh + 2 * H, H);
        mix_loop(g + 2 * H, g + H, f.h + n * H, f.ys + (t * N + n) * H, H);
        store_h(f, t, n);
      });
    }
  }
}

ffi::Error rnn_fwd(ffi::AnyBuffer x, ffi::AnyBuffer w_ih, ffi::AnyBuffer w_hh, ffi::AnyBuffer b_ih,
                   ffi::AnyBuffer b_hh, ffi::AnyBuffer h0, ffi::AnyBuffer c0, ffi::AnyBuffer valid,
                   ffi::AnyBuffer resets, ffi::Result<ffi::AnyBuffer> ys, ffi::Result<ffi::AnyBuffer> h_out,
                   ffi::Result<ffi::AnyBuffer> c_out, ffi::Result<ffi::AnyBuffer> hs_prev,
                   ffi::Result<ffi::AnyBuffer> gates, ffi::Result<ffi::AnyBuffer> extra, int64_t kind, bool reverse,
                   bool use_bf16, bool save) {
  std::lock_guard<std::mutex> lock(call_mutex());
  const Sizes s = sizes_of(x, w_hh, kind, reverse, use_bf16);
  const int64_t N = s.N, H = s.H;
  float* h = h_out->typed_data<float>();
  std::memcpy(h, h0.typed_data<float>(), sizeof(float) * N * H);
  float* c = c_out->typed_data<float>();
  if (kind == kLstm) {
    std::memcpy(c, c0.typed_data<float>(), sizeof(float) * N * H);
  } else {
    std::memset(c, 0, sizeof(float) * N * H);
  }
  std::vector<bf16> hb(use_bf16 ? N * H : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(hb.size()); ++i) hb[i] = to_bf16(h[i]);
  advise_huge_pages(ys->untyped_data(), ys->size_bytes());
  if (save)
    for (auto* kept : {&hs_prev, &gates, &extra}) advise_huge_pages((*kept)->untyped_data(), (*kept)->size_bytes());
  Packs packs;
  const Operand wi(w_ih.typed_data<float>(), w_ih.element_count(), use_bf16),
      wh(w_hh.typed_data<float>(), w_hh.element_count(), use_bf16);
  Fwd f{s, x.typed_data<float>(), wi.b(), wh.b(), b_ih.typed_data<float>(),
        b_hh.typed_data<float>(), valid.element_count() ? valid.typed_data<uint8_t>() : nullptr,
        resets.element_count() ? resets.typed_data<uint8_t>() : nullptr, ys->typed_data<float>(),
        save ? hs_prev->typed_data<float>() : nullptr, save ? gates->typed_data<float>() : nullptr,
        save ? extra->typed_data<float>() : nullptr, h, kind == kLstm ? c : nullptr, use_bf16 ? hb.data() : nullptr,
        &packs};
  run_shards(s, [&](Shard sh) { forward_shard(f, sh); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// Backward

// The backward call works in place: XLA hands it the forward call's gates as its dzx output (and, for the GRU, the
// extras as its dzh_n output; input_output_aliases), and each step's activations are overwritten by their
// cotangents once read. Only the LSTM's c_prev and the Cho GRU's r*h extras are read from an input.
struct Bwd {
  const Sizes& s;
  const uint8_t* valid;
  const uint8_t* resets;
  const float* dys;      // [T, N, H]
  const float* hs_prev;  // [T, N, H]
  const float* extra;    // [T, N, H]: LSTM c_prev, Cho GRU r*h
  float* dzx;            // [T, N, G]: the gates on entry; d(pre-activations) of the input part on return
  float* dzh_n;          // [T, N, H] GRU: h_n on entry; d(h_n) of the recurrent part's n block on return
  float* dh;             // [N, H] carry cotangent
  float* dc;             // [N, H] LSTM cell-state cotangent
  float* gs;             // [N, G] GRU: this step's source of the product with W_hh^T ([dz_r, dz_z, dzh_n])
  float* tmp;            // [N, H] Cho GRU: dh of this step
  float* nsave;          // [N, H] Cho GRU: n of this step (overwritten by its cotangent before the second half)
  float* drh;            // [N, H] Cho GRU: d(r*h)
  bf16* dzb;             // [T, N, G] bf16 copy of the per-step products' source: dzx (the GRU: gs) (bf16 only)
  bf16* dnb;             // [T, N, H] GRU: bf16 copy of dzx's n block, d(n), for dW_ih (bf16 only)
};

// An invalid row outputs zero and passes its carry cotangents through: its pre-activation cotangents are zero.
void invalid_row(const Bwd& b, int64_t t, int64_t n) {
  const int64_t H = b.s.H, G = b.s.G, row = t * b.s.N + n;
  std::fill(b.dzx + row * G, b.dzx + (row + 1) * G, 0.0f);
  if (b.dzh_n != nullptr) {
    std::fill(b.dzh_n + row * H, b.dzh_n + (row + 1) * H, 0.0f);
    std::fill(b.gs + n * G, b.gs + (n + 1) * G, 0.0f);
  }
}

// gz: a row's gates i, f, g, o on entry, their pre-activations' cotangents on return.
void lstm_bwd_loop(F gz, CF cprev, CF dy, F dh, F dc, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const float i = gz[j], f = gz[H + j], gg = gz[2 * H + j], o = gz[3 * H + j], cp = cprev[j];
    const float tc = tanhf(f * cp + i * gg);
    const float dhj = dh[j] + dy[j];
    const float dcj = dc[j] + dhj * o * (1.0f - tc * tc);
    gz[j] = dcj * gg * i * (1.0f - i);
    gz[H + j] = dcj * cp * f * (1.0f - f);
    gz[2 * H + j] = dcj * i * (1.0f - gg * gg);
    gz[3 * H + j] = dhj * tc * o * (1.0f - o);
    dc[j] = dcj * f;
    dh[j] = 0.0f;
  }
}

// gz: r, z, n on entry; hz: h_n on entry, r * d(n) on return.
void gru_bwd_loop(F gz, F hz, CF hp, CF dy, F dh, F gs, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const float rg = gz[j], zg = gz[H + j], ng = gz[2 * H + j], hh = hz[j];
    const float dhj = dh[j] + dy[j];
    const float dn = dhj * (1.0f - zg) * (1.0f - ng * ng);
    const float dr = dn * hh * rg * (1.0f - rg), dzz = dhj * (hp[j] - ng) * zg * (1.0f - zg);
    gz[j] = dr, gz[H + j] = dzz, gz[2 * H + j] = dn;
    hz[j] = dn * rg;
    gs[j] = dr, gs[H + j] = dzz, gs[2 * H + j] = dn * rg;
    dh[j] = dhj * zg;
  }
}

// Cho GRU, first half of the backward step: the candidate's cotangent (over n, which is saved first), the source
// of d(r*h) = dn W_hn^T.
void gru_cho_bwd_n_loop(F gz, CF dy, CF dh, F tmp, F nsave, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const float zg = gz[H + j], ng = gz[2 * H + j];
    const float dhj = dh[j] + dy[j];
    tmp[j] = dhj;
    nsave[j] = ng;
    gz[2 * H + j] = dhj * (1.0f - zg) * (1.0f - ng * ng);
  }
}

// Second half: with d(r*h) in drh, the r and z cotangents and the direct part of dh.
void gru_cho_bwd_rz_loop(F gz, CF hp, CF drh, CF tmp, CF nsave, F dh, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const float rg = gz[j], zg = gz[H + j], ng = nsave[j], d = drh[j], dhj = tmp[j];
    gz[j] = d * hp[j] * rg * (1.0f - rg);
    gz[H + j] = dhj * (hp[j] - ng) * zg * (1.0f - zg);
    dh[j] = dhj * zg + d * rg;
  }
}

// gz: the new h on entry, its pre-activation's cotangent on return.
void elman_bwd_loop(F gz, CF dy, F dh, int64_t H, bool relu) {
  if (relu) {
    for (int64_t j = 0; j < H; ++j) gz[j] = gz[j] > 0.0f ? dh[j] + dy[j] : 0.0f;
  } else {
    for (int64_t j = 0; j < H; ++j) gz[j] = (dh[j] + dy[j]) * (1.0f - gz[j] * gz[j]);
  }
  for (int64_t j = 0; j < H; ++j) dh[j] = 0.0f;
}

// The first (or only) half of a backward step for row n: everything up to the product with W_hh^T.
void bwd_row(const Bwd& b, int64_t t, int64_t n) {
  const int64_t H = b.s.H, G = b.s.G, row = t * b.s.N + n;
  if (!is_valid(b.valid, t, b.s.N, n)) return invalid_row(b, t, n);
  const float* dy = b.dys + row * H;
  float* gz = b.dzx + row * G;
  switch (b.s.kind) {
    case kLstm: return lstm_bwd_loop(gz, b.extra + row * H, dy, b.dh + n * H, b.dc + n * H, H);
    case kGru: return gru_bwd_loop(gz, b.dzh_n + row * H, b.hs_prev + row * H, dy, b.dh + n * H, b.gs + n * G, H);
    case kGruCho: return gru_cho_bwd_n_loop(gz, dy, b.dh + n * H, b.tmp + n * H, b.nsave + n * H, H);
    default: return elman_bwd_loop(gz, dy, b.dh + n * H, H, b.s.kind == kElmanRelu);
  }
}

void gru_cho_bwd_rz(const Bwd& b, int64_t t, int64_t n) {
  const int64_t H = b.s.H, row = t * b.s.N + n;
  if (!is_valid(b.valid, t, b.s.N, n)) return;
  gru_cho_bwd_rz_loop(b.dzx + row * b.s.G, b.hs_prev + row * H, b.drh + n * H, b.tmp + n * H, b.nsave + n * H,
                      b.dh + n * H, H);
}

void end_bwd_step(const Bwd& b, Shard sh, int64_t t) {
  if (b.resets == nullptr) return;
  const int64_t N = b.s.N, H = b.s.H;
  for (int64_t n = sh.n0; n < sh.n1; ++n) {
    if (!b.resets[t * N + n]) continue;
    std::fill(b.dh + n * H, b.dh + (n + 1) * H, 0.0f);
    if (b.dc != nullptr) std::fill(b.dc + n * H, b.dc + (n + 1) * H, 0.0f);
  }
}

// `rows` rows of `width` floats (leading dim ld_in) into `out` (leading dim ld_out) as bf16.
void to_bf16_rows(const float* in, int64_t ld_in, bf16* out, int64_t ld_out, int64_t rows, int64_t width) {
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j) out[n * ld_out + j] = to_bf16(in[n * ld_in + j]);
}

// This step's source rows [n0, n1) of a product with W_hh^T, columns [col, col + width) (leading dim G): the rows
// of dzx (the GRU's own gs), or their bf16 copy, kept in dzb for the weight gradients after the loop.
const void* step_source(const Bwd& b, Shard sh, int64_t t, int64_t col, int64_t width) {
  const int64_t G = b.s.G, row = t * b.s.N + sh.n0;
  const float* rows = (b.s.kind == kGru ? b.gs + sh.n0 * G : b.dzx + row * G) + col;
  if (b.dzb == nullptr) return rows;
  bf16* out = b.dzb + row * G + col;
  to_bf16_rows(rows, G, out, G, sh.n1 - sh.n0, width);
  return out;
}

void backward_shard(const Bwd& b, BOperand w_t, Shard sh, Packs* packs) {
  const Sizes& s = b.s;
  const int64_t H = s.H, G = s.G, M = sh.n1 - sh.n0;
  if (M == 0) return;
  const bool cho = s.kind == kGruCho, team = in_team();
  const int64_t rz = cho ? 2 * H : G;
  // dh += src[:, :rz] W_hh[:, :rz]^T (accumulated into dh); Cho: d(r*h) = src[:, 2H:] W_hn^T first.
  GateProducts rec(s, M, 0, rz / H, G, w_t, true, H, true, packs);
  std::unique_ptr<GateProducts> cand;
  if (cho) cand = std::make_unique<GateProducts>(s, M, 2, 3, G, w_t, true, H, false, packs);
  for (int64_t step = s.T - 1; step >= 0; --step) {
    const int64_t t = time_at(s, step);
    for_rows(sh, team, [&](int64_t n) { bwd_row(b, t, n); });
    if (cho) {
      cand->run(step_source(b, sh, t, 2 * H, H), b.drh + sh.n0 * H);
      for_rows(sh, team, [&](int64_t n) { gru_cho_bwd_rz(b, t, n); });
    }
    rec.run(step_source(b, sh, t, 0, rz), b.dh + sh.n0 * H);
    if (b.dnb != nullptr) {  // the GRU's dzb holds r * d(n), the products' n block; dW_ih's reads d(n)
      const int64_t row = t * s.N + sh.n0;
      to_bf16_rows(b.dzx + row * G + 2 * H, G, b.dnb + row * H, H, M, H);
    }
    end_bwd_step(b, sh, t);
  }
}

// Column sums of a [rows, cols] array (leading dim ld) into out[cols].
void column_sums(const float* a, int64_t rows, int64_t cols, int64_t ld, float* out) {
  std::fill(out, out + cols, 0.0f);
#pragma omp parallel
  {
    std::vector<float> part(cols, 0.0f);
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) part[c] += a[r * ld + c];
#pragma omp critical
    for (int64_t c = 0; c < cols; ++c) out[c] += part[c];
  }
}

// dW_hh[:, g0 * H : g1 * H] = A^T B over all R = T * N rows: A [R, H] the rows' h (the Cho GRU's n block: r*h), B
// [R, (g1 - g0) * H] the cotangents of those gate blocks' recurrent part (leading dim ldb). Dense, one product;
// with heads only the diagonal blocks (stored [heads, d, gates * d]), one product per gate batched over the heads.
void recurrent_weight_grad(const Sizes& s, const void* a, BOperand b, int64_t ldb, int64_t g0, int64_t g1,
                           float* dw) {
  const int64_t R = s.T * s.N, H = s.H, G = s.G;
  if (s.heads == 1)
    return Matmul(H, R, (g1 - g0) * H, H, true, b, ldb, G, s.use_bf16, false, false).run(a, dw + g0 * H);
  const int64_t n = s.heads, d = H / n, gw = G / n;
  for (int64_t g = g0; g < g1; ++g)
    Matmul(d, R, d, H, true, b.plus((g - g0) * H), ldb, gw, s.use_bf16, false, false, nullptr,
           Batch{n, d, d * gw, d})
        .run(a, dw + g * d);
}

// The products after the loop: dW_ih = X^T dZx, dW_hh = H_prev^T dZh, and the bias sums; in bf16 they read the
// copies made during the loop: dzb, dZx's (the GRU's: dZh, [d(r), d(z), r * d(n)], with dnb holding dZx's n block
// d(n)). (dx = dZx W_ih^T is a call of its own, input_grad, which XLA leaves out where dx is not used.)
void weight_grads(const Sizes& s, const float* x, const float* dzx, const bf16* dzb, const bf16* dnb,
                  const float* dzh_n, const float* hs_prev, const float* extra, float* dw_ih, float* dw_hh,
                  float* db_ih, float* db_hh) {
  const int64_t R = s.T * s.N, F = s.F, H = s.H, G = s.G;
  const bool b = s.use_bf16, gru_bf16 = dnb != nullptr;
  Operand xo(x, R * F, b), hpo(hs_prev, R * H, b);
  const BOperand dz = b ? BOperand(dzb) : BOperand(dzx);
  Matmul(F, R, gru_bf16 ? 2 * H : G, F, true, dz, G, G, b, false, false).run(xo.get(), dw_ih);
  if (gru_bf16) Matmul(F, R, H, F, true, dnb, H, G, b, false, false).run(xo.get(), dw_ih + 2 * H);
  column_sums(dzx, R, G, G, db_ih);
  std::memcpy(db_hh, db_ih, sizeof(float) * G);
  if (s.kind == kGruCho) {  // W_hr, W_hz see h_prev; W_hn sees r*h (the extras)
    recurrent_weight_grad(s, hpo.get(), dz, G, 0, 2, dw_hh);
    Operand rho(extra, R * H, b);
    recurrent_weight_grad(s, rho.get(), dz.plus(2 * H), G, 2, 3, dw_hh);
    return;
  }
  const bool n_apart = s.kind == kGru && !gru_bf16;  // float32: the GRU's n block is computed from dzh_n below
  recurrent_weight_grad(s, hpo.get(), dz, G, 0, n_apart ? 2 : G / H, dw_hh);
  if (s.kind == kGru) {  // the n block of the recurrent part saw r * d(n)
    if (n_apart) recurrent_weight_grad(s, hpo.get(), dzh_n, H, 2, 3, dw_hh);
    column_sums(dzh_n, R, H, H, db_hh + 2 * H);
  }
}

ffi::Error rnn_bwd(ffi::AnyBuffer x, ffi::AnyBuffer w_hh, ffi::AnyBuffer valid,
                   ffi::AnyBuffer resets, ffi::AnyBuffer hs_prev, ffi::AnyBuffer /*gates: the dzx output's buffer*/,
                   ffi::AnyBuffer extra, ffi::AnyBuffer dys, ffi::AnyBuffer dh_t, ffi::AnyBuffer dc_t,
                   ffi::Result<ffi::AnyBuffer> dw_ih, ffi::Result<ffi::AnyBuffer> dw_hh,
                   ffi::Result<ffi::AnyBuffer> db_ih, ffi::Result<ffi::AnyBuffer> db_hh,
                   ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::AnyBuffer> dc0,
                   ffi::Result<ffi::AnyBuffer> dzx, ffi::Result<ffi::AnyBuffer> dzh_n, int64_t kind, bool reverse,
                   bool use_bf16) {
  std::lock_guard<std::mutex> lock(call_mutex());
  const Sizes s = sizes_of(x, w_hh, kind, reverse, use_bf16);
  const int64_t N = s.N, H = s.H, G = s.G;
  float* dh = dh0->typed_data<float>();
  std::memcpy(dh, dh_t.typed_data<float>(), sizeof(float) * N * H);
  float* dc = dc0->typed_data<float>();
  std::memcpy(dc, dc_t.typed_data<float>(), sizeof(float) * N * H);
  std::vector<float> gs(kind == kGru ? N * G : 0), tmp(N * H), nsave(kind == kGruCho ? N * H : 0),
      drh(kind == kGruCho ? N * H : 0);
  // Every element of dzb and dnb is written in the loop.
  std::unique_ptr<bf16[]> dzb(use_bf16 ? new bf16[s.T * N * G] : nullptr);
  std::unique_ptr<bf16[]> dnb(use_bf16 && kind == kGru ? new bf16[s.T * N * H] : nullptr);
  if (use_bf16) advise_huge_pages(dzb.get(), sizeof(bf16) * s.T * N * G);
  if (dnb) advise_huge_pages(dnb.get(), sizeof(bf16) * s.T * N * H);
  Bwd b{s, valid.element_count() ? valid.typed_data<uint8_t>() : nullptr,
        resets.element_count() ? resets.typed_data<uint8_t>() : nullptr, dys.typed_data<float>(),
        hs_prev.typed_data<float>(), extra.typed_data<float>(), dzx->typed_data<float>(),
        kind == kGru ? dzh_n->typed_data<float>() : nullptr, dh, kind == kLstm ? dc : nullptr, gs.data(), tmp.data(),
        nsave.data(), drh.data(), dzb.get(), dnb.get()};
  Packs packs;
  const Operand w_t = Operand::transposed(w_hh.typed_data<float>(), s.heads, s.H / s.heads, s.G / s.heads, use_bf16);
  run_shards(s, [&](Shard sh) { backward_shard(b, w_t.b(), sh, &packs); });
  auto grads = [&] {
    weight_grads(s, x.typed_data<float>(), dzx->typed_data<float>(), dzb.get(), dnb.get(),
                 kind == kGru ? dzh_n->typed_data<float>() : nullptr, hs_prev.typed_data<float>(),
                 extra.typed_data<float>(), dw_ih->typed_data<float>(),
                 dw_hh->typed_data<float>(), db_ih->typed_data<float>(), db_hh->typed_data<float>());
  };
  if (loop_threads(N) == 1) {  // a batch too small to split: its products are small too
    on_one_thread(grads);
  } else {
    grads();
  }
  if (kind != kLstm) std::memset(dc, 0, sizeof(float) * N * H);
  return ffi::Error::Success();
}

// dx [T, N, F] = dzx [T, N, G] W_ih^T: the input's cotangent, from the backward call's dzx.
ffi::Error input_grad(ffi::AnyBuffer dzx, ffi::AnyBuffer w_ih, ffi::Result<ffi::AnyBuffer> dx, bool use_bf16) {
  std::lock_guard<std::mutex> lock(call_mutex());
  auto zd = dzx.dimensions();
  const int64_t R = zd[0] * zd[1], G = zd[2], F = w_ih.dimensions()[0];
  auto run = [&] {
    Operand dzo(dzx.typed_data<float>(), R * G, use_bf16);
    advise_huge_pages(dx->untyped_data(), dx->size_bytes());
    const Operand w_t = Operand::transposed(w_ih.typed_data<float>(), 1, F, G, use_bf16);
    Matmul product(R, G, F, G, false, w_t.b(), F, F, use_bf16, false, false);
    product.run(dzo.get(), dx->typed_data<float>());
  };
  if (loop_threads(zd[1]) == 1) {  // as the backward call's products after the loop
    on_one_thread(run);
  } else {
    run();
  }
  return ffi::Error::Success();
}

}  // namespace

namespace {

// A binding of `args` buffer arguments then `rets` buffer results (each in the order of the handler's parameters,
// which name and shape them), then the attributes every call takes.
template <int args, int rets, typename Binding>
auto buffers(Binding binding) {
  if constexpr (args > 0) {
    return buffers<args - 1, rets>(std::move(binding).template Arg<ffi::AnyBuffer>());
  } else if constexpr (rets > 0) {
    return buffers<0, rets - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  } else {
    return std::move(binding).template Attr<int64_t>("kind").template Attr<bool>("reverse").template Attr<bool>("bf16");
  }
}

}  // namespace

// x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets -> ys, h, c, hs_prev, gates, extra
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnForward, rnn_fwd, (buffers<9, 6>(ffi::Ffi::Bind()).Attr<bool>("save")));

// x, w_hh, valid, resets, hs_prev, gates, extra, dys, dh, dc -> dw_ih, dw_hh, db_ih, db_hh, dh0, dc0, dzx, dzh_n
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnBackward, rnn_bwd, (buffers<10, 8>(ffi::Ffi::Bind())));

// dzx, w_ih -> dx
XLA_FFI_DEFINE_HANDLER_SYMBOL(InputGrad, input_grad,
                              (ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                   .Attr<bool>("bf16")));
