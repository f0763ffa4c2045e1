// Decode kernels for x86-64 with AVX2 and FMA: the products of a decode step (1 to a few rows) read every weight
// once, so they are memory-bound, and PyTorch's CPU GEMV for them streams well below the memory bandwidth on
// AVX2 machines (engine/prepack.py measures it). These kernels stream the weight once per call, in its stored
// type, with float32 accumulation:
//
//   scratchchat::linear(x, w, bias?, residual?)            y = x @ w.T + bias,            w float32 or bfloat16
//   scratchchat::linear_i8(x, q, scale, bias?, residual?)  y = (x @ q.T) * scale + bias,  q int8, scale per row
//
// x is (R, K) float32 or bfloat16, y is (R, N) in x's dtype; with a float32 (R, N) residual, y = residual + that,
// in float32 (the decode loop's residual add, one op less per projection). Output features are split across PyTorch's intra-op
// threads (at::parallel_for, the same OpenMP runtime as the rest of torch). Each task computes a tile of NW output
// features for NX rows of x at a time, so a weight tile is read from memory once and reused from L1 for the other
// rows. bfloat16 widens to float32 exactly (a 16-bit shift), int8 through cvtepi8 + cvtepi32_ps; float32
// activations with int8 weights need no activation quantization (unlike llama.cpp's Q8 dot products), so the
// result differs from the float32 product of the dequantized weight only by summation order.
//
// And the small steps of a decode layer, each one op instead of 8-30 PyTorch ops (at batch 1 a layer's Python and
// dispatch overhead cost as much as its weight reads):
//
//   scratchchat::decode_attention(qkv, k_cache, v_cache, positions, cos?, sin?) -> (B, H * hd)
//       one new token per row: RoPE (rotate-half) on q and k, k and v written into the cache at the row's
//       position, causal attention over the row's cached keys (grouped-query heads), softmax in float32 (bf16
//       with head sizes of 32-128 on CPUs with AVX512-BF16: both products by vdpbf16ps, a kv head's query heads
//       sharing each read, the softmax weights rounded to bf16 for the values' product as in prefix_attention)
//   scratchchat::prefix_attention(q, k, v, positions) -> (B, T, H * hd)
//       a prefill chunk's queries over the keys/values cached before and with them (query t of row b sees keys
//       0 .. positions[b, t]), grouped-query heads taken together; float32 math (for bf16 inputs on CPUs with
//       AVX512-BF16 both products by vdpbf16ps: exact products, float32 sums, the softmax weights rounded to bf16
//       for the values' product as PyTorch's SDPA rounds them)
//   scratchchat::rms_norm(x, weight, eps) -> x / sqrt(mean(x^2) + eps) * weight, in the weight's dtype
//   scratchchat::layer_norm(x, weight, bias, eps) -> (x - mean) / sqrt(var + eps) * weight (+ bias), float32 math,
//       in the weight's dtype
//   scratchchat::silu_mul(gate_up) -> silu(gate) * up for the fused (..., 2F) gate/up output
//   scratchchat::gelu_tanh(x) -> GPT-2's GELU (tanh form), float32 math, in x's dtype
//
// Rounding follows the PyTorch path of engine/model.py step by step (bf16 intermediates rounded where it rounds
// them, no FMA contraction: built with -ffp-contract=off), so decode steps agree with prefill.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// 8 bf16 (their bits) widened to float32: exact, each becomes the top half of a float
inline __m256 widen_bf16x8(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const bf16* p) { return widen_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline __m256 load8(const int8_t* p) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

// 8 floats rounded to bf16 as c10::BFloat16(float) rounds (to nearest, ties to even; NaN -> 0x7FC0)
inline __m128i round_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

inline float widen(float v) { return v; }
inline float widen(bf16 v) { return static_cast<float>(v); }
inline float widen(int8_t v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dots[i * NW + j] = x[i, :] . w[j, :] for NX rows of x (stride ldx) and NW rows of w (stride K). The accumulators
// are expanded from an index pack (see panel_tile_impl: nested loops over a __m256 array made GCC store them all to
// the stack on every k step).
template <typename WT, int NW, int NX, size_t... I>
inline void tile_impl(const float* x, int64_t ldx, const WT* w, int64_t K, float* dots, std::index_sequence<I...>) {
  __m256 acc[sizeof...(I)];  // acc[i * NW + j]
  ((acc[I] = _mm256_setzero_ps()), ...);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[NX], wv[NW];
    for (int i = 0; i < NX; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < NW; ++j) wv[j] = load8(w + j * K + k);
    ((acc[I] = _mm256_fmadd_ps(xv[I / NW], wv[I % NW], acc[I])), ...);
  }
  for (size_t a = 0; a < sizeof...(I); ++a) {
    const int64_t i = a / NW, j = a % NW;
    float s = hsum(acc[a]);
    for (int64_t t = k; t < K; ++t) s += x[i * ldx + t] * widen(w[j * K + t]);
    dots[a] = s;
  }
}

template <typename WT, int NW, int NX>
inline void tile(const float* x, int64_t ldx, const WT* w, int64_t K, float* dots) {
  tile_impl<WT, NW, NX>(x, ldx, w, K, dots, std::make_index_sequence<NX * NW>{});
}

// What happens to a dot product on its way out: per-feature int8 scale, bias, and optionally the residual add of the
// layer (y = residual + out, float32, with out rounded to bf16 first when the activations are bf16, as the PyTorch
// path rounds the projection's output before adding it to the float32 residual stream).
//
// ``tail``, when set, runs on each thread's share of the outputs once the thread has written them: tail(y, n0, n1)
// for output features [n0, n1) of every row of y (the float32 output), in the same parallel region (a LoRA delta
// added there costs no fork of its own; see projection() below).
using Tail = std::function<void(const float* y, int64_t n0, int64_t n1)>;

struct Epilogue {
  const float* scale = nullptr;
  const float* bias = nullptr;
  const float* residual = nullptr;  // (R, N) float32
  bool round_bf16 = false;
  const Tail* tail = nullptr;

  void finish(const float* y, int64_t n0, int64_t n1) const {
    if (tail && n0 < n1) (*tail)(y, n0, n1);
  }

  inline float operator()(float v, int64_t row, int64_t n, int64_t N) const {
    if (scale) v *= scale[n];
    if (bias) v += bias[n];
    if (residual) {
      if (round_bf16) v = static_cast<float>(bf16(v));
      v = residual[row * N + n] + v;
    }
    return v;
  }
};

// y[r, n] = ep(dot(x[r], w[n])) for output features [n0, n0 + NW): rows eight, four, two, one at a time (groups of
// at most NX), so that every k step keeps NW * group FMA chains in flight.
template <typename WT, int NW, int NX>
inline void block(const float* x, int64_t R, int64_t K, const WT* w, int64_t n0, int64_t N, const Epilogue& ep,
                  float* y) {
  float dots[8 * NW];
  const WT* wb = w + n0 * K;
  auto put = [&](int64_t row, int rows) {
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < NW; ++j) y[(row + i) * N + n0 + j] = ep(dots[i * NW + j], row + i, n0 + j, N);
  };
  int64_t r = 0;
  if constexpr (NX >= 8)
    for (; r + 8 <= R; r += 8) {
      tile<WT, NW, 8>(x + r * K, K, wb, K, dots);
      put(r, 8);
    }
  if constexpr (NX >= 4)
    for (; r + 4 <= R; r += 4) {
      tile<WT, NW, 4>(x + r * K, K, wb, K, dots);
      put(r, 4);
    }
  for (; r + 2 <= R; r += 2) {
    tile<WT, NW, 2>(x + r * K, K, wb, K, dots);
    put(r, 2);
  }
  if (r < R) {
    tile<WT, NW, 1>(x + r * K, K, wb, K, dots);
    put(r, 1);
  }
}

// Several rows: NW output features per tile times up to NX rows, eight FMA chains per k step (2-3 rows: 4 x 2,
// 4-7 rows: 2 x 4, 8 or more: 1 x 8); each widened weight vector feeds NX FMAs from registers.
template <typename WT, int NW, int NX>
void run_tiles(const float* x, int64_t R, int64_t K, const WT* w, int64_t N, const Epilogue& ep, float* y) {
  const int64_t full = N / NW;
  // Tasks of several tiles (~64 KiB of weights each) keep the scheduling cost negligible next to the reads.
  const int64_t grain =
      std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, NW * K * static_cast<int64_t>(sizeof(WT))));
  at::parallel_for(0, full, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block<WT, NW, NX>(x, R, K, w, b * NW, N, ep, y);
    ep.finish(y, b0 * NW, b1 * NW);
  });
  for (int64_t n = full * NW; n < N; ++n) block<WT, 1, NX>(x, R, K, w, n, N, ep, y);
  ep.finish(y, full * NW, N);
}

// One row: the weight is read strictly in order, one row after the next (what the hardware prefetchers follow
// best), with four independent FMA chains per row.
template <typename WT>
void gemv(const float* x, int64_t K, const WT* w, int64_t N, const Epilogue& ep, float* y) {
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K * static_cast<int64_t>(sizeof(WT))));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const WT* wr = w + n * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(wr + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(wr + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8(wr + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8(wr + k + 24), a3);
      }
      for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(wr + k), a0);
      float v = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; k < K; ++k) v += x[k] * widen(wr[k]);
      y[n] = ep(v, 0, n, N);
    }
    ep.finish(y, n0, n1);
  });
}

// One row of bf16 weights: widening 16 bf16 at once with two unpacks against zero (each bf16 becomes the top half of
// a float32) costs half the instructions of widening 8 at a time, but yields lanes in the order 0-3, 8-11 | 4-7,
// 12-15; x is permuted the same way once per call (a dot product does not care about the order of its terms).
template <>
void gemv<bf16>(const float* x, int64_t K, const bf16* w, int64_t N, const Epilogue& ep, float* y) {
  const int64_t K32 = K / 32 * 32;
  std::vector<float> xp(K32);
  static constexpr int order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  for (int64_t k = 0; k < K32; k += 16)
    for (int i = 0; i < 16; ++i) xp[k + i] = x[k + order[i]];
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K * 2));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t n = n0; n < n1; ++n) {
      const bf16* wr = w + n * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K32; k += 32) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + 16));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.data() + k), _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v0)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.data() + k + 8), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v0)),
                             a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.data() + k + 16),
                             _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v1)), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.data() + k + 24),
                             _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v1)), a3);
      }
      int64_t k = K32;
      for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(wr + k), a0);
      float v = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; k < K; ++k) v += x[k] * widen(wr[k]);
      y[n] = ep(v, 0, n, N);
    }
    ep.finish(y, n0, n1);
  });
}

template <typename WT>
void run(const float* x, int64_t R, int64_t K, const WT* w, int64_t N, const Epilogue& ep, float* y) {
  if (R == 1)
    gemv(x, K, w, N, ep, y);
  else if (R < 4)
    run_tiles<WT, 4, 2>(x, R, K, w, N, ep, y);
  else if (R < 8)
    run_tiles<WT, 2, 4>(x, R, K, w, N, ep, y);
  else
    run_tiles<WT, 1, 8>(x, R, K, w, N, ep, y);
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "scratchchat kernels run on the CPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x must be (R, K) and the weight (N, K)");
  TORCH_CHECK(x.size(1) == w.size(1), "x has ", x.size(1), " features but the weight takes ", w.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, not ", x.scalar_type());
  if (bias) TORCH_CHECK(bias->numel() == w.size(0), "bias has ", bias->numel(), " entries, not ", w.size(0));
}

// float32 for the kernels. bf16 activations are widened (exactly) in a plain loop: a decode step converts every
// product's bf16 input, and `.to()` is a full dispatcher round trip each time (~7 us; ~190 of them made ~1.2 ms of a
// 17-20 ms SmolLM2 bf16 step on the AVX2 EPYC).
at::Tensor as_float(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;  // (read only: no copy, no dispatch)
  if (t.scalar_type() != at::kBFloat16 || !t.is_contiguous()) return t.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const bf16* src = t.data_ptr<bf16>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) dst[i] = widen(src[i]);
  return out;
}

// Tensors a caller hands back for the outputs of its next call: decode_blocks gives each layer's intermediates the
// tensors of the layer before, whose values are dead by then. ``result`` holds the tensor the call returns,
// ``scratch`` its float32 products before they are rounded into x's dtype. An empty slot, or one of another shape or
// dtype, gets a new tensor and keeps it for the next call. (An at::empty costs ~1 us inside a decode step, where the
// allocator's state is cold after the weights went through the caches, and a SmolLM2 step made ~270 of them: 2% of
// the step.)
struct Reuse {
  at::Tensor* result = nullptr;
  at::Tensor* scratch = nullptr;
};

at::Tensor empty_in(at::Tensor* slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (slot && slot->defined() && slot->sizes() == sizes && slot->dtype() == options.dtype()) return *slot;
  at::Tensor t = at::empty(sizes, options);
  if (slot) *slot = t;
  return t;
}

// y rounded to bf16 as `.to(at::kBFloat16)` rounds it (c10::BFloat16's round-to-nearest-even), without the dispatch
at::Tensor to_bf16(const at::Tensor& y, at::Tensor* slot = nullptr) {
  at::Tensor out = empty_in(slot, y.sizes(), y.options().dtype(at::kBFloat16));
  const float* src = y.data_ptr<float>();
  bf16* dst = out.data_ptr<bf16>();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) dst[i] = bf16(src[i]);
  return out;
}

// The output, and the epilogue's bias and residual: y is float32 (rounded to x's dtype afterwards) unless a
// residual is added, which keeps the sum in float32 like the residual stream it belongs to.
struct Output {
  at::Tensor y, bias, residual;
  Epilogue ep;
  at::Tensor* rounded = nullptr;  // the slot of y rounded into x's dtype (see Reuse)

  Output(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& res,
         const Tail* tail, const Reuse* reuse = nullptr) {
    const int64_t R = x.size(0);
    ep.tail = tail;
    const bool y_is_result = !tail && (res || x.scalar_type() == at::kFloat);
    if (reuse && !y_is_result) rounded = reuse->result;
    y = empty_in(reuse ? (y_is_result ? reuse->result : reuse->scratch) : nullptr, {R, N},
                 x.options().dtype(at::kFloat));
    if (b) {
      bias = as_float(*b);
      ep.bias = bias.data_ptr<float>();
    }
    if (res) {
      TORCH_CHECK(res->scalar_type() == at::kFloat && res->dim() == 2 && res->size(0) == R && res->size(1) == N,
                  "the residual must be a float32 (", R, ", ", N, ") tensor");
      residual = res->contiguous();
      ep.residual = residual.data_ptr<float>();
      ep.round_bf16 = x.scalar_type() == at::kBFloat16;
    }
  }

  // (with a tail, y as computed: the tail has taken the values from there)
  at::Tensor result(const at::Tensor& x) const {
    if (residual.defined() || x.scalar_type() == at::kFloat || ep.tail) return y;
    return x.scalar_type() == at::kBFloat16 ? to_bf16(y, rounded) : y.to(x.scalar_type());
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, const Tail* tail, const Reuse* reuse = nullptr) {
  check_inputs(x, w, bias);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "the weight must be float32 or bfloat16, not ", w.scalar_type());
  const at::Tensor xf = as_float(x), wc = w.contiguous();
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  Output out(x, N, bias, residual, tail, reuse);
  if (wc.scalar_type() == at::kFloat)
    run(xf.data_ptr<float>(), R, K, wc.data_ptr<float>(), N, out.ep, out.y.data_ptr<float>());
  else
    run(xf.data_ptr<float>(), R, K, wc.data_ptr<bf16>(), N, out.ep, out.y.data_ptr<float>());
  return out.result(x);
}

at::Tensor linear_i8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                     const Tail* tail, const Reuse* reuse = nullptr) {
  check_inputs(x, q, bias);
  TORCH_CHECK(q.scalar_type() == at::kChar, "q must be int8, not ", q.scalar_type());
  TORCH_CHECK(scale.numel() == q.size(0), "scale has ", scale.numel(), " entries, not ", q.size(0));
  const at::Tensor xf = as_float(x), qc = q.contiguous(), sf = as_float(scale);
  const int64_t R = x.size(0), K = x.size(1), N = q.size(0);
  Output out(x, N, bias, residual, tail, reuse);
  out.ep.scale = sf.data_ptr<float>();
  run(xf.data_ptr<float>(), R, K, qc.data_ptr<int8_t>(), N, out.ep, out.y.data_ptr<float>());
  return out.result(x);
}

// ---- panel-packed weights: a broadcast-form GEMM for 1 to a few rows ----
//
// The dot-product tiles above end every output in a horizontal sum and, at several rows, keep too few FMA chains per
// load. A panel copy of the weight, (P, K, 8) with P = ceil(N / 8) (panel p holds output features 8p..8p+7 for
// every k, zeros past N), turns the product into the classic GEMM micro-kernel: each k step loads 8 features of a
// panel and multiplies them by each row's x[k] broadcast from memory, NR rows x NP panels of accumulators in
// registers, no horizontal sums. Every output is one FMA chain over k in order, whatever the row count or tile, so a
// row's result does not depend on which other rows share the step (batched == single, bit for bit).

// The next panel group's bytes [begin, begin + bytes), fetched into the cache while a tile computes on this one.
// With several rows a group's FMAs take about as long as its DRAM reads; left to the hardware prefetchers, which
// only follow the loads, the two add up. Spreading the next group's lines over this group's row passes keeps the
// memory busy while the FMAs run (measured: SmolLM2-135M's products for 8 rows took 23 ms a step, 18.4 with this,
// against 13.4 for one row).
struct Prefetch {
  const char* begin = nullptr;
  int64_t bytes = 0;
};

// The accumulators are expanded from an index pack (acc[I] with I a compile-time constant in every expression): with
// nested loops over a __m256 array GCC 12 kept the registers but also stored all of them to the stack on every k
// step (eight stores per eight FMAs, the store port became the bottleneck); this form compiles to loads,
// broadcasts and FMAs only.
template <typename WT, int NR, int NP, size_t... I>
inline void panel_tile_impl(const float* x, int64_t K, const WT* wp, float* out, const Prefetch& pf,
                            std::index_sequence<I...>) {
  __m256 acc[sizeof...(I)];
  ((acc[I] = _mm256_setzero_ps()), ...);
  const int64_t ps = K * 8;  // panel stride
  const char* next = pf.begin;
  int64_t owed = 0;  // pf.bytes per K steps, one cache line at a time (Bresenham: no division in the loop)
  for (int64_t k = 0; k < K; ++k) {
    owed += pf.bytes;
    if (owed >= 64 * K) {
      __builtin_prefetch(next, 0, 3);
      next += 64;
      owed -= 64 * K;
    }
    __m256 w[NP], xb[NR];
    for (int j = 0; j < NP; ++j) w[j] = load8(wp + j * ps + k * 8);
    for (int i = 0; i < NR; ++i) xb[i] = _mm256_broadcast_ss(x + i * K + k);
    ((acc[I] = _mm256_fmadd_ps(xb[I / NP], w[I % NP], acc[I])), ...);
  }
  ((_mm256_storeu_ps(out + I * 8, acc[I])), ...);
}

// out[(i * NP + j) * 8 ...] = rows i of x (stride K) times the 8 features of panels j, over all k
template <typename WT, int NR, int NP>
inline void panel_tile(const float* x, int64_t K, const WT* wp, float* out /* [NR][NP * 8] */, const Prefetch& pf) {
  panel_tile_impl<WT, NR, NP>(x, K, wp, out, pf, std::make_index_sequence<NR * NP>{});
}

// y[r, n0:n0+8] = ep(v) for one panel's outputs (vector form where no bf16 rounding is involved).
inline void panel_store(const float* v, int64_t row, int64_t n0, int64_t N, const Epilogue& ep, float* y) {
  if (n0 + 8 <= N && !ep.round_bf16) {
    __m256 a = _mm256_loadu_ps(v);
    if (ep.scale) a = _mm256_mul_ps(a, _mm256_loadu_ps(ep.scale + n0));
    if (ep.bias) a = _mm256_add_ps(a, _mm256_loadu_ps(ep.bias + n0));
    if (ep.residual) a = _mm256_add_ps(_mm256_loadu_ps(ep.residual + row * N + n0), a);
    _mm256_storeu_ps(y + row * N + n0, a);
    return;
  }
  for (int64_t c = 0; c < 8 && n0 + c < N; ++c) y[row * N + n0 + c] = ep(v[c], row, n0 + c, N);
}

// Rows NR at a time (then fewer) against NP panels starting at panel p0, prefetching the following NP panels
// (up to panel `end`) across the row passes.
template <typename WT, int NR, int NP>
inline void panel_block(const float* x, int64_t R, int64_t K, const WT* wp, int64_t p0, int64_t end, int64_t N,
                        const Epilogue& ep, float* y) {
  alignas(32) float acc[NR * NP * 8];
  const WT* w = wp + p0 * K * 8;
  int64_t passes = R / NR, rest = R % NR;  // as the loops below take the rows
  if constexpr (NR > 2) passes += rest / 2, rest %= 2;
  passes += rest;
  const int64_t group = NP * K * 8 * int64_t(sizeof(WT));
  // one pass (up to NR rows) is memory-bound and the hardware prefetchers serve it best (measured: prefetching
  // there too costs R = 1 ~5%); from two passes on it saves ~20% at 8 rows
  const int64_t ahead = passes > 1 && p0 + 2 * NP <= end ? group : 0;
  const char* next = reinterpret_cast<const char*>(w) + group;
  int64_t pass = 0;
  auto share = [&]() {  // this pass's slice of the next group
    Prefetch pf{next + pass * ahead / passes, (pass + 1) * ahead / passes - pass * ahead / passes};
    ++pass;
    return pf;
  };
  auto put = [&](int64_t r, int rows, int np) {
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < NP; ++j) panel_store(acc + (i * np + j) * 8, r + i, (p0 + j) * 8, N, ep, y);
  };
  int64_t r = 0;
  for (; r + NR <= R; r += NR) {
    panel_tile<WT, NR, NP>(x + r * K, K, w, acc, share());
    put(r, NR, NP);
  }
  if constexpr (NR > 2)
    for (; r + 2 <= R; r += 2) {
      panel_tile<WT, 2, NP>(x + r * K, K, w, acc, share());
      put(r, 2, NP);
    }
  if constexpr (NR > 1)
    for (; r < R; ++r) {
      panel_tile<WT, 1, NP>(x + r * K, K, w, acc, share());
      put(r, 1, NP);
    }
}

// NR x NP accumulators: 1 x 4 panels for one row (four weight streams), 2 x 4 for two rows, 4 x 2 for more
// (eight accumulators, two panel loads and four broadcasts per eight FMAs; more rows take further passes over the
// same panels, which are in L1/L2 by then).
template <typename WT, int NR, int NP>
void run_panels_with(const float* x, int64_t R, int64_t K, const WT* wp, int64_t N, const Epilogue& ep, float* y) {
  const int64_t P = (N + 7) / 8, groups = P / NP;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, NP * 8 * K * int64_t(sizeof(WT))));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) panel_block<WT, NR, NP>(x, R, K, wp, g * NP, g1 * NP, N, ep, y);
    ep.finish(y, g0 * NP * 8, std::min(N, g1 * NP * 8));
  });
  for (int64_t p = groups * NP; p < P; ++p) panel_block<WT, NR, 1>(x, R, K, wp, p, P, N, ep, y);
  ep.finish(y, groups * NP * 8, N);
}

template <typename WT>
void run_panels(const float* x, int64_t R, int64_t K, const WT* wp, int64_t N, const Epilogue& ep, float* y) {
  if (R == 1)
    run_panels_with<WT, 1, 4>(x, R, K, wp, N, ep, y);
  else if (R == 2)
    run_panels_with<WT, 2, 4>(x, R, K, wp, N, ep, y);
  else if (R == 3)
    run_panels_with<WT, 3, 2>(x, R, K, wp, N, ep, y);
  else
    run_panels_with<WT, 4, 2>(x, R, K, wp, N, ep, y);
}

at::Tensor linear_panel(const at::Tensor& x, const at::Tensor& wp, int64_t N, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                        const Tail* tail, const Reuse* reuse = nullptr) {
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "scratchchat kernels run on the CPU");
  TORCH_CHECK(x.dim() == 2, "x must be (R, K)");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == 8 && wp.is_contiguous(), "the panels must be a contiguous (P, K, 8) tensor");
  TORCH_CHECK(N > 0 && (N + 7) / 8 == wp.size(0), N, " output features do not fill ", wp.size(0), " panels of 8");
  TORCH_CHECK(x.size(1) == wp.size(1), "x has ", x.size(1), " features but the panels take ", wp.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, not ", x.scalar_type());
  if (bias) TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " entries, not ", N);
  const at::Tensor xf = as_float(x);
  const int64_t R = x.size(0), K = x.size(1);
  Output out(x, N, bias, residual, tail, reuse);
  at::Tensor sf;
  if (scale) {
    TORCH_CHECK(scale->numel() == N, "scale has ", scale->numel(), " entries, not ", N);
    sf = as_float(*scale);
    out.ep.scale = sf.data_ptr<float>();
  }
  const float* xp = xf.data_ptr<float>();
  float* yp = out.y.data_ptr<float>();
  switch (wp.scalar_type()) {
    case at::kFloat: run_panels(xp, R, K, wp.data_ptr<float>(), N, out.ep, yp); break;
    case at::kBFloat16: run_panels(xp, R, K, wp.data_ptr<bf16>(), N, out.ep, yp); break;
    case at::kChar:
      TORCH_CHECK(scale.has_value(), "int8 panels need their per-feature scale");
      run_panels(xp, R, K, wp.data_ptr<int8_t>(), N, out.ep, yp);
      break;
    default: TORCH_CHECK(false, "panels must be float32, bfloat16 or int8, not ", wp.scalar_type());
  }
  return out.result(x);
}

// ---- bf16 dot-product panels for CPUs with AVX512-BF16 ----
//
// `vdpbf16ps` multiplies pairs of bf16 (exact products) and adds both to a float32 lane: 32 multiply-adds per
// instruction where the AVX2 panel tile widens each bf16 weight to float32 first and does 8. The weight is packed
// as (G, K2, 64, 2): group g holds output features 64g..64g+63 (four panels of 16, one zmm of float32 each), and for
// each pair of k (k = 2kk, 2kk + 1) the two weights of each feature side by side, so one 64-byte load feeds 16
// lanes and each row's x pair is one broadcast 32-bit value. The four panels of a k pair are adjacent: a group is
// one sequential stream (measured on a Zen4 EPYC: four panel-major streams read 5-20% below a plain sum's bandwidth,
// one stream reads at it). Every output is one chain over k in order whatever the row count or tile (batched ==
// single, bit for bit). Compiled for AVX-512 per function and run only where the CPU has AVX512-BF16 (checked per
// call).
#define SCRATCHCHAT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

// 32 weights of a panel's pair step
SCRATCHCHAT_AVX512 inline __m512bh dp_load(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }

constexpr int64_t DP_PANELS = 4;  // panels of 16 features per group (engine.kernels.DP_GROUP = 64 features)

// rows NR (stride ldx) times one group's four panels over k pairs [k0, k1), into out[(i * 4 + j) * 16 ...]: from
// zero when first, else going on from the sums out holds (a chain over k stays in order however it is cut)
template <int NR, size_t... I>
SCRATCHCHAT_AVX512 inline void dp_tile_impl(const bf16* x, int64_t ldx, int64_t k0, int64_t k1, const bf16* wg,
                                            float* out, bool first, std::index_sequence<I...>) {
  constexpr int NP = DP_PANELS;
  __m512 acc[sizeof...(I)];
  if (first) ((acc[I] = _mm512_setzero_ps()), ...);
  else ((acc[I] = _mm512_loadu_ps(out + I * 16)), ...);
  for (int64_t kk = k0; kk < k1; ++kk) {
    __m512bh w[NP], xb[NR];
    for (int j = 0; j < NP; ++j) w[j] = dp_load(wg + (kk * NP + j) * 32);
    for (int i = 0; i < NR; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * kk, 4);
      xb[i] = (__m512bh)_mm512_set1_epi32(pair);
    }
    ((acc[I] = _mm512_dpbf16_ps(acc[I], xb[I / NP], w[I % NP])), ...);
  }
  ((_mm512_storeu_ps(out + I * 16, acc[I])), ...);
}

// Several 4-row sets against one group go through its k pairs in chunks of DP_KCHUNK (4 KB of bf16 weights), every
// set's pass over a chunk before the next chunk: the later passes read the chunk from L1. (Set after set over the
// whole group, each pass streams the group's weights anew, and at 8 rows the reads no longer hide under the
// arithmetic: 8 rows cost 1.75x one row. Chunked, 6-10% less at 8 rows; 64 k pairs a chunk, or 16-row sets, lose.)
constexpr int64_t DP_KCHUNK = 16;
constexpr int64_t DP_MAX_SETS = 16;  // 64 rows: the sets' sums (16 KB) on the stack

// rows NR at a time (then one) against group g
template <int NR>
SCRATCHCHAT_AVX512 void dp_block(const bf16* x, int64_t R, int64_t ldx, int64_t K2, const bf16* wp, int64_t g,
                                 int64_t N, const Epilogue& ep, float* y) {
  constexpr int NP = DP_PANELS;
  alignas(64) float acc[NR * NP * 16];
  const bf16* w = wp + g * K2 * NP * 32;
  auto put = [&](const float* sums, int64_t r, int rows) {
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < NP; ++j)
        for (int h = 0; h < 2; ++h)
          panel_store(sums + (i * NP + j) * 16 + h * 8, r + i, (g * NP + j) * 16 + h * 8, N, ep, y);
  };
  int64_t r = 0;
  if constexpr (NR == 4) {
    const int64_t sets = std::min(R / NR, DP_MAX_SETS);
    if (sets >= 2) {
      alignas(64) float sums[DP_MAX_SETS][NR * NP * 16];
      for (int64_t k0 = 0; k0 < K2; k0 += DP_KCHUNK) {
        const int64_t n = std::min(K2 - k0, DP_KCHUNK);
        for (int64_t s = 0; s < sets; ++s)
          dp_tile_impl<NR>(x + s * NR * ldx + 2 * k0, ldx, 0, n, w + k0 * NP * 32, sums[s], k0 == 0,
                           std::make_index_sequence<NR * NP>{});
      }
      for (int64_t s = 0; s < sets; ++s) put(sums[s], s * NR, NR);
      r = sets * NR;
    }
  }
  for (; r + NR <= R; r += NR) {
    dp_tile_impl<NR>(x + r * ldx, ldx, 0, K2, w, acc, true, std::make_index_sequence<NR * NP>{});
    put(acc, r, NR);
  }
  for (; r < R; ++r) {
    dp_tile_impl<1>(x + r * ldx, ldx, 0, K2, w, acc, true, std::make_index_sequence<NP>{});
    put(acc, r, 1);
  }
}

template <int NR>
SCRATCHCHAT_AVX512 void run_dp_with(const bf16* x, int64_t R, int64_t ldx, int64_t K2, const bf16* wp, int64_t N,
                                    const Epilogue& ep, float* y) {
  const int64_t groups = (N + 63) / 64;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, DP_PANELS * 64 * K2));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) dp_block<NR>(x, R, ldx, K2, wp, g, N, ep, y);
    ep.finish(y, g0 * 64, std::min(N, g1 * 64));
  });
}

// 1 row: 1 x 4 panels (one group); 2-3 rows: 2 x 4; 4 or more: 4 x 4 (16 of the 32 zmm registers)
void run_dp(const bf16* x, int64_t R, int64_t ldx, int64_t K2, const bf16* wp, int64_t N, const Epilogue& ep,
            float* y) {
  if (R == 1)
    run_dp_with<1>(x, R, ldx, K2, wp, N, ep, y);
  else if (R < 4)
    run_dp_with<2>(x, R, ldx, K2, wp, N, ep, y);
  else
    run_dp_with<4>(x, R, ldx, K2, wp, N, ep, y);
}

// x (R, K) bf16 and the checks every dot-product panel product makes of it and of the (G, Kp, 64, p) panels
void check_dp(const char* op, const at::Tensor& x, const at::Tensor& wp, int64_t N, int64_t per,
              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "scratchchat kernels run on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be a bfloat16 (R, K) tensor");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == 64 && wp.size(3) == per && wp.is_contiguous(),
              "the panels must be a contiguous (G, K", per, ", 64, ", per, ") tensor");
  TORCH_CHECK(N > 0 && (N + 63) / 64 == wp.size(0), N, " output features do not fill ", wp.size(0),
              " panel groups of 64");
  TORCH_CHECK((x.size(1) + per - 1) / per == wp.size(1), "x has ", x.size(1), " features but the panels take ",
              per * wp.size(1));
  if (bias) TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " entries, not ", N);
}

// x @ w.T through the dot-product panel groups (G, K2, 64, 2) of a bf16 weight
at::Tensor linear_dpbf16(const at::Tensor& x, const at::Tensor& wp, int64_t N, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, const Tail* tail, const Reuse* reuse = nullptr) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "linear_dpbf16 needs a CPU with AVX512-BF16");
  TORCH_CHECK(wp.scalar_type() == at::kBFloat16, "linear_dpbf16 takes bfloat16 panels, not ", wp.scalar_type());
  check_dp("linear_dpbf16", x, wp, N, 2, bias);
  const int64_t R = x.size(0), K = x.size(1), K2 = wp.size(1);
  at::Tensor xe = x.contiguous();
  if (K % 2) xe = at::constant_pad_nd(xe, {0, 1});  // an odd K: a zero pairs with the panels' zero
  Output out(x, N, bias, residual, tail, reuse);
  run_dp(xe.data_ptr<bf16>(), R, 2 * K2, K2, wp.data_ptr<bf16>(), N, out.ep, out.y.data_ptr<float>());
  return out.result(x);
}

// ---- int8 weights: VNNI dot-product panels ----
//
// `vpdpbusd` multiplies four unsigned bytes by four signed bytes and adds the four products to an int32 lane: 64
// multiply-adds per instruction on integers as stored, where widening each int8 weight to bf16 for `vdpbf16ps` took
// five instructions per 32 (compute-bound at ~30 GB/s of weights on two Zen4 threads; this runs SmolLM2's shapes
// 1.8-2.5x as fast from cache). The weight (engine.quant's int8 copy, per-feature scale) is packed (G, K4, 64, 4):
// group g holds output features 64g..64g+63, and for each quad of k the four weights of every feature side by side,
// stored as unsigned bytes w + 128, so one 64-byte load feeds 16 features of one vpdpbusd and a group is one
// sequential stream. Each row of x is quantized to 16-bit integers, q = round(x * 32639 / max|x|), and split into two
// signed byte limbs, q = 256 hi + lo (lo in [-128, 127], hi in [-128, 127]), broadcast four k at a time:
//
//   sum_k w q = 256 sum_k (w + 128) hi + sum_k (w + 128) lo - 128 sum_k q
//
// Every term is an exact integer (the int32 sums stay below 2^31 for K up to 65536), so the only rounding is the
// activations' quantization (at most max|x| / 65278 per entry, about bf16's own rounding at max|x| / 128) and the
// float32 scaling at the end: a row's outputs do not depend on the other rows, the tiling or the thread count
// (batched == single, bit for bit).
#define SCRATCHCHAT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

bool cpu_has_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

constexpr float VNNI_QMAX = 32639.0f;  // 127 * 256 + 127: the largest q whose limbs are both signed bytes
constexpr int64_t VNNI_MAX_K = 65536;  // 255 * 128 * K4 * 4 < 2^31

// The rows of x quantized (see above): limbs hi and lo (R, K4 * 4) with zeros past K, each row's step
// max|x| / VNNI_QMAX (NaN where the row holds an Inf or NaN, so that its outputs are NaN) and sum of q.
struct Limbs {
  std::vector<int8_t> hi, lo;
  std::vector<float> step;
  std::vector<int64_t> sum;
  int64_t ld = 0;
};

// 16 bf16 (those of mask m) as float32 bit patterns
SCRATCHCHAT_VNNI inline __m512i widen16(const uint16_t* p, __mmask16 m) {
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
}

SCRATCHCHAT_VNNI void quantize_limbs(const bf16* x, int64_t R, int64_t K, int64_t K4, Limbs& l) {
  l.ld = K4 * 4;
  l.hi.resize(R * l.ld);  // every byte is written below (zeros past K): no clearing first
  l.lo.resize(R * l.ld);
  l.step.resize(R);
  l.sum.resize(R);
  for (int64_t r = 0; r < R; ++r) {
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(x + r * K);
    __m512i top = _mm512_setzero_si512();  // |x| bit patterns: their integer max is the float max (NaN above Inf)
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      top = _mm512_max_epu32(top, _mm512_and_si512(widen16(xr + k, m), _mm512_set1_epi32(0x7FFFFFFF)));
    }
    uint32_t bits = _mm512_reduce_max_epu32(top);
    float mx;
    std::memcpy(&mx, &bits, 4);
    int8_t* hi = l.hi.data() + r * l.ld;
    int8_t* lo = l.lo.data() + r * l.ld;
    std::memset(hi + K, 0, l.ld - K);  // the panels' zero weights past K meet zero limbs
    std::memset(lo + K, 0, l.ld - K);
    if (!std::isfinite(mx) || mx == 0.0f) {  // zeros stay zero; an Inf or NaN makes the row's outputs NaN
      std::memset(hi, 0, K);
      std::memset(lo, 0, K);
      l.step[r] = mx == 0.0f ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      l.sum[r] = 0;
      continue;
    }
    l.step[r] = mx / VNNI_QMAX;
    const __m512 inv = _mm512_set1_ps(VNNI_QMAX / mx);
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      // rounded to nearest, ties to even (the default MXCSR)
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(widen16(xr + k, m)), inv));
      const __m512i low = _mm512_srai_epi32(_mm512_slli_epi32(q, 24), 24);  // the signed low byte
      const __m512i high = _mm512_srai_epi32(_mm512_sub_epi32(q, low), 8);
      _mm_mask_storeu_epi8(lo + k, m, _mm512_cvtepi32_epi8(low));
      _mm_mask_storeu_epi8(hi + k, m, _mm512_cvtepi32_epi8(high));
      total = _mm512_add_epi32(total, q);  // |q| <= 32639: no overflow for K <= 65536
    }
    l.sum[r] = _mm512_reduce_add_epi32(total);
  }
}

// rows NR (limbs hi, lo with stride ld) times one group's four panels: the int32 sums of both limbs, hi's at
// out[(i * 8 + j) * 16], lo's at out[(i * 8 + 4 + j) * 16]
template <int NR>
SCRATCHCHAT_VNNI inline void vnni_tile(const int8_t* hi, const int8_t* lo, int64_t ld, int64_t K4, const uint8_t* wg,
                                       int32_t* out) {
  constexpr int NP = DP_PANELS;
  __m512i ah[NR][NP], al[NR][NP];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NP; ++j) ah[i][j] = al[i][j] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < K4; ++kk) {
    __m512i w[NP];
    for (int j = 0; j < NP; ++j) w[j] = _mm512_loadu_si512(wg + (kk * NP + j) * 64);
    for (int i = 0; i < NR; ++i) {
      int32_t h, l;
      std::memcpy(&h, hi + i * ld + 4 * kk, 4);
      std::memcpy(&l, lo + i * ld + 4 * kk, 4);
      const __m512i bh = _mm512_set1_epi32(h), bl = _mm512_set1_epi32(l);
      for (int j = 0; j < NP; ++j) {
        ah[i][j] = _mm512_dpbusd_epi32(ah[i][j], w[j], bh);
        al[i][j] = _mm512_dpbusd_epi32(al[i][j], w[j], bl);
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NP; ++j) {
      _mm512_storeu_si512(out + (i * 2 * NP + j) * 16, ah[i][j]);
      _mm512_storeu_si512(out + (i * 2 * NP + NP + j) * 16, al[i][j]);
    }
}

// rows two at a time (16 accumulators), then one, against group g; each row's sums put together exactly and scaled
template <int NR>
SCRATCHCHAT_VNNI void vnni_rows(const Limbs& l, int64_t r, const uint8_t* w, int64_t K4, int64_t g, int64_t N,
                                const Epilogue& ep, float* y) {
  constexpr int NP = DP_PANELS;
  alignas(64) int32_t sums[NR * 2 * NP * 16];
  alignas(64) float v[NP * 16];
  vnni_tile<NR>(l.hi.data() + r * l.ld, l.lo.data() + r * l.ld, l.ld, K4, w, sums);
  for (int i = 0; i < NR; ++i) {
    const int32_t* s = sums + i * 2 * NP * 16;
    // 256 hi + lo - 128 sum q in float64, exact (below 2^40), rounded once to float32, then the row's step
    const __m512d offset = _mm512_set1_pd(static_cast<double>(128 * l.sum[r + i]));
    const __m256 step = _mm256_set1_ps(l.step[r + i]);
    for (int c = 0; c < NP * 16; c += 8) {
      const __m512d h = _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(s + c)));
      const __m512d lo = _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(s + NP * 16 + c)));
      const __m512d exact = _mm512_sub_pd(_mm512_add_pd(_mm512_mul_pd(h, _mm512_set1_pd(256.0)), lo), offset);
      _mm256_store_ps(v + c, _mm256_mul_ps(_mm512_cvtpd_ps(exact), step));
    }
    for (int c = 0; c < NP * 16; c += 8) panel_store(v + c, r + i, g * NP * 16 + c, N, ep, y);
  }
}

SCRATCHCHAT_VNNI void run_vnni(const Limbs& l, int64_t R, const uint8_t* wp, int64_t K4, int64_t N,
                               const Epilogue& ep, float* y) {
  const int64_t groups = (N + 63) / 64;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, DP_PANELS * 64 * K4));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* w = wp + g * K4 * DP_PANELS * 64;
      int64_t r = 0;
      for (; r + 2 <= R; r += 2) vnni_rows<2>(l, r, w, K4, g, N, ep, y);
      if (r < R) vnni_rows<1>(l, r, w, K4, g, N, ep, y);
    }
    ep.finish(y, g0 * 64, std::min(N, g1 * 64));
  });
}

// (x @ q.T) * scale (+ bias) for bf16 x through the VNNI panels (G, K4, 64, 4) of an int8 weight q (see above)
at::Tensor linear_dpi8(const at::Tensor& x, const at::Tensor& wp, int64_t N, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                       const Tail* tail, const Reuse* reuse = nullptr) {
  TORCH_CHECK(cpu_has_avx512_vnni(), "linear_dpi8 needs a CPU with AVX512-VNNI");
  TORCH_CHECK(wp.scalar_type() == at::kByte, "linear_dpi8 takes the uint8 panels of pack_dpi8, not ",
              wp.scalar_type());
  check_dp("linear_dpi8", x, wp, N, 4, bias);
  TORCH_CHECK(scale.numel() == N, "scale has ", scale.numel(), " entries, not ", N);
  const int64_t R = x.size(0), K = x.size(1), K4 = wp.size(1);
  TORCH_CHECK(K <= VNNI_MAX_K, "linear_dpi8 takes at most ", VNNI_MAX_K, " input features, not ", K);
  const at::Tensor xc = x.contiguous();
  thread_local Limbs limbs;  // reused: a decode step quantizes ~120 rows
  quantize_limbs(xc.data_ptr<bf16>(), R, K, K4, limbs);
  Output out(x, N, bias, residual, tail, reuse);
  const at::Tensor sf = as_float(scale);
  out.ep.scale = sf.data_ptr<float>();
  run_vnni(limbs, R, wp.data_ptr<uint8_t>(), K4, N, out.ep, out.y.data_ptr<float>());
  return out.result(x);
}

// ---- the small steps of a decode layer ----

// exp(x) for float32 lanes: Cephes' expf (range reduction by ln 2, degree-6 polynomial), ~1 ulp.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {
  float v[8] = {x}, out[8];
  _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(v)));
  return out[0];
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * widen(b[i]);
  return s;
}

// x * cos + roll(x, hd / 2) * signed_sin, rounded to T after each op as the PyTorch path does (its tables are
// already in T there: cos and sin are rounded to T first).
inline __m256 round_to(const __m256 v, float*) { return v; }  // T = float: no rounding
inline __m256 round_to(const __m256 v, bf16*) { return widen_bf16x8(round_bf16x8(v)); }

template <typename T>
inline void store8(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, bf16>)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), round_bf16x8(v));
  else
    _mm256_storeu_ps(p, v);
}

template <typename T>
inline void rope(const T* x, const float* cos, const float* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  if (half % 8 == 0) {  // the loop below, 8 features at a time (the same roundings)
    T* tag = nullptr;
    const __m256 neg = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < hd; i += 8) {
      const __m256 c = round_to(_mm256_loadu_ps(cos + i), tag);
      const __m256 sv = _mm256_loadu_ps(sin + i);
      const __m256 s = round_to(i < half ? _mm256_xor_ps(sv, neg) : sv, tag);
      const __m256 a = round_to(_mm256_mul_ps(load8(x + i), c), tag);
      const __m256 b = round_to(_mm256_mul_ps(load8(x + (i + half) % hd), s), tag);
      store8(out + i, _mm256_add_ps(a, b));
    }
    return;
  }
  for (int64_t i = 0; i < hd; ++i) {
    const float c = widen(T(cos[i])), s = widen(T(i < half ? -sin[i] : sin[i]));
    const float a = widen(T(widen(x[i]) * c));
    const float b = widen(T(widen(x[(i + half) % hd]) * s));
    out[i] = T(a + b);
  }
}

// w[t] = (q . k_t) * scale for the n keys k_t = k + t * st (hd features each). Eight keys at a time: eight
// accumulators over the features, then one transposing reduction (hadd tree) for all eight dot products instead of
// a horizontal sum per key.
template <typename T>
inline void scores(const float* q, const T* k, int64_t st, int64_t n, int64_t hd, float scale, float* w) {
  int64_t t = 0;
  if (hd % 8 == 0) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (; t + 8 <= n; t += 8) {
      __m256 a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(k + (t + j) * st + d), a[j]);
      }
      const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      const __m256 dots = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                        _mm256_permute2f128_ps(s0123, s4567, 0x31));
      _mm256_storeu_ps(w + t, _mm256_mul_ps(dots, sc));
    }
  }
  for (; t < n; ++t) w[t] = dot(q, k + t * st, hd) * scale;
}

// w[t] = exp(w[t] - max w) over the n scores; returns their sum.
inline float softmax_numerators(float* w, int64_t n) {
  float m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) m = std::max(m, w[t]);
  int64_t t = 0;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(w + t), mv));
    _mm256_storeu_ps(w + t, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; t < n; ++t) {
    w[t] = exp1(w[t] - m);
    sum += w[t];
  }
  return sum;
}

// out[d0 .. d0 + 8 NV) = sum_t w[t] v_t[...], NV registers of accumulators (index pack: no stack round trips)
template <typename T, int NV, size_t... I>
inline void weighted_sum_chunk(const float* w, const T* v, int64_t vt, int64_t n, float inv, float* acc_out,
                               std::index_sequence<I...>) {
  __m256 acc[NV];
  ((acc[I] = _mm256_setzero_ps()), ...);
  for (int64_t t = 0; t < n; ++t) {
    const __m256 wt = _mm256_broadcast_ss(w + t);
    const T* row = v + t * vt;
    ((acc[I] = _mm256_fmadd_ps(wt, load8(row + I * 8), acc[I])), ...);
  }
  const __m256 iv = _mm256_set1_ps(inv);
  ((_mm256_storeu_ps(acc_out + I * 8, _mm256_mul_ps(acc[I], iv))), ...);
}

// o = (sum_t w[t] v_t) * inv over the n value rows v_t = v + t * vt (hd features), accumulated in registers 64
// features at a time
template <typename T>
inline void weighted_sum(const float* w, const T* v, int64_t vt, int64_t n, int64_t hd, float inv, T* o) {
  alignas(32) float buf[64];
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) {
    weighted_sum_chunk<T, 8>(w, v + d, vt, n, inv, buf, std::make_index_sequence<8>{});
    for (int j = 0; j < 64; ++j) o[d + j] = T(buf[j]);
  }
  for (; d + 8 <= hd; d += 8) {
    weighted_sum_chunk<T, 1>(w, v + d, vt, n, inv, buf, std::make_index_sequence<1>{});
    for (int j = 0; j < 8; ++j) o[d + j] = T(buf[j]);
  }
  for (; d < hd; ++d) {
    float a = 0.f;
    for (int64_t t = 0; t < n; ++t) a += w[t] * widen(v[t * vt + d]);
    o[d] = T(a * inv);
  }
}

// decode attention with AVX512-BF16 (defined with the prefill attention's pieces below): bf16, hd a multiple of 32
// up to 128, up to DECODE_DP_MAX_REP query heads a kv head
constexpr int64_t DECODE_DP_MAX_REP = 64;
void decode_attention_dp(const bf16* q, const bf16* kd, const bf16* vd, const int64_t* pos, int64_t B, int64_t H,
                         int64_t Hkv, int64_t hd, int64_t sb, int64_t sh, int64_t st, int64_t vb, int64_t vh,
                         int64_t vt, bf16* out);

template <typename T>
void decode_attention_impl(const at::Tensor& qkv, const at::Tensor& kc, const at::Tensor& vc,
                           const at::Tensor& positions, const float* cos, const float* sin, int64_t table_rows,
                           int64_t H, at::Tensor& y) {
  const int64_t B = qkv.size(0), Hkv = kc.size(1), S = kc.size(2), hd = kc.size(3);
  const int64_t width = qkv.size(1), rep = H / Hkv;
  const int64_t sb = kc.stride(0), sh = kc.stride(1), st = kc.stride(2);
  const int64_t vb = vc.stride(0), vh = vc.stride(1), vt = vc.stride(2);
  const T* in = qkv.data_ptr<T>();
  T* kd = kc.data_ptr<T>();
  T* vd = vc.data_ptr<T>();
  T* out = y.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position ", pos[b], " is outside the cache's ", S, " slots");
    TORCH_CHECK(table_rows < 0 || pos[b] < table_rows, "position ", pos[b], " is past the RoPE tables");
  }
  const bool dp = std::is_same_v<T, bf16> && cpu_has_avx512_bf16() && hd % 32 == 0 && hd <= 128 &&
                  rep <= DECODE_DP_MAX_REP;
  // 1. rotated queries (as T; for the float32 loop widened to float32); keys and values into the cache
  std::vector<float> q(dp ? 0 : B * H * hd);
  std::vector<T> qt(dp ? B * H * hd : 0);
  // a few hundred elements per head: one thread (a parallel region costs more than this work)
  at::parallel_for(0, B * (H + Hkv), 64, [&](int64_t i0, int64_t i1) {
    std::vector<T> tmp(hd);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H + Hkv), h = i % (H + Hkv), p = pos[b];
      const T* src = in + b * width + h * hd;
      const float* c = cos ? cos + p * hd : nullptr;
      const float* s = sin ? sin + p * hd : nullptr;
      if (h < H) {
        if (c) rope(src, c, s, hd, tmp.data()); else std::copy(src, src + hd, tmp.data());
        if (dp) std::copy(tmp.begin(), tmp.end(), qt.begin() + (b * H + h) * hd);
        else for (int64_t d = 0; d < hd; ++d) q[(b * H + h) * hd + d] = widen(tmp[d]);
      } else {
        const int64_t g = h - H;
        T* kdst = kd + b * sb + g * sh + p * st;
        if (c) rope(src, c, s, hd, kdst); else std::copy(src, src + hd, kdst);
        const T* vsrc = in + b * width + (H + Hkv + g) * hd;
        std::copy(vsrc, vsrc + hd, vd + b * vb + g * vh + p * vt);
      }
    }
  });
  // 2. softmax(q k^T / sqrt(hd)) v over positions 0..p of each row, per query head
  if constexpr (std::is_same_v<T, bf16>) {
    if (dp) {
      decode_attention_dp(qt.data(), kd, vd, pos, B, H, Hkv, hd, sb, sh, st, vb, vh, vt, out);
      return;
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);
  // threads only for enough work per task (~64k multiply-adds): short contexts run on the calling thread
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (2 * longest * hd));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::unique_ptr<float[]> w(new float[longest]);  // scores of up to the longest row (not zeroed: all written)
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep, n = pos[b] + 1;
      const T* kh = kd + b * sb + g * sh;
      const T* vhp = vd + b * vb + g * vh;
      scores(q.data() + i * hd, kh, st, n, hd, scale, w.get());
      const float sum = softmax_numerators(w.get(), n);
      weighted_sum(w.get(), vhp, vt, n, hd, 1.0f / sum, out + b * H * hd + h * hd);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& kc, const at::Tensor& vc,
                            const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, int64_t n_heads, at::Tensor* slot = nullptr) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be a contiguous (B, (H + 2 Hkv) hd) tensor");
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4 && kc.stride(3) == 1 && vc.stride(3) == 1,
              "the caches must be (B, Hkv, S, hd) with contiguous rows");
  const int64_t B = qkv.size(0), Hkv = kc.size(1), hd = kc.size(3);
  TORCH_CHECK(kc.size(0) == B && vc.size(0) == B, "cache rows ", kc.size(0), " != batch ", B);
  TORCH_CHECK(vc.sizes() == kc.sizes(), "the value cache ", vc.sizes(), " differs from the key cache ", kc.sizes());
  TORCH_CHECK(Hkv > 0 && hd > 0, "the caches need at least one head of non-zero size");
  TORCH_CHECK(n_heads % Hkv == 0 && qkv.size(1) == (n_heads + 2 * Hkv) * hd, "qkv width does not match the heads");
  TORCH_CHECK(qkv.scalar_type() == kc.scalar_type() && kc.scalar_type() == vc.scalar_type(),
              "qkv and the caches must share a dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B, "positions must be (B,) int64");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "give both RoPE tables or neither");
  const at::Tensor pc = positions.contiguous();
  at::Tensor c, s;
  if (cos) {
    auto as_f32 = [](const at::Tensor& t) {  // the model's float32 tables as they are (no dispatcher round trip)
      return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
    };
    c = as_f32(*cos);
    s = as_f32(*sin);
    TORCH_CHECK(c.dim() == 2 && c.size(1) == hd && s.sizes() == c.sizes(), "RoPE tables must be (S, hd)");
  }
  at::Tensor y = empty_in(slot, {B, n_heads * hd}, qkv.options());
  const float* cp = cos ? c.data_ptr<float>() : nullptr;
  const float* sp = cos ? s.data_ptr<float>() : nullptr;
  if (qkv.scalar_type() == at::kFloat)
    decode_attention_impl<float>(qkv, kc, vc, pc, cp, sp, cos ? c.size(0) : -1, n_heads, y);
  else if (qkv.scalar_type() == at::kBFloat16)
    decode_attention_impl<bf16>(qkv, kc, vc, pc, cp, sp, cos ? c.size(0) : -1, n_heads, y);
  else
    TORCH_CHECK(false, "decode_attention takes float32 or bfloat16, not ", qkv.scalar_type());
  return y;
}

// ---- attention of a prefill chunk over the cache ----
//
// A chat turn prefills its new tokens against everything cached before them (~1000 keys at turn 10 next to ~50
// queries). The key/value heads are shared by rep = H / Hkv query heads (GQA), so a kv head's queries form
// rep * T rows that all read the same keys and values: taken QT = 8 rows at a time, one row per AVX2 lane, the
// scores are 8-lane FMAs over head_dim with each key element broadcast (no horizontal sums), the softmax runs
// down the lanes (a row's max and sum are lane-wise), and the weighted sum of values broadcasts the probabilities of
// four rows against two 8-feature vectors of each value row (8 accumulators; a first version with blocks of 8 keys
// for the scores and three rows of four vectors, remainder rows one at a time, ran no faster than SDPA). Two passes
// per tile (all scores, then the weighted sum) in place of an online softmax: a tile's scores are 8 x (at most the
// context) floats.
constexpr int QT = 8;

// p[j * 8 + lane] = qt[:, lane] . k_j for keys j0 .. j0 + NK; qt is the tile's queries transposed, (hd, 8)
template <int NK, size_t... I>
inline void tile_scores(const float* qt, const float* k, int64_t st, int64_t j0, int64_t hd, float* p,
                        std::index_sequence<I...>) {
  __m256 acc[NK];
  ((acc[I] = _mm256_setzero_ps()), ...);
  const float* kj = k + j0 * st;
  for (int64_t d = 0; d < hd; ++d) {
    const __m256 qv = _mm256_loadu_ps(qt + d * QT);
    ((acc[I] = _mm256_fmadd_ps(_mm256_broadcast_ss(kj + I * st + d), qv, acc[I])), ...);
  }
  ((_mm256_storeu_ps(p + (j0 + I) * QT, acc[I])), ...);
}

// out rows l0 .. l0 + NR of the tile, features d0 .. d0 + 8 NV: sum_j p[j * 8 + lane] v_j over keys 0 .. n
template <int NR, int NV, size_t... I>
inline void tile_values(const float* p, const float* v, int64_t vt, int64_t n, int l0, int64_t d0, float* out,
                        std::index_sequence<I...>) {
  __m256 acc[NR * NV];
  ((acc[I] = _mm256_setzero_ps()), ...);
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = v + j * vt + d0;
    __m256 vv[NV], pb[NR];
    for (int c = 0; c < NV; ++c) vv[c] = _mm256_loadu_ps(vj + c * 8);
    for (int r = 0; r < NR; ++r) pb[r] = _mm256_broadcast_ss(p + j * QT + l0 + r);
    ((acc[I] = _mm256_fmadd_ps(pb[I / NV], vv[I % NV], acc[I])), ...);
  }
  ((_mm256_storeu_ps(out + (I / NV) * 64 + (I % NV) * 8, acc[I])), ...);
}

// rows l0 .. l0 + NR of the tile into o[r] (hd features each, scaled by inv[lane])
template <int NR>
inline void tile_output(const float* p, const float* v, int64_t vt, int64_t n, int l0, int64_t hd, const float* inv,
                        float* const* o) {
  alignas(32) float buf[NR * 64];
  int64_t d = 0;
  auto put = [&](int width) {
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < width; ++c) o[r][d + c] = buf[r * 64 + c] * inv[l0 + r];
  };
  for (; d + 16 <= hd; d += 16) {
    tile_values<NR, 2>(p, v, vt, n, l0, d, buf, std::make_index_sequence<NR * 2>{});
    put(16);
  }
  for (; d < hd; d += 8) {
    tile_values<NR, 1>(p, v, vt, n, l0, d, buf, std::make_index_sequence<NR>{});
    put(8);
  }
}

void prefix_attention_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const int64_t* pos,
                           at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), Hkv = kc.size(1);
  const int64_t rep = H / Hkv, R = rep * T, tiles = (R + QT - 1) / QT;
  const int64_t qb = q.stride(0), qh = q.stride(1), qs = q.stride(2);
  const int64_t kb = kc.stride(0), kh = kc.stride(1), st = kc.stride(2);
  const int64_t vb = vc.stride(0), vh = vc.stride(1), vt = vc.stride(2);
  const float* qd = q.data_ptr<float>();
  const float* kd = kc.data_ptr<float>();
  const float* vd = vc.data_ptr<float>();
  float* out = y.data_ptr<float>();  // (B, T, H * hd)
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * Hkv * tiles, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qt(hd * QT), p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hkv * tiles), g = i / tiles % Hkv, r0 = i % tiles * QT;
      alignas(32) int32_t last[QT];  // each lane's last key (its query's position)
      float* o[QT];
      int64_t n = 0;  // keys the tile reads: up to its furthest query
      int rows = 0;
      for (int l = 0; l < QT; ++l) {
        const int64_t r = r0 + l;
        if (r < R) {
          const int64_t h = g * rep + r / T, t = r % T;
          last[l] = static_cast<int32_t>(pos[b * T + t]);
          o[l] = out + (b * T + t) * H * hd + h * hd;
          const float* src = qd + b * qb + h * qh + t * qs;
          for (int64_t d = 0; d < hd; ++d) qt[d * QT + l] = src[d] * scale;
          n = std::max<int64_t>(n, last[l] + 1);
          rows = l + 1;
        } else {  // past the last row: zeros, kept finite and dropped
          last[l] = 0;
          for (int64_t d = 0; d < hd; ++d) qt[d * QT + l] = 0.f;
        }
      }
      p.resize(n * QT);
      const float* kg = kd + b * kb + g * kh;
      int64_t j = 0;
      for (; j + 12 <= n; j += 12) tile_scores<12>(qt.data(), kg, st, j, hd, p.data(), std::make_index_sequence<12>{});
      for (; j < n; ++j) tile_scores<1>(qt.data(), kg, st, j, hd, p.data(), std::make_index_sequence<1>{});
      // softmax down the lanes: keys past a lane's position are masked out (exactly 0 after the exponential)
      const __m256i lastv = _mm256_load_si256(reinterpret_cast<const __m256i*>(last));
      __m256 m = _mm256_set1_ps(-INFINITY);
      for (j = 0; j < n; ++j) {
        const __m256 masked = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)), lastv));
        m = _mm256_max_ps(m, _mm256_blendv_ps(_mm256_loadu_ps(p.data() + j * QT), _mm256_set1_ps(-INFINITY), masked));
      }
      __m256 sum = _mm256_setzero_ps();
      for (j = 0; j < n; ++j) {
        const __m256 masked = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)), lastv));
        const __m256 e = _mm256_blendv_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(p.data() + j * QT), m)),
                                          _mm256_setzero_ps(), masked);
        _mm256_storeu_ps(p.data() + j * QT, e);
        sum = _mm256_add_ps(sum, e);
      }
      alignas(32) float inv[QT];
      _mm256_store_ps(inv, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
      const float* vg = vd + b * vb + g * vh;
      int l = 0;
      for (; l + 4 <= rows; l += 4) {
        int64_t nr = 0;
        for (int c = 0; c < 4; ++c) nr = std::max<int64_t>(nr, last[l + c] + 1);
        tile_output<4>(p.data(), vg, vt, nr, l, hd, inv, o + l);
      }
      for (; l < rows; ++l) tile_output<1>(p.data(), vg, vt, last[l] + 1, l, hd, inv, o + l);
    }
  });
}

// ---- bf16 prefix attention on AVX512-BF16: the scores with `vdpbf16ps` ----
//
// The same work as prefix_attention_impl, 16 query rows a tile (one per zmm lane). The scores take the head features
// a pair at a time with vdpbf16ps (two exact bf16 products added into a float32 lane: 32 multiply-adds an
// instruction where the float32 tile above does 8; the tile's queries packed (hd / 2, 16, 2), each key's feature pair
// one broadcast), then scaled in float32; the softmax in float32; the weighted sum of values by vdpbf16ps too, the
// numerators rounded to bf16 in pairs of keys (as PyTorch's SDPA rounds its probabilities for that product) and the
// values paired once per key/value head (pair_values), the sums and the division by the denominator in float32.
// SmolLM2's 55 queries over 1069 keys on the 2-core Zen4 EPYC: ~64% of vdpbf16ps's peak (one zmm instruction a
// cycle a core) for one layer, ~62% over 30 layers' caches; its two product loops at 83-92% of it; the rest is the
// softmax and the unused lanes of a head group's last tile (165 query rows in 11 tiles).
constexpr int QD = 16;

// A scratch buffer left uninitialized: every element is written before it is read. (A std::vector<bf16> of n
// elements zero-fills them one 16-bit store at a time: the values' pair buffer of SmolLM2's turn-10 chunk, 410 KB a
// layer, took 6% of the attention.)
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  int64_t n = 0;
  T* get(int64_t m) {
    if (m > n) {
      p.reset(new T[m]);  // default-initialized: no fill for float or c10::BFloat16
      n = m;
    }
    return p.get();
  }
};

// e^x for the softmax numerators (x <= 0: scores minus their max) as 2^n * 2^f, n = round(x log2 e), f in
// [-1/2, 1/2]: 2^f by its degree-5 Taylor polynomial (relative error below 6e-6, far under the half a bf16 ulp,
// 2e-3, to which the numerators are rounded for the values' product), the scaling by vscalefps (which flushes to 0
// below the float range). 9 instructions where exp8's Cephes expf takes 17 a vector: the softmax was a quarter of a
// tile's time (SmolLM2's 55 queries over 1069 keys).
SCRATCHCHAT_AVX512 inline __m512 exp16_softmax(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558146e-3f);                  // ln2^5 / 5!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));  // ln2^4 / 4!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));  // ln2^3 / 3!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));  // ln2^2 / 2!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

SCRATCHCHAT_AVX512 inline __m512bh bcast_pair(const bf16* p) {  // two adjacent bf16 in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

// acc + a . (the pair at p in every lane): _mm512_dpbf16_ps(acc, a, bcast_pair(p)) with the pair as the
// instruction's embedded-broadcast memory operand ({1to16}). gcc keeps a separate vpbroadcastd, which Zen4 issues on
// the same pipes as the dot products: where every product has its own broadcast (the prefill attention's tiles) that
// halves the rate. The two bf16 products of a pair are exact in float32, so which operand holds the broadcast does
// not change a bit.
SCRATCHCHAT_AVX512 inline __m512 dp_bcast(__m512 acc, __m512bh a, const bf16* p) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

// s[j * 16 + lane] = scale * (row lane's query . k_j) for keys j0 .. j0 + NK
template <int NK, size_t... I>
SCRATCHCHAT_AVX512 inline void dp_tile_scores(const bf16* qp, const bf16* k, int64_t st, int64_t j0, int64_t hd2,
                                              float scale, float* s, std::index_sequence<I...>) {
  __m512 acc[NK];
  ((acc[I] = _mm512_setzero_ps()), ...);
  const bf16* kj = k + j0 * st;
  for (int64_t kk = 0; kk < hd2; ++kk) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + kk * 2 * QD);
    ((acc[I] = dp_bcast(acc[I], qv, kj + I * st + 2 * kk)), ...);
  }
  const __m512 sc = _mm512_set1_ps(scale);
  ((_mm512_storeu_ps(s + (j0 + I) * QD, _mm512_mul_ps(acc[I], sc))), ...);
}

// buf[f * 16 + lane] = sum over the key pairs jj < n2 of row lane's two numerators (e[2jj], e[2jj + 1]) times value
// feature d0 + f of keys 2jj and 2jj + 1: one vdpbf16ps per feature and key pair. ep holds the numerators as bf16
// pairs per lane, (n2, 16, 2); vp the head's values as bf16 pairs per feature, (n2, hd, 2).
template <int NF, size_t... I>
SCRATCHCHAT_AVX512 inline void dp_tile_values(const bf16* ep, const bf16* vp, int64_t hd, int64_t n2, int64_t d0,
                                              float* buf, std::index_sequence<I...>) {
  __m512 acc[NF];
  ((acc[I] = _mm512_setzero_ps()), ...);
  for (int64_t jj = 0; jj < n2; ++jj) {
    const __m512bh ev = (__m512bh)_mm512_loadu_si512(ep + jj * 2 * QD);
    const bf16* vj = vp + (jj * hd + d0) * 2;
    ((acc[I] = dp_bcast(acc[I], ev, vj + 2 * I)), ...);
  }
  ((_mm512_storeu_ps(buf + I * QD, acc[I])), ...);
}

// one tile: rows r0 .. r0 + 16 of kv head g of batch row b (rows past R are zeros, kept finite and dropped); s and
// ep are the caller's scratch, vp the head's values in pairs of keys (see dp_tile_values)
SCRATCHCHAT_AVX512 void dp_prefix_tile(const bf16* qd, int64_t qb, int64_t qh, int64_t qs, const bf16* kg, int64_t st,
                                       const bf16* vp, const int64_t* pos, int64_t b, int64_t g, int64_t r0, int64_t R,
                                       int64_t T, int64_t H, int64_t rep, int64_t hd, float scale, float* out,
                                       Scratch<float>& scores, Scratch<bf16>& pairs_buf) {
  const int64_t hd2 = hd / 2;
  alignas(64) bf16 qp[256 * 2 * QD];  // the tile's queries, (hd / 2, 16, 2), hd up to 512
  alignas(64) float buf[QD * QD];
  alignas(64) int32_t last[QD];  // each lane's last key (its query's position)
  float* o[QD];
  int64_t n = 0;  // keys the tile reads: up to its furthest query
  int rows = 0;
  for (int l = 0; l < QD; ++l) {
    const int64_t r = r0 + l;
    if (r < R) {
      const int64_t h = g * rep + r / T, t = r % T;
      last[l] = static_cast<int32_t>(pos[b * T + t]);
      o[l] = out + (b * T + t) * H * hd + h * hd;
      const bf16* src = qd + b * qb + h * qh + t * qs;
      for (int64_t kk = 0; kk < hd2; ++kk) std::memcpy(qp + (kk * QD + l) * 2, src + 2 * kk, 4);
      n = std::max<int64_t>(n, last[l] + 1);
      rows = l + 1;
    } else {
      last[l] = 0;
      for (int64_t kk = 0; kk < hd2; ++kk) std::memset(qp + (kk * QD + l) * 2, 0, 4);
    }
  }
  float* const s = scores.get(n * QD);
  int64_t j = 0;
  for (; j + 12 <= n; j += 12)
    dp_tile_scores<12>(qp, kg, st, j, hd2, scale, s, std::make_index_sequence<12>{});
  for (; j < n; ++j) dp_tile_scores<1>(qp, kg, st, j, hd2, scale, s, std::make_index_sequence<1>{});
  // softmax down the lanes in float32; keys past a lane's position are exactly 0
  const __m512i lastv = _mm512_load_si512(last);
  // keys every row of the tile attends to (a turn's new tokens all see the whole history): no masks there, the same
  // arithmetic for those rows (a tile's unused lanes have zero queries: finite, dropped)
  int64_t full = n;
  for (int l = 0; l < rows; ++l) full = std::min<int64_t>(full, last[l] + 1);
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (j = 0; j < full; ++j) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j * QD));
  for (; j < n; ++j) {
    const __mmask16 keep = _mm512_cmple_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(j)), lastv);
    m = _mm512_mask_max_ps(m, keep, m, _mm512_loadu_ps(s + j * QD));
  }
  // the numerators summed in float32, and rounded to bf16 for the values' product (as PyTorch's SDPA rounds its
  // probabilities for that product in bf16), in pairs of keys per lane (a zero past an odd n)
  const int64_t n2 = (n + 1) / 2;
  bf16* const ep = pairs_buf.get(n2 * 2 * QD);
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);  // lane l: (key 2jj, key 2jj + 1)
  __m512 sum = _mm512_setzero_ps();
  int64_t jj = 0;
  for (; 2 * jj + 1 < full; ++jj) {
    const __m512 e0 = exp16_softmax(_mm512_sub_ps(_mm512_loadu_ps(s + 2 * jj * QD), m));
    sum = _mm512_add_ps(sum, e0);
    const __m512 e1 = exp16_softmax(_mm512_sub_ps(_mm512_loadu_ps(s + (2 * jj + 1) * QD), m));
    sum = _mm512_add_ps(sum, e1);
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
    _mm512_storeu_si512(ep + jj * 2 * QD, _mm512_permutexvar_epi16(pairs, both));
  }
  for (; jj < n2; ++jj) {
    __m512 ex[2];
    for (int h = 0; h < 2; ++h) {
      j = 2 * jj + h;
      const __mmask16 keep = j < n ? _mm512_cmple_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(j)), lastv) : 0;
      const __m512 x = _mm512_maskz_sub_ps(keep, _mm512_loadu_ps(s + std::min(j, n - 1) * QD), m);
      ex[h] = _mm512_maskz_mov_ps(keep, exp16_softmax(x));
      sum = _mm512_add_ps(sum, ex[h]);
    }
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(ex[1], ex[0]);  // key 2jj's 16 lanes, then key 2jj + 1's
    _mm512_storeu_si512(ep + jj * 2 * QD, _mm512_permutexvar_epi16(pairs, both));
  }
  alignas(64) float inv[QD];
  _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
  for (int64_t d0 = 0; d0 < hd; d0 += 16) {
    const int nf = hd - d0 >= 16 ? 16 : 8;
    if (nf == 16)
      dp_tile_values<16>(ep, vp, hd, n2, d0, buf, std::make_index_sequence<16>{});
    else
      dp_tile_values<8>(ep, vp, hd, n2, d0, buf, std::make_index_sequence<8>{});
    for (int l = 0; l < rows; ++l)
      for (int f = 0; f < nf; ++f) o[l][d0 + f] = buf[f * QD + l] * inv[l];
  }
}

// dst (ceil(n / 2), hd, 2) = the n value rows of src (row stride vt) in pairs: (v[2jj][d], v[2jj + 1][d]) side by
// side, zeros for the missing row of an odd n
SCRATCHCHAT_AVX512 void pair_values(const bf16* src, int64_t vt, int64_t n, int64_t hd, bf16* dst) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                      36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t j = 0; j < n; j += 2) {
    const bf16* r0 = src + j * vt;
    const bf16* r1 = j + 1 < n ? r0 + vt : nullptr;
    bf16* o = dst + j * hd;  // pair j / 2: (j / 2) * hd * 2
    int64_t d = 0;
    for (; d + 32 <= hd; d += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + d);
      const __m512i b = r1 ? _mm512_loadu_si512(r1 + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + 2 * d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(o + 2 * d + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
    for (; d < hd; ++d) {
      o[2 * d] = r0[d];
      o[2 * d + 1] = r1 ? r1[d] : bf16(0.f);
    }
  }
}

// ---- decode attention on AVX512-BF16 ----
//
// One query per head and row (decode), bf16 caches, hd a multiple of 32 up to 128. A task is a batch row's kv head:
// its rep query heads read each key and value once from memory (GQA). Scores: 16 keys at a time, one vdpbf16ps per
// 32 features and key into a register per key, then one transposing reduction for the 16 dot products; the values'
// product in pairs of keys, (v_t[f], v_t+1[f]) interleaved in registers against the two numerators rounded to bf16
// (as the prefill tiles and PyTorch's SDPA round them), their sum kept in float32. About a fifth of the float32
// loop's instructions; with cold caches (a decode step's) ~1.4x faster, the reads of the cache then the limit.

// 128-bit lanes (x0 + x1, x2 + x3, y0 + y1, y2 + y3) of x and y
SCRATCHCHAT_AVX512 inline __m512 add_lane_pairs(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

// lane j = the sum of a[j]'s 16 lanes
SCRATCHCHAT_AVX512 inline __m512 sum_lanes16(const __m512* a) {
  __m512 four[4];
  for (int i = 0; i < 4; ++i) {
    const __m512* x = a + 4 * i;
    const __m512 p01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 p23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    // 128-bit lane L: the sums of lane L's four floats of a[4i], .., a[4i + 3]
    four[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(p01), _mm512_castps_pd(p23))),
                            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(p01), _mm512_castps_pd(p23))));
  }
  return add_lane_pairs(add_lane_pairs(four[0], four[1]), add_lane_pairs(four[2], four[3]));
}

// s[0 .. 16) = scale * (q . k_j) for the 16 keys k_j = k + j * st; q as NC registers of 32 features
template <int NC, size_t... J>
SCRATCHCHAT_AVX512 inline void dp_decode_scores16(const __m512bh* qv, const bf16* k, int64_t st, float scale, float* s,
                                                  std::index_sequence<J...>) {
  __m512 a[16];
  ((a[J] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(k + J * st), qv[0])), ...);
  for (int c = 1; c < NC; ++c)
    ((a[J] = _mm512_dpbf16_ps(a[J], (__m512bh)_mm512_loadu_si512(k + J * st + c * 32), qv[c])), ...);
  _mm512_storeu_ps(s, _mm512_mul_ps(sum_lanes16(a), _mm512_set1_ps(scale)));
}

// o[r * NC * 32 + f] = sum over the n keys t of p[r * ps + t] * v_t[f] for RH heads, v_t = v + t * vt; p holds
// zero past n up to an even count
template <int NC, int RH>
SCRATCHCHAT_AVX512 void dp_decode_values(const bf16* p, int64_t ps, const bf16* v, int64_t vt, int64_t n, float* o) {
  alignas(64) static const bf16 zeros[NC * 32] = {};
  __m512 acc[RH][NC][2];
  for (int r = 0; r < RH; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_ps();
  for (int64_t jj = 0; 2 * jj < n; ++jj) {
    const bf16* v0 = v + 2 * jj * vt;
    const bf16* v1 = 2 * jj + 1 < n ? v0 + vt : zeros;
    __m512bh pr[RH];
    for (int r = 0; r < RH; ++r) pr[r] = bcast_pair(p + r * ps + 2 * jj);
    for (int c = 0; c < NC; ++c) {
      const __m512i a = _mm512_loadu_si512(v0 + c * 32), b = _mm512_loadu_si512(v1 + c * 32);
      // 128-bit lane L: features 8L .. 8L + 3 (lo) and 8L + 4 .. 8L + 7 (hi) of the chunk, key t's beside t + 1's
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int r = 0; r < RH; ++r) {
        acc[r][c][0] = _mm512_dpbf16_ps(acc[r][c][0], lo, pr[r]);
        acc[r][c][1] = _mm512_dpbf16_ps(acc[r][c][1], hi, pr[r]);
      }
    }
  }
  // features back in order: f -> lo lane 4L + i (i = f % 8 < 4) or hi lane 4L + i - 4, L = f / 8
  alignas(64) static const int32_t first[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static const int32_t second[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i i0 = _mm512_load_si512(first), i1 = _mm512_load_si512(second);
  for (int r = 0; r < RH; ++r)
    for (int c = 0; c < NC; ++c) {
      _mm512_storeu_ps(o + (r * NC + c) * 32, _mm512_permutex2var_ps(acc[r][c][0], i0, acc[r][c][1]));
      _mm512_storeu_ps(o + (r * NC + c) * 32 + 16, _mm512_permutex2var_ps(acc[r][c][0], i1, acc[r][c][1]));
    }
}

// up to 3 heads at a time (their 2 NC RH accumulators in registers)
template <int NC>
SCRATCHCHAT_AVX512 void dp_decode_values_heads(int64_t rh, const bf16* p, int64_t ps, const bf16* v, int64_t vt,
                                               int64_t n, float* o) {
  switch (rh) {
    case 1: return dp_decode_values<NC, 1>(p, ps, v, vt, n, o);
    case 2: return dp_decode_values<NC, 2>(p, ps, v, vt, n, o);
    default: return dp_decode_values<NC, 3>(p, ps, v, vt, n, o);
  }
}

// one batch row's kv head: its rep heads' rotated queries q (rep x hd, bf16, hd = 32 NC), n keys kh + t * st and
// values vhp + t * vt; s (float) and p (bf16) are scratch of rep x np (np >= n, a multiple of 16); out rep x hd
template <int NC>
SCRATCHCHAT_AVX512 void dp_decode_unit(const bf16* q, int64_t rep, const bf16* kh, int64_t st, const bf16* vhp,
                                       int64_t vt, int64_t n, float scale, float* s, bf16* p, int64_t np, bf16* out) {
  constexpr int64_t hd = NC * 32;
  alignas(64) bf16 tail[16 * hd];  // the last block's keys, zeros past n (every key in the same arithmetic)
  for (int64_t t0 = 0; t0 < n; t0 += 16) {  // a block's keys stay in L1 for the group's other heads
    const bf16* kb = kh + t0 * st;
    int64_t kst = st;
    if (n - t0 < 16) {
      std::memset(static_cast<void*>(tail), 0, sizeof(tail));
      for (int64_t j = 0; j < n - t0; ++j)
        std::memcpy(static_cast<void*>(tail + j * hd), kb + j * st, hd * sizeof(bf16));
      kb = tail;
      kst = hd;
    }
    for (int64_t r = 0; r < rep; ++r) {
      __m512bh qv[NC];
      for (int c = 0; c < NC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + r * hd + c * 32);
      dp_decode_scores16<NC>(qv, kb, kst, scale, s + r * np + t0, std::make_index_sequence<16>{});
    }
  }
  alignas(64) float inv[DECODE_DP_MAX_REP];
  for (int64_t r = 0; r < rep; ++r) {  // numerators (zero past n, to the end of the last 16) and 1 / their sum
    float* sr = s + r * np;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 keep = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      m = _mm512_mask_max_ps(m, keep, m, _mm512_loadu_ps(sr + t));
    }
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 keep = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      const __m512 x = _mm512_maskz_sub_ps(keep, _mm512_loadu_ps(sr + t), mv);
      const __m512 e = _mm512_maskz_mov_ps(keep, exp16_softmax(x));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + r * np + t), (__m256i)_mm512_cvtneps_pbh(e));
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  alignas(64) float o[3 * hd];
  for (int64_t r0 = 0; r0 < rep; r0 += 3) {
    const int64_t rh = std::min<int64_t>(3, rep - r0);
    dp_decode_values_heads<NC>(rh, p + r0 * np, np, vhp, vt, n, o);
    for (int64_t r = 0; r < rh; ++r)
      for (int64_t f = 0; f < hd; ++f) out[(r0 + r) * hd + f] = bf16(o[r * hd + f] * inv[r0 + r]);
  }
}

void decode_attention_dp(const bf16* q, const bf16* kd, const bf16* vd, const int64_t* pos, int64_t B, int64_t H,
                         int64_t Hkv, int64_t hd, int64_t sb, int64_t sh, int64_t st, int64_t vb, int64_t vh,
                         int64_t vt, bf16* out) {
  const int64_t rep = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);
  const int64_t np = (longest + 15) / 16 * 16;
  // threads only for enough work per task (~64k multiply-adds): short contexts run on the calling thread
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (2 * longest * hd * rep));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t i0, int64_t i1) {
    Scratch<float> scores;
    Scratch<bf16> numerators;
    float* s = scores.get(rep * np);
    bf16* p = numerators.get(rep * np);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv;
      const bf16* qg = q + (b * H + g * rep) * hd;
      const bf16 *kg = kd + b * sb + g * sh, *vg = vd + b * vb + g * vh;
      bf16* og = out + (b * H + g * rep) * hd;
      switch (hd / 32) {
        case 1: dp_decode_unit<1>(qg, rep, kg, st, vg, vt, pos[b] + 1, scale, s, p, np, og); break;
        case 2: dp_decode_unit<2>(qg, rep, kg, st, vg, vt, pos[b] + 1, scale, s, p, np, og); break;
        case 3: dp_decode_unit<3>(qg, rep, kg, st, vg, vt, pos[b] + 1, scale, s, p, np, og); break;
        default: dp_decode_unit<4>(qg, rep, kg, st, vg, vt, pos[b] + 1, scale, s, p, np, og); break;
      }
    }
  });
}

void prefix_attention_dp(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const int64_t* pos,
                         at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), Hkv = kc.size(1);
  const int64_t rep = H / Hkv, R = rep * T, tiles = (R + QD - 1) / QD;
  const int64_t vb = vc.stride(0), vh = vc.stride(1), vt = vc.stride(2);
  const bf16* kd = kc.data_ptr<bf16>();
  const bf16* vd = vc.data_ptr<bf16>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // each batch row's keys: up to its furthest query, rounded up to a pair; its values in pairs of keys once per kv
  // head, (keys / 2, hd, 2), zeros past the last key
  std::vector<int64_t> nk(B), at(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    nk[b] = 0;
    for (int64_t t = 0; t < T; ++t) nk[b] = std::max<int64_t>(nk[b], pos[b * T + t] + 1);
    at[b + 1] = at[b] + Hkv * ((nk[b] + 1) / 2) * 2 * hd;
  }
  Scratch<bf16> vpairs;
  bf16* const vp_all = vpairs.get(at[B]);
  auto head_values = [&](int64_t b, int64_t g) { return vp_all + at[b] + g * ((nk[b] + 1) / 2) * 2 * hd; };
  // in chunks of keys, so that both threads share the copying (SmolLM2's three kv heads split 2:1 otherwise)
  constexpr int64_t PAIR_CHUNK = 128;  // keys (even: a chunk starts on a pair)
  int64_t chunks = 0;
  for (int64_t b = 0; b < B; ++b) chunks = std::max(chunks, (nk[b] + PAIR_CHUNK - 1) / PAIR_CHUNK);
  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hkv * chunks), g = i / chunks % Hkv, j0 = i % chunks * PAIR_CHUNK;
      if (j0 < nk[b])
        pair_values(vd + b * vb + g * vh + j0 * vt, vt, std::min(PAIR_CHUNK, nk[b] - j0), hd,
                    head_values(b, g) + j0 * hd);
    }
  });
  float* out = y.data_ptr<float>();  // (B, T, H * hd)
  at::parallel_for(0, B * Hkv * tiles, 1, [&](int64_t i0, int64_t i1) {
    Scratch<float> s;
    Scratch<bf16> ep;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hkv * tiles), g = i / tiles % Hkv, r0 = i % tiles * QD;
      dp_prefix_tile(q.data_ptr<bf16>(), q.stride(0), q.stride(1), q.stride(2),
                     kd + b * kc.stride(0) + g * kc.stride(1), kc.stride(2), head_values(b, g), pos, b, g, r0, R, T,
                     H, rep, hd, scale, out, s, ep);
    }
  });
}

at::Tensor prefix_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                            const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && vc.dim() == 4, "q must be (B, H, T, hd), the caches (B, Hkv, S, hd)");
  const bool bf = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK((q.scalar_type() == at::kFloat || bf) && kc.scalar_type() == q.scalar_type() &&
              vc.scalar_type() == q.scalar_type(), "prefix_attention takes float32 or bfloat16 q, k and v alike");
  TORCH_CHECK(q.stride(3) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1, "head features must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), Hkv = kc.size(1), S = kc.size(2);
  TORCH_CHECK(kc.size(0) == B && vc.sizes() == kc.sizes() && kc.size(3) == hd, "q ", q.sizes(), " and the caches ",
              kc.sizes(), " / ", vc.sizes(), " do not match");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, H, " query heads do not share ", Hkv, " key/value heads evenly");
  TORCH_CHECK(hd % 8 == 0, "head_dim must be a multiple of 8, not ", hd);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.size(0) == B &&
              positions.size(1) == T, "positions must be (B, T) int64");
  const at::Tensor pc = positions.contiguous();
  const int64_t* pos = pc.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < S, "position ", pos[i], " is outside the ", S, " keys given");
  at::Tensor y = at::empty({B, T, H * hd}, q.options().dtype(at::kFloat));
  if (!bf) {
    prefix_attention_impl(q, kc, vc, pos, y);
    return y;
  }
  if (cpu_has_avx512_bf16() && hd <= 512) {  // both products with vdpbf16ps, the softmax in float32
    prefix_attention_dp(q, kc, vc, pos, y);
    return to_bf16(y);
  }
  // elsewhere the keys/values attended over widened once (exact; ~2% of the work), float32 inside, output rounded
  prefix_attention_impl(q.to(at::kFloat), kc.to(at::kFloat), vc.to(at::kFloat), pos, y);
  return to_bf16(y);
}

// ---- cached positions copied between caches ----
//
//   scratchchat::copy_positions(dst[], dst_row, src[], src_row, n): dst[i][dst_row, :, :n] = src[i][src_row, :, :n]
//
// A chat turn's cached history goes into its pool row (and a finished row out of it, a batch's rows move to stay
// compact): one copy per layer's keys and values, 60 for SmolLM2, each three strided blocks, ran at half the speed
// of one contiguous copy of the same bytes (1.4 vs 0.6 ms for SmolLM2's 1014 positions). Here every head's block of
// every tensor is one memcpy task of a single parallel region.
void copy_positions(const std::vector<at::Tensor>& dst, int64_t dst_row, const std::vector<at::Tensor>& src,
                    int64_t src_row, int64_t n) {
  TORCH_CHECK(dst.size() == src.size(), "copy_positions: ", dst.size(), " destination tensors for ", src.size(),
              " sources");
  TORCH_CHECK(n >= 0, "copy_positions: a negative count ", n);
  const int64_t T = static_cast<int64_t>(dst.size());
  if (T == 0 || n == 0) return;
  const int64_t H = dst[0].size(1), hd = dst[0].size(3);
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    TORCH_CHECK(d.dim() == 4 && s.dim() == 4 && d.size(1) == H && s.size(1) == H && d.size(3) == hd &&
                    s.size(3) == hd && d.scalar_type() == s.scalar_type() && d.device().is_cpu() &&
                    s.device().is_cpu(),
                "copy_positions takes (B, heads, S, head_dim) CPU caches alike, not ", d.sizes(), " and ", s.sizes());
    TORCH_CHECK(d.stride(3) == 1 && s.stride(3) == 1 && d.stride(2) == hd && s.stride(2) == hd,
                "copy_positions needs each head's positions contiguous");
    TORCH_CHECK(0 <= dst_row && dst_row < d.size(0) && 0 <= src_row && src_row < s.size(0), "row ", dst_row, " / ",
                src_row, " is outside the caches' ", d.size(0), " / ", s.size(0), " rows");
    TORCH_CHECK(n <= d.size(2) && n <= s.size(2), n, " positions do not fit caches of ", d.size(2), " / ",
                s.size(2));
  }
  const int64_t es = dst[0].element_size(), block = n * hd * es;
  at::parallel_for(0, T * H, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const at::Tensor& d = dst[c / H];
      const at::Tensor& s = src[c / H];
      const int64_t h = c % H;
      std::memcpy(static_cast<char*>(d.data_ptr()) + (dst_row * d.stride(0) + h * d.stride(1)) * es,
                  static_cast<const char*>(s.data_ptr()) + (src_row * s.stride(0) + h * s.stride(1)) * es, block);
    }
  });
}

// ---- greedy decoding's argmax ----
//
//   scratchchat::argmax(logits (R, V) float32 or bf16) -> (R, 1) int64: torch.argmax(logits, -1, keepdim=True)
//
// PyTorch's argmax reduces a row element by element (~42 us for SmolLM2's 49152 logits, ~0.5% of a decode step);
// here a vectorized max, then the first index holding it. The same answer as torch.argmax: the first of equal
// maxima, and the first NaN of a row that has one (NaN counts as the largest value).
template <typename T>
int64_t argmax_row(const T* x, int64_t V) {
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, nan = _mm256_setzero_ps();
    for (; i + 16 <= V; i += 16) {
      const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
      m0 = _mm256_max_ps(m0, a);
      m1 = _mm256_max_ps(m1, b);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(nan) == 0) {  // no NaN so far: the max of the vector part, then the tail
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
      float m = *std::max_element(lanes, lanes + 8);
      bool tail_nan = false;
      for (int64_t j = i; j < V; ++j) {
        if (std::isnan(x[j])) tail_nan = true;
        m = std::max(m, x[j]);
      }
      if (!tail_nan) {
        const __m256 mv = _mm256_set1_ps(m);
        int64_t j = 0;
        for (; j + 8 <= V; j += 8) {
          const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), mv, _CMP_EQ_OQ));
          if (hit) return j + __builtin_ctz(hit);
        }
        for (; j < V; ++j)
          if (x[j] == m) return j;
      }
    }
  }
  // bf16 logits, or a float32 row with a NaN: the first NaN, else the first maximum, element by element
  int64_t best = 0;
  float m = widen(x[0]);
  if (std::isnan(m)) return 0;
  for (int64_t i = 1; i < V; ++i) {
    const float v = widen(x[i]);
    if (std::isnan(v)) return i;
    if (v > m) {
      m = v;
      best = i;
    }
  }
  return best;
}

at::Tensor argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "argmax takes (R, V) logits with V > 0, not ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "argmax takes float32 or bfloat16 logits, not ", logits.scalar_type());
  const at::Tensor x = logits.contiguous();
  const int64_t R = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({R, 1}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (x.scalar_type() == at::kFloat)
        o[r] = argmax_row(x.data_ptr<float>() + r * V, V);
      else
        o[r] = argmax_row(x.data_ptr<bf16>() + r * V, V);
    }
  });
  return out;
}

// ---- a low-precision head's top logits recomputed in float32 ----
//
//   scratchchat::refine_top(logits, x, weight, k) -> float32 logits
//
// A bf16 head rounds logits near 25 to steps of 0.125, so greedy decoding can follow a rounding tie; each row's k
// largest logits are recomputed as float32 dot products of the same bf16 inputs (engine.linear.refine_top_logits).
// In PyTorch that was five ops (float, topk, gather, einsum, scatter) and 0.4-0.5 ms of a ~10 ms decode step on the
// Zen5 EPYC; here one pass per row widens the row and keeps its k largest (a small sorted list; on equal values the
// lower index first), then k dots.
template <typename LT>
void refine_top_impl(const LT* logits, const bf16* x, const bf16* w, int64_t R, int64_t V, int64_t D, int64_t k,
                     float* out) {
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> xf(D), val(k);
    std::vector<int64_t> idx(k);
    for (int64_t r = r0; r < r1; ++r) {
      const LT* row = logits + r * V;
      float* o = out + r * V;
      int64_t n = 0;  // entries held, sorted descending
      for (int64_t v = 0; v < V; ++v) {
        const float f = widen(row[v]);
        o[v] = f;
        if (n == k && !(f > val[k - 1])) continue;  // NaN never enters
        if (f != f) continue;
        int64_t i = n < k ? n++ : k - 1;
        while (i > 0 && val[i - 1] < f) {
          val[i] = val[i - 1];
          idx[i] = idx[i - 1];
          --i;
        }
        val[i] = f;
        idx[i] = v;
      }
      for (int64_t d = 0; d < D; ++d) xf[d] = static_cast<float>(x[r * D + d]);
      for (int64_t i = 0; i < n; ++i) o[idx[i]] = dot(xf.data(), w + idx[i] * D, D);
    }
  });
}

at::Tensor refine_top(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& weight, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && x.dim() == 2 && weight.dim() == 2, "logits (R, V), x (R, D), weight (V, D)");
  const int64_t R = logits.size(0), V = logits.size(1), D = x.size(1);
  TORCH_CHECK(x.size(0) == R && weight.size(0) == V && weight.size(1) == D, "logits ", logits.sizes(), ", x ",
              x.sizes(), " and weight ", weight.sizes(), " do not match");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "refine_top takes a bfloat16 head and its bfloat16 input");
  TORCH_CHECK(k >= 1, "k must be at least 1, not ", k);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), lc = logits.contiguous();
  at::Tensor out = at::empty({R, V}, logits.options().dtype(at::kFloat));
  k = std::min(k, V);
  if (lc.scalar_type() == at::kFloat)
    refine_top_impl(lc.data_ptr<float>(), xc.data_ptr<bf16>(), wc.data_ptr<bf16>(), R, V, D, k, out.data_ptr<float>());
  else if (lc.scalar_type() == at::kBFloat16)
    refine_top_impl(lc.data_ptr<bf16>(), xc.data_ptr<bf16>(), wc.data_ptr<bf16>(), R, V, D, k, out.data_ptr<float>());
  else
    TORCH_CHECK(false, "logits must be float32 or bfloat16, not ", lc.scalar_type());
  return out;
}

// One row's sum of squares in eight lanes (then the lanes in a fixed order), the same for every row count: a
// decode step's norm equals its prefill's bit for bit (a scalar chain of D dependent adds cost ~2 us a call, 60
// calls a SmolLM2 step).
template <typename T>
void rms_norm_impl(const float* x, const T* w, float eps, int64_t R, int64_t D, T* y) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      __m256 acc = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {
        const __m256 v = _mm256_loadu_ps(xr + d);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
      }
      float ss = hsum(acc);
      for (; d < D; ++d) ss += xr[d] * xr[d];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
      const __m256 iv = _mm256_set1_ps(inv);
      T* yr = y + r * D;
      for (d = 0; d + 8 <= D; d += 8)  // the loop below, 8 at a time (the same products and rounding)
        store8(yr + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + d), iv), load8(w + d)));
      for (; d < D; ++d) yr[d] = T((xr[d] * inv) * widen(w[d]));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor* slot = nullptr) {
  TORCH_CHECK(x.size(-1) == weight.numel(), "x has ", x.size(-1), " features, the weight ", weight.numel());
  // (the float32 residual stream as it is: `.to()` is a dispatcher round trip even when it returns x)
  const at::Tensor xf = x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t D = weight.numel(), R = xf.numel() / std::max<int64_t>(D, 1);
  at::Tensor y = empty_in(slot, x.sizes(), x.options().dtype(weight.scalar_type()));
  if (wc.scalar_type() == at::kFloat)
    rms_norm_impl(xf.data_ptr<float>(), wc.data_ptr<float>(), static_cast<float>(eps), R, D, y.data_ptr<float>());
  else if (wc.scalar_type() == at::kBFloat16)
    rms_norm_impl(xf.data_ptr<float>(), wc.data_ptr<bf16>(), static_cast<float>(eps), R, D, y.data_ptr<bf16>());
  else
    TORCH_CHECK(false, "rms_norm takes float32 or bfloat16 weights, not ", wc.scalar_type());
  return y;
}

// LayerNorm (biased variance, GPT-2's) of float32 rows: the mean, then the variance of x - mean (two passes), each
// summed 8 lanes at a time as rms_norm_impl; y = (x - mean) * inv * w (+ b), rounded once into T. Decode steps
// (decode_blocks) and the LayerNorm module in inference both run it, so the two agree bit for bit; at::layer_norm
// and a cast cost two dispatcher round trips and two allocations a call (25 calls a GPT-2 step: 1.6% of a float32
// one, paired).
template <typename T>
void layer_norm_impl(const float* x, const T* w, const T* b, float eps, int64_t R, int64_t D, T* y) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      __m256 acc = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xr + d));
      float s = hsum(acc);
      for (; d < D; ++d) s += xr[d];
      const float mean = s / static_cast<float>(D);
      const __m256 m = _mm256_set1_ps(mean);
      acc = _mm256_setzero_ps();
      for (d = 0; d + 8 <= D; d += 8) {
        const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(xr + d), m);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(c, c));
      }
      float ss = hsum(acc);
      for (; d < D; ++d) ss += (xr[d] - mean) * (xr[d] - mean);
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
      const __m256 iv = _mm256_set1_ps(inv);
      T* yr = y + r * D;
      for (d = 0; d + 8 <= D; d += 8) {  // the loops below, 8 at a time (the same operations and rounding)
        const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + d), m), iv), load8(w + d));
        store8(yr + d, b ? _mm256_add_ps(v, load8(b + d)) : v);
      }
      for (; d < D; ++d) {
        const float v = ((xr[d] - mean) * inv) * widen(w[d]);
        yr[d] = T(b ? v + widen(b[d]) : v);
      }
    }
  });
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      double eps, at::Tensor* slot = nullptr) {
  TORCH_CHECK(x.size(-1) == weight.numel(), "x has ", x.size(-1), " features, the weight ", weight.numel());
  if (bias) TORCH_CHECK(bias->numel() == weight.numel() && bias->scalar_type() == weight.scalar_type(),
                        "the bias must match the weight's size and dtype");
  const at::Tensor xf = x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const int64_t D = weight.numel(), R = xf.numel() / std::max<int64_t>(D, 1);
  at::Tensor y = empty_in(slot, x.sizes(), x.options().dtype(weight.scalar_type()));
  if (wc.scalar_type() == at::kFloat)
    layer_norm_impl(xf.data_ptr<float>(), wc.data_ptr<float>(), bias ? bc.data_ptr<float>() : nullptr,
                    static_cast<float>(eps), R, D, y.data_ptr<float>());
  else if (wc.scalar_type() == at::kBFloat16)
    layer_norm_impl(xf.data_ptr<float>(), wc.data_ptr<bf16>(), bias ? bc.data_ptr<bf16>() : nullptr,
                    static_cast<float>(eps), R, D, y.data_ptr<bf16>());
  else
    TORCH_CHECK(false, "layer_norm takes float32 or bfloat16 weights, not ", wc.scalar_type());
  return y;
}

template <typename T>
void silu_mul_impl(const T* in, int64_t R, int64_t F, T* out) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = in + r * 2 * F;
      const T* u = g + F;
      T* o = out + r * F;
      int64_t i = 0;
      for (; i + 8 <= F; i += 8) {  // silu(x) = x / (1 + exp(-x)), as PyTorch's kernel computes it
        const __m256 x = load8(g + i);
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        store8(o + i, _mm256_mul_ps(round_to(silu, o), load8(u + i)));  // the loop below's roundings, 8 at a time
      }
      for (; i < F; ++i) {
        const float x = widen(g[i]);
        o[i] = T(widen(T(x / (1.0f + exp1(-x)))) * widen(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up, at::Tensor* slot = nullptr) {
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "gate_up must hold gate and up halves");
  const at::Tensor in = gate_up.contiguous();
  const int64_t F = in.size(-1) / 2, R = in.numel() / std::max<int64_t>(2 * F, 1);
  std::vector<int64_t> shape(in.sizes().begin(), in.sizes().end());
  shape.back() = F;
  at::Tensor y = empty_in(slot, shape, in.options());
  if (in.scalar_type() == at::kFloat)
    silu_mul_impl(in.data_ptr<float>(), R, F, y.data_ptr<float>());
  else if (in.scalar_type() == at::kBFloat16)
    silu_mul_impl(in.data_ptr<bf16>(), R, F, y.data_ptr<bf16>());
  else
    TORCH_CHECK(false, "silu_mul takes float32 or bfloat16, not ", in.scalar_type());
  return y;
}

// GPT-2's GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed as the equal
// x / (1 + exp(-2 sqrt(2/pi) (x + 0.044715 x^3))) (1 + tanh(u) = 2 / (1 + exp(-2u)): no cancellation where tanh(u)
// nears -1), float32 math, in x's dtype. One op instead of at::gelu's dispatch and allocation, 12 a GPT-2 step.
template <typename T>
void gelu_tanh_impl(const T* in, int64_t n, T* out) {
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    const __m256 kappa = _mm256_set1_ps(0.044715f), beta = _mm256_set1_ps(-1.5957691216057308f);  // -2 sqrt(2/pi)
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      const __m256 x = load8(in + i);
      const __m256 inner = _mm256_add_ps(x, _mm256_mul_ps(kappa, _mm256_mul_ps(_mm256_mul_ps(x, x), x)));
      store8(out + i, _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_mul_ps(beta, inner)))));
    }
    for (; i < i1; ++i) {
      const float x = widen(in[i]);
      out[i] = T(x / (1.0f + exp1(-1.5957691216057308f * (x + 0.044715f * (x * x * x)))));
    }
  });
}

at::Tensor gelu_tanh(const at::Tensor& x, at::Tensor* slot = nullptr) {
  const at::Tensor in = x.contiguous();
  at::Tensor y = empty_in(slot, in.sizes(), in.options());
  if (in.scalar_type() == at::kFloat)
    gelu_tanh_impl(in.data_ptr<float>(), in.numel(), y.data_ptr<float>());
  else if (in.scalar_type() == at::kBFloat16)
    gelu_tanh_impl(in.data_ptr<bf16>(), in.numel(), y.data_ptr<bf16>());
  else
    TORCH_CHECK(false, "gelu_tanh takes float32 or bfloat16, not ", in.scalar_type());
  return y;
}

// ---- per-request LoRA deltas of a decode step ----
//
//   scratchchat::lora(x, y, a[], b[], pieces, coef, residual?) -> y + delta  (or residual + (y + delta))
//
// A batch mixes adapters: row i adds sum_j coef[i, j] * B_j A_j x_i over the contributions j it uses (an adapter,
// or a merged one subtracted). Contribution j's weights stay where its adapter keeps them, in two flat float32 (or,
// for a bf16 base, bf16) buffers a[j] and b[j] (no copy per batch composition, as Punica's and S-LoRA's kernels
// read each adapter in place),
// packed for these loops by engine.lora.pack_decode_piece: each piece's A as (ceil(r / 8), in, 8) (chunk c, input k,
// lane l = A[8c + l, k]; bf16 buffers hold input pairs, (ceil(r / 8), ceil(in / 2), 8, 2), the layout of vdpbf16ps
// and of one 32-bit lane per rank and pair) and its scaled B as panels (ceil(n / 8), ceil8(r), 8) (panel q, rank k,
// lane l = B[8q + l, k]), zeros past r and n, so both steps read each piece as one contiguous stream in broadcast
// form (no horizontal sums): a first version read A (r, in) and B^T (r, n) row-major, 8 rows of A and 16 strided
// 256-byte runs of B^T at a time, and streamed SmolLM2's three rank-16 adapters at ~13 GB/s on the Zen5 EPYC.
// ``pieces`` (P, 6) int64 lists every (projection, contribution) low-rank piece of one fused output: [offset of its
// packed A in a[j], rank, output offset, output size, offset of its B panels in b[j], j]. Each row computes only its
// own pieces (no block-diagonal zeros, no masked-out rows): t = coef * A x, then delta = B t, summed in float32 and
// added to y once (rounded into y's dtype, as the module path adds the float32 product). Any range of the outputs
// can be done on its own (LoraDelta): inside decode_blocks each product's threads add the delta to the outputs they
// have just computed (the product's tail), and the op alone is one parallel region over blocks of outputs.

inline int64_t ceil8(int64_t v) { return (v + 7) / 8 * 8; }

// the 8 lanes of sum over k of x[k] * ac[8k .. 8k + 8): four accumulators (the FMA latency), summed at the end
template <typename WT>
inline __m256 chunk_dot(const float* x, const WT* ac, int64_t K) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    s0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), load8(ac + 8 * k), s0);
    s1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), load8(ac + 8 * k + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), load8(ac + 8 * k + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), load8(ac + 8 * k + 24), s3);
  }
  for (; k < K; ++k) s0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), load8(ac + 8 * k), s0);
  return _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
}

// A's values per 8-rank chunk: K per rank, or for bf16 buffers K rounded up to pairs
template <typename WT>
inline int64_t chunk_inputs(int64_t K) {
  return std::is_same_v<WT, bf16> ? (K + 1) / 2 * 2 : K;
}

// chunk_dot on the pairs layout with float32 x: a 32-bit lane holds a rank's two weights (k, k + 1), widened by a
// shift and a mask
inline __m256 chunk_dot_pairs(const float* x, const bf16* ac, int64_t K) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  const int64_t K2 = K / 2;
  int64_t kk = 0;
  for (; kk + 2 <= K2; kk += 2) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16 * kk));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16 * kk + 16));
    s0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * kk), _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), s0);
    s1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * kk + 1), _mm256_castsi256_ps(_mm256_and_si256(w0, hi)), s1);
    s2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * kk + 2), _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), s2);
    s3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * kk + 3), _mm256_castsi256_ps(_mm256_and_si256(w1, hi)), s3);
  }
  for (; kk < K2; ++kk) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16 * kk));
    s0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * kk), _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), s0);
    s1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 2 * kk + 1), _mm256_castsi256_ps(_mm256_and_si256(w, hi)), s1);
  }
  if (K % 2) {  // the last input's partner is the packing's zero
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16 * K2));
    s0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + K - 1), _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), s0);
  }
  return _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
}

// the same for G rows of bf16 x (R, K) by vdpbf16ps: both products of a pair in one instruction (exact,
// float32 sums), each A pair loaded once for the G rows, each row's sums in the same order whatever G
template <int G>
SCRATCHCHAT_AVX512 void chunk_dot_dp_rows(const bf16* x, int64_t K, const bf16* ac, __m256* out) {
  __m256 s[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) s[g][j] = _mm256_setzero_ps();
  auto pair = [&](int g, int64_t kk) {
    int32_t v;
    std::memcpy(&v, x + g * K + 2 * kk, 4);
    return v;
  };
  const int64_t K2 = K / 2;
  int64_t kk = 0;
  for (; kk + 4 <= K2; kk += 4)
    for (int j = 0; j < 4; ++j) {
      const __m256bh w = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16 * (kk + j)));
      for (int g = 0; g < G; ++g) s[g][j] = _mm256_dpbf16_ps(s[g][j], w, (__m256bh)_mm256_set1_epi32(pair(g, kk + j)));
    }
  for (; kk < K2; ++kk) {
    const __m256bh w = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16 * kk));
    for (int g = 0; g < G; ++g) s[g][0] = _mm256_dpbf16_ps(s[g][0], w, (__m256bh)_mm256_set1_epi32(pair(g, kk)));
  }
  if (K % 2) {  // the last input paired with a zero
    const __m256bh w = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16 * K2));
    for (int g = 0; g < G; ++g) {
      uint16_t last;
      std::memcpy(&last, x + g * K + K - 1, 2);
      s[g][0] = _mm256_dpbf16_ps(s[g][0], w, (__m256bh)_mm256_set1_epi32(last));
    }
  }
  for (int g = 0; g < G; ++g) out[g] = _mm256_add_ps(_mm256_add_ps(s[g][0], s[g][1]), _mm256_add_ps(s[g][2], s[g][3]));
}

// the 8 outputs of one B panel for G rows' t (stride ldt): sum over the rp ranks of t[k] * panel[8k .. 8k + 8),
// each panel row loaded once for the G rows, each row's sums in the same order whatever G
template <int G, typename WT>
inline void panel_deltas(const float* t, int64_t ldt, const WT* panel, int64_t rp, __m256* out) {
  __m256 s0[G], s1[G];
  for (int g = 0; g < G; ++g) s0[g] = s1[g] = _mm256_setzero_ps();
  for (int64_t k = 0; k < rp; k += 2) {
    const __m256 w0 = load8(panel + 8 * k), w1 = load8(panel + 8 * k + 8);
    for (int g = 0; g < G; ++g) {
      s0[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(t + g * ldt + k), w0, s0[g]);
      s1[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(t + g * ldt + k + 1), w1, s1[g]);
    }
  }
  for (int g = 0; g < G; ++g) out[g] = _mm256_add_ps(s0[g], s1[g]);
}

constexpr int64_t LORA_GROUP = 4;  // rows with one adapter computed together
constexpr int64_t LORA_TASK = 32 << 10;  // multiply-adds per task of the standalone op
constexpr int64_t LORA_BLK = 64;         // outputs whose delta is summed at once
constexpr int64_t LORA_ROWS_BY_BLOCKS = 8;  // up to this many rows the standalone op shares out blocks of outputs

// A batch's LoRA deltas for any range [n0, n1) of a (fused) output's features: each row's t = coef * A x for the
// pieces it uses that touch the range, then d = sum of B t 64 outputs at a time, then out = (y + d, rounded into
// YT) [+ residual]. Every thread that covers part of a piece computes that piece's t itself (identical values; at
// rank 16 a few thousand to 25 K multiply-adds a row, against a fork and join per product for a separate pass).
// y is the (R, N) YT tensor, or (``yf``) a product's float32 output, first rounded into YT as the product would
// have returned it.
template <typename WT, typename YT>
struct LoraDelta {
  const float* x;  // (R, K) float32, or null when xb is set
  const bf16* xb;  // x as it came, bf16, with bf16 adapters on a CPU with AVX512-BF16 (A x by vdpbf16ps), else null
  const std::vector<const WT*>& a;
  const std::vector<const WT*>& b;
  const int64_t* pc;
  int64_t P;
  const float* coef;
  int64_t C, R, K, N;
  const YT* y;
  const float* residual;
  void* out;

  void operator()(int64_t n0, int64_t n1, const float* yf = nullptr) const { rows(0, R, n0, n1, yf); }

  // rows [r0, r1) only (a prompt's many rows: each row's t once, for all of its outputs)
  void rows(int64_t r0, int64_t r1, int64_t n0, int64_t n1, const float* yf = nullptr) const {
    std::vector<int64_t> rank_at(P);  // piece p's (padded) ranks sit at [rank_at[p], + ceil8(rank)) of t
    int64_t Rt = 0;
    for (int64_t p = 0; p < P; ++p) rank_at[p] = std::exchange(Rt, Rt + ceil8(pc[p * 6 + 1]));
    std::vector<float> t(LORA_GROUP * Rt);
    auto same = [&](int64_t i, int64_t j) { return std::equal(coef + i * C, coef + i * C + C, coef + j * C); };
    for (int64_t i = r0; i < r1;) {  // four rows with one adapter (a prompt's tokens) at a time, else one
      bool four = i + LORA_GROUP <= r1;
      for (int64_t g = 1; four && g < LORA_GROUP; ++g) four = same(i, i + g);
      if (four) {
        group<LORA_GROUP>(i, n0, n1, yf, rank_at, Rt, t.data());
        i += LORA_GROUP;
      } else {
        group<1>(i, n0, n1, yf, rank_at, Rt, t.data());
        i += 1;
      }
    }
  }

  // rows [i, i + G) with the same coefficients: each weight vector loaded once for the G rows, every row's sums in
  // the order one row alone makes them (the result does not depend on the grouping)
  template <int G>
  void group(int64_t i, int64_t n0, int64_t n1, const float* yf, const std::vector<int64_t>& rank_at, int64_t Rt,
             float* t) const {
    auto touches = [&](const int64_t* pe, int64_t lo, int64_t hi) {
      return coef[i * C + pe[5]] != 0.f && std::max(lo, pe[2]) < std::min(hi, pe[2] + pe[3]);
    };
    for (int64_t p = 0; p < P; ++p) {  // 1. t for the pieces of these rows that reach into [n0, n1)
      const int64_t* pe = pc + p * 6;
      if (!touches(pe, n0, n1)) continue;
      const __m256 c = _mm256_set1_ps(coef[i * C + pe[5]]);
      for (int64_t q = 0; q < ceil8(pe[1]) / 8; ++q) {
        const WT* ac = a[pe[5]] + pe[0] + q * 8 * chunk_inputs<WT>(K);
        __m256 v[G];
        if constexpr (std::is_same_v<WT, bf16>) {
          if (xb) chunk_dot_dp_rows<G>(xb + i * K, K, ac, v);
          else for (int g = 0; g < G; ++g) v[g] = chunk_dot_pairs(x + (i + g) * K, ac, K);
        } else {
          for (int g = 0; g < G; ++g) v[g] = chunk_dot(x + (i + g) * K, ac, K);
        }
        for (int g = 0; g < G; ++g) _mm256_storeu_ps(t + g * Rt + rank_at[p] + 8 * q, _mm256_mul_ps(c, v[g]));
      }
    }
    for (int64_t c0 = n0; c0 < n1; c0 += LORA_BLK) {  // 2. delta = sum over the pieces of B t; out = y + delta
      alignas(32) float d[G][LORA_BLK];
      alignas(32) float lanes[8];
      const int64_t c1 = std::min(n1, c0 + LORA_BLK);
      std::fill(&d[0][0], &d[0][0] + G * LORA_BLK, 0.f);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t* pe = pc + p * 6;
        if (!touches(pe, c0, c1)) continue;
        const int64_t out0 = pe[2], n = pe[3], rp = ceil8(pe[1]);
        const int64_t lo = std::max(c0, out0), hi = std::min(c1, out0 + n);
        const WT* bp = b[pe[5]] + pe[4];
        for (int64_t pq = (lo - out0) / 8; pq * 8 + out0 < hi; ++pq) {  // the piece's panels over [lo, hi)
          __m256 v[G];
          panel_deltas<G>(t + rank_at[p], Rt, bp + pq * rp * 8, rp, v);
          const int64_t g0 = out0 + pq * 8;  // the panel's first output
          for (int g = 0; g < G; ++g) {
            if (g0 >= lo && g0 + 8 <= hi) {  // all 8 lanes in this block and in the piece
              _mm256_storeu_ps(d[g] + g0 - c0, _mm256_add_ps(_mm256_loadu_ps(d[g] + g0 - c0), v[g]));
            } else {
              _mm256_storeu_ps(lanes, v[g]);
              for (int64_t l = 0; l < 8; ++l)
                if (g0 + l >= lo && g0 + l < hi) d[g][g0 + l - c0] += lanes[l];
            }
          }
        }
      }
      for (int g = 0; g < G; ++g) write(i + g, c0, c1, d[g], yf);
    }
  }

  // y's values (as YT) at row i, outputs [n, n + 8)
  __m256 y8(int64_t i, int64_t n, const float* yf) const {
    if (!yf) return load8(y + i * N + n);
    const __m256 v = _mm256_loadu_ps(yf + i * N + n);
    if constexpr (std::is_same_v<YT, bf16>) return widen_bf16x8(round_bf16x8(v));
    return v;
  }
  float y1(int64_t i, int64_t n, const float* yf) const { return yf ? widen(YT(yf[i * N + n])) : widen(y[i * N + n]); }

  void write(int64_t i, int64_t c0, int64_t c1, const float* d, const float* yf) const {
    int64_t n = c0;
    for (; n + 8 <= c1; n += 8) {  // the scalar loop below, 8 at a time (the same float sums and roundings)
      const __m256 v = _mm256_add_ps(y8(i, n, yf), _mm256_loadu_ps(d + n - c0));
      if constexpr (std::is_same_v<YT, bf16>) {
        const __m128i h = round_bf16x8(v);
        if (residual)
          _mm256_storeu_ps(static_cast<float*>(out) + i * N + n,
                           _mm256_add_ps(_mm256_loadu_ps(residual + i * N + n), widen_bf16x8(h)));
        else
          _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<YT*>(out) + i * N + n), h);
      } else if (residual) {
        _mm256_storeu_ps(static_cast<float*>(out) + i * N + n, _mm256_add_ps(_mm256_loadu_ps(residual + i * N + n), v));
      } else {
        _mm256_storeu_ps(reinterpret_cast<float*>(static_cast<YT*>(out) + i * N + n), v);
      }
    }
    for (; n < c1; ++n) {
      const YT v = YT(y1(i, n, yf) + d[n - c0]);
      if (residual)
        static_cast<float*>(out)[i * N + n] = residual[i * N + n] + widen(v);
      else
        static_cast<YT*>(out)[i * N + n] = v;
    }
  }
};

// The op's checks (shared with the fused form in decode_blocks); returns the pieces' total padded rank
int64_t check_lora(int64_t R, int64_t K, int64_t N, const std::vector<at::Tensor>& a,
                   const std::vector<at::Tensor>& b, const at::Tensor& pieces, const at::Tensor& coef) {
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(0) == R,
              "coef must be float32 (R, contributions)");
  const int64_t C = coef.size(1);
  TORCH_CHECK(static_cast<int64_t>(a.size()) == C && static_cast<int64_t>(b.size()) == C, "coef has ", C,
              " contributions but there are ", a.size(), " a and ", b.size(), " b buffers");
  const at::ScalarType wt = C ? a[0].scalar_type() : at::kFloat;
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "LoRA weights must be float32 or bfloat16 buffers");
  for (int64_t j = 0; j < C; ++j)
    TORCH_CHECK(a[j].scalar_type() == wt && b[j].scalar_type() == wt && a[j].is_contiguous() && b[j].is_contiguous(),
                "LoRA weights must be contiguous buffers of one dtype (float32 or bfloat16)");
  TORCH_CHECK(pieces.scalar_type() == at::kLong && pieces.dim() == 2 && pieces.size(1) == 6 && pieces.is_contiguous(),
              "pieces must be a contiguous (P, 6) int64 tensor");
  const int64_t* pc = pieces.data_ptr<int64_t>();
  int64_t Rt = 0;
  for (int64_t p = 0; p < pieces.size(0); ++p) {
    const int64_t* pe = pc + p * 6;
    TORCH_CHECK(pe[5] >= 0 && pe[5] < C, "piece ", p, " names contribution ", pe[5], " of ", C);
    const int64_t per_rank = wt == at::kBFloat16 ? chunk_inputs<bf16>(K) : K;
    TORCH_CHECK(pe[0] >= 0 && pe[1] >= 0 && pe[0] + ceil8(pe[1]) * per_rank <= a[pe[5]].numel(), "piece ", p,
                " reaches past a[", pe[5], "]'s ", a[pe[5]].numel(), " values");
    TORCH_CHECK(pe[2] >= 0 && pe[3] >= 0 && pe[2] + pe[3] <= N, "piece ", p, " reaches past y's ", N, " outputs");
    TORCH_CHECK(pe[4] >= 0 && pe[4] + ceil8(pe[1]) * ceil8(pe[3]) <= b[pe[5]].numel(), "piece ", p,
                " reaches past b[", pe[5], "]'s ", b[pe[5]].numel(), " values");
    Rt += ceil8(pe[1]);
  }
  return Rt;
}

// The output of y + delta: float32 with a residual (the residual stream), else y's dtype
at::Tensor lora_output(int64_t R, int64_t N, at::ScalarType y_dtype, const std::optional<at::Tensor>& residual,
                       at::Tensor& res, at::Tensor* slot = nullptr) {
  if (!residual) return empty_in(slot, {R, N}, at::TensorOptions().dtype(y_dtype));
  TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->dim() == 2 && residual->size(0) == R &&
                  residual->size(1) == N,
              "the residual must be float32 and shaped like y");
  res = residual->contiguous();
  return empty_in(slot, {R, N}, at::TensorOptions().dtype(at::kFloat));
}

// f(LoraDelta<WT, YT>&) for the dtypes of the adapters' buffers and of y
template <typename F>
void with_lora_delta(const at::Tensor& x, const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                     const at::Tensor& pieces, const at::Tensor& coef, int64_t N, at::ScalarType y_dtype,
                     const void* y, const at::Tensor& res, at::Tensor& out, F&& f) {
  const int64_t C = coef.size(1);
  const bool wb = C && a[0].scalar_type() == at::kBFloat16, yb = y_dtype == at::kBFloat16;
  // x (contiguous): bf16 with bf16 adapters on an AVX512-BF16 CPU as it is, else as float32
  const bool dp = wb && x.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16();
  const at::Tensor xf = dp ? at::Tensor() : as_float(x);
  auto typed = [&](auto* wtag, auto* ytag) {
    using WT = std::remove_pointer_t<decltype(wtag)>;
    using YT = std::remove_pointer_t<decltype(ytag)>;
    std::vector<const WT*> ap(C), bp(C);
    for (int64_t j = 0; j < C; ++j) {
      ap[j] = a[j].data_ptr<WT>();
      bp[j] = b[j].data_ptr<WT>();
    }
    LoraDelta<WT, YT> ld{dp ? nullptr : xf.data_ptr<float>(), dp ? x.data_ptr<bf16>() : nullptr, ap, bp,
                         pieces.data_ptr<int64_t>(), pieces.size(0), coef.data_ptr<float>(), C, x.size(0), x.size(1),
                         N, static_cast<const YT*>(y), res.defined() ? res.data_ptr<float>() : nullptr, out.data_ptr()};
    f(ld);
  };
  if (wb && yb) typed(static_cast<bf16*>(nullptr), static_cast<bf16*>(nullptr));
  else if (wb) typed(static_cast<bf16*>(nullptr), static_cast<float*>(nullptr));
  else if (yb) typed(static_cast<float*>(nullptr), static_cast<bf16*>(nullptr));
  else typed(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
}

at::Tensor lora(const at::Tensor& x, const at::Tensor& y, const std::vector<at::Tensor>& a,
                const std::vector<at::Tensor>& b, const at::Tensor& pieces, const at::Tensor& coef,
                const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x (R, in) and y (R, out) must share R");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, "y must be float32 or bfloat16");
  const int64_t R = x.size(0), K = x.size(1), N = y.size(1);
  const at::Tensor pcc = pieces.contiguous(), cc = coef.contiguous();
  const int64_t Rt = check_lora(R, K, N, a, b, pcc, cc);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  at::Tensor res;
  at::Tensor out = lora_output(R, N, y.scalar_type(), residual, res);
  // one parallel region over blocks of outputs, each task computing the t it needs (a call reads 0.1-0.8 MB of
  // adapter weights; a decode step makes ~120 of them when it runs the Python layer loop); a prompt's rows (more
  // than a decode batch) are shared out instead, each row's t computed once
  const int64_t blocks = (N + LORA_BLK - 1) / LORA_BLK;
  const int64_t grain = std::max<int64_t>(1, LORA_TASK / std::max<int64_t>(1, LORA_BLK * Rt * R));
  with_lora_delta(xc, a, b, pcc, cc, N, y.scalar_type(), yc.data_ptr(), res, out, [&](const auto& ld) {
    if (R > LORA_ROWS_BY_BLOCKS)
      at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) { ld.rows(r0, r1, 0, N); });
    else
      at::parallel_for(0, blocks, grain, [&](int64_t q0, int64_t q1) {
        ld(q0 * LORA_BLK, std::min(N, q1 * LORA_BLK));
      });
  });
  return out;
}

// ---- a whole decode step through every block, one call ----
//
//   scratchchat::decode_blocks(x, tensors, meta, k_caches, v_caches, positions, cos?, sin?, coef?, eps) -> x
//
// engine/decode.py's layer loop in C++ (the same functions in the same order, so the result is bit for bit what that
// loop computes): at batch 1 the ~8 Python-side op calls per layer cost ~2 ms of a ~20 ms step. Per layer,
// LAYER_SLOTS tensors and LAYER_META ints (see engine/decode.py's DecodeRunner._fused for the layout): two norms
// (RMSNorm weight, or LayerNorm float32 weight + bias with the output dtype in meta), four products (each our
// row-form kernel on a float32/bf16 weight, our panel kernel, our int8 kernel, our bf16 dot-product panels, or our
// int8 VNNI panels; optional bias and scale), the
// MLP kind, and, with ``coef`` (a batch's per-row LoRA coefficients), each product's low-rank pieces for the lora op.

constexpr int64_t LAYER_SLOTS = 32, LAYER_META = 12;
enum Kind : int64_t { ROWS = 0, PANEL = 1, INT8 = 2, DPBF16 = 3, DPI8 = 4 };

at::Tensor product(const std::vector<std::optional<at::Tensor>>& t, int64_t slot, int64_t kind, int64_t n,
                   const at::Tensor& x, const std::optional<at::Tensor>& residual, const Tail* tail,
                   const Reuse& reuse) {
  const at::Tensor& w = *t[slot];
  if (kind == PANEL) return linear_panel(x, w, n, t[slot + 2], t[slot + 1], residual, tail, &reuse);
  if (kind == INT8) return linear_i8(x, w, *t[slot + 2], t[slot + 1], residual, tail, &reuse);
  if (kind == DPBF16) return linear_dpbf16(x, w, n, t[slot + 1], residual, tail, &reuse);
  if (kind == DPI8) return linear_dpi8(x, w, n, *t[slot + 2], t[slot + 1], residual, tail, &reuse);
  return linear(x, w, t[slot + 1], residual, tail, &reuse);
}

// A batch's LoRA: each row's coefficients and each contribution's flat A and B buffers (see lora above)
struct Lora {
  const std::optional<at::Tensor>& coef;
  const std::vector<at::Tensor>& a;
  const std::vector<at::Tensor>& b;
};

// [residual +] the product of x plus the batch's LoRA delta of the pieces table in slot ``lora_slot`` (if any), as
// the Python loop computes it (the product rounded into x's dtype, the delta added and rounded again, then the
// residual add). The delta is the product's tail: each thread adds it to the outputs it has just computed, in the
// product's parallel region (a separate op cost two forks and a pass over y per projection, ~120 a SmolLM2 step).
at::Tensor projection(const std::vector<std::optional<at::Tensor>>& t, int64_t slot, int64_t lora_slot, int64_t kind,
                      int64_t n, const Lora& ad, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      const Reuse& reuse) {
  if (!ad.coef || !t[lora_slot]) return product(t, slot, kind, n, x, residual, nullptr, reuse);
  const at::Tensor& pieces = *t[lora_slot];
  const int64_t R = x.size(0), K = x.size(1);
  const at::Tensor cc = ad.coef->contiguous();
  check_lora(R, K, n, ad.a, ad.b, pieces, cc);
  const at::Tensor xc = x.contiguous();
  at::Tensor res;
  at::Tensor out = lora_output(R, n, x.scalar_type(), residual, res, reuse.result);
  with_lora_delta(xc, ad.a, ad.b, pieces, cc, n, x.scalar_type(), nullptr, res, out, [&](const auto& ld) {
    const Tail tail = [&](const float* y, int64_t n0, int64_t n1) { ld(n0, n1, y); };
    product(t, slot, kind, n, x, std::nullopt, &tail, reuse);  // (y in the scratch slot: the tail reads it)
  });
  return out;
}

at::Tensor norm(const std::vector<std::optional<at::Tensor>>& t, int64_t slot, int64_t kind, double eps,
                const at::Tensor& x, at::Tensor* reuse) {
  if (kind == 0) return rms_norm(x, *t[slot], eps, reuse);
  return layer_norm(x, *t[slot], t[slot + 1], eps, reuse);  // kinds 1 and 2: the weights' dtype
}

at::Tensor decode_blocks(const at::Tensor& x0, const std::vector<std::optional<at::Tensor>>& t,
                         const std::vector<int64_t>& meta, const std::vector<at::Tensor>& kcs,
                         const std::vector<at::Tensor>& vcs, const at::Tensor& positions,
                         const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                         const std::optional<at::Tensor>& coef, const std::vector<at::Tensor>& lora_a,
                         const std::vector<at::Tensor>& lora_b, double eps) {
  const Lora ad{coef, lora_a, lora_b};
  const int64_t L = static_cast<int64_t>(kcs.size());
  TORCH_CHECK(static_cast<int64_t>(t.size()) == L * LAYER_SLOTS && static_cast<int64_t>(meta.size()) == L * LAYER_META &&
                  static_cast<int64_t>(vcs.size()) == L,
              "decode_blocks: ", L, " layers need ", L * LAYER_SLOTS, " tensors and ", L * LAYER_META, " meta ints");
  TORCH_CHECK(x0.scalar_type() == at::kFloat && x0.dim() == 2, "x must be the (B, D) float32 residual stream");
  at::Tensor x = x0;
  // each layer's intermediates in the tensors of the layer before (see Reuse); the last down projection's output,
  // returned, is a tensor of this call's
  at::Tensor h1, qkv, qkv_f, att, xo, xo_f, h2, up, up_f, act, xd, xd_f;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t* m = meta.data() + i * LAYER_META;
    const int64_t b = i * LAYER_SLOTS;
    // meta: heads, norm kind (0 RMS, 1 LayerNorm -> float32, 2 LayerNorm -> bf16), swiglu, then (kind, n) for
    // qkv, o, up, down; slots: norm1 (2), qkv (3), o (3), norm2 (2), up (3), down (3), then the LoRA pieces tables
    // of qkv, o, up, down (4), 12 spare
    at::Tensor h = norm(t, b + 0, m[1], eps, x, &h1);
    at::Tensor q = projection(t, b + 2, b + 16, m[3], m[4], ad, h, std::nullopt, {&qkv, &qkv_f});
    at::Tensor y = decode_attention(q, kcs[i], vcs[i], positions, cos, sin, m[0], &att);
    x = projection(t, b + 5, b + 17, m[5], m[6], ad, y, x, {&xo, &xo_f});
    h = norm(t, b + 8, m[1], eps, x, &h2);
    at::Tensor u = projection(t, b + 10, b + 18, m[7], m[8], ad, h, std::nullopt, {&up, &up_f});
    at::Tensor a = m[2] ? silu_mul(u, &act) : gelu_tanh(u, &act);
    x = projection(t, b + 13, b + 19, m[9], m[10], ad, a, x, {&xd, &xd_f});
  }
  return x;
}

// ---- a whole decode step, embedding to logits, one call ----
//
//   scratchchat::decode_step(idx, emb, tensors, meta, k_caches, v_caches, positions, cos?, sin?, coef?, lora_a,
//                            lora_b, eps, head, head_meta) -> logits
//
// What GPT.forward does around decode_blocks at a decode step, with the same functions in the same order (bit for
// bit its result): the token embedding (emb[0]) widened to float32 plus, for GPT-2, each row's learned position
// embedding (emb[1], at ``positions``), every block, then the final norm (head[0..1], kind head_meta[0], eps as the
// blocks'), the head's product (head[2..4]: weight or panels, bias, scale; kind and n in head_meta[1..2]) and, with
// head_meta[3] = k > 0, its k largest logits recomputed in float32 from head[5], the bf16 weight (refine_top). The
// ~15 Python-side calls and module lookups this replaces cost ~0.3 ms of a ~7 ms GPT-2 step, run cold after the
// step's weights have gone through the caches.
at::Tensor decode_step(const at::Tensor& idx, const std::vector<std::optional<at::Tensor>>& emb,
                       const std::vector<std::optional<at::Tensor>>& t, const std::vector<int64_t>& meta,
                       const std::vector<at::Tensor>& kcs, const std::vector<at::Tensor>& vcs,
                       const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                       const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& coef,
                       const std::vector<at::Tensor>& lora_a, const std::vector<at::Tensor>& lora_b, double eps,
                       const std::vector<std::optional<at::Tensor>>& head, const std::vector<int64_t>& head_meta) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "idx must be the (B,) int64 tokens of the step");
  TORCH_CHECK(emb.size() == 2 && emb[0], "emb is [token embedding, position embedding or None]");
  TORCH_CHECK(head.size() == 6 && head_meta.size() == 4 && head[0] && head[2],
              "head is [norm weight, norm bias, weight or panels, bias, scale, refine weight] and head_meta "
              "[norm kind, product kind, n, refine k]");
  at::Tensor x = at::embedding(*emb[0], idx).to(at::kFloat);
  if (emb[1]) x = x + emb[1]->index_select(0, positions);
  x = decode_blocks(x, t, meta, kcs, vcs, positions, cos, sin, coef, lora_a, lora_b, eps);
  const at::Tensor h = norm(head, 0, head_meta[0], eps, x, nullptr);
  at::Tensor logits = product(head, 2, head_meta[1], head_meta[2], h, std::nullopt, nullptr, Reuse{});
  if (head_meta[3] > 0) {
    TORCH_CHECK(head[5], "a refined head needs its bf16 weight in head[5]");
    logits = refine_top(logits, h, *head[5], head_meta[3]);
  }
  return logits;
}

// ---- a decode step's streaming ceiling (engine.bench) ----
//
//   scratchchat::read_pieces(buf, sizes) -> float: the float32 sum of buf's first sum(sizes) bytes, read piece by
//   piece in the order given, each piece split evenly over the intra-op threads in one parallel region (its end a
//   barrier), no other arithmetic
//
// A decode step reads its weights the same way, one product at a time, each product waiting for the one before. The
// time this takes for a step's product sizes is the most any kernel with that structure can get from this memory:
// the bench prints it next to the roofline (one sum over everything) and our decode.
double read_pieces(const at::Tensor& buf, const std::vector<int64_t>& sizes) {
  TORCH_CHECK(buf.is_contiguous() && buf.scalar_type() == at::kByte, "read_pieces takes a contiguous uint8 buffer");
  int64_t total = 0;
  for (const int64_t n : sizes) {
    TORCH_CHECK(n >= 0 && n % 128 == 0, "piece sizes must be multiples of 128 bytes, not ", n);
    total += n;
  }
  TORCH_CHECK(total <= buf.numel(), "the pieces need ", total, " bytes, the buffer holds ", buf.numel());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(buf.data_ptr()) % 32 == 0, "the buffer must be 32-byte aligned");
  const float* p = reinterpret_cast<const float*>(buf.data_ptr<uint8_t>());
  const int64_t threads = at::get_num_threads();
  double sum = 0.0;
  std::vector<float> part(threads);
  for (const int64_t n : sizes) {
    const int64_t floats = n / 4, share = (floats / threads + 31) / 32 * 32;  // 128-byte slices
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t a = std::min(floats, t * share), b = std::min(floats, a + share);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t i = a; i < b; i += 32)
          for (int j = 0; j < 4; ++j) acc[j] = _mm256_add_ps(acc[j], _mm256_load_ps(p + i + 8 * j));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        part[t] = std::accumulate(lanes, lanes + 8, 0.0f);
      }
    });
    for (const float x : part) sum += x;
    std::fill(part.begin(), part.end(), 0.0f);
    p += floats;
  }
  return sum;
}

// ---- the tensors a resolved decode step reads, watched for changes ----
//
//   torch.classes.scratchchat.Watch(tensors).unchanged() -> bool: every tensor at the data pointer and version it had
//   when the Watch was made
//
// engine/decode.py checks before every step that the weights it resolved once are still what the model holds (a
// merge, a load_state_dict or model.to(...) must never leave it running stale). Asking each of SmolLM2's 270
// parameters for its data pointer and version from Python cost ~0.45 ms of a ~12 ms step in the serving thread
// (the objects are cold after the step's 270 MB of weights went through the caches); here it is one pass over the
// TensorImpls, with plain loads whose misses overlap (a first version held the tensors weakly, and the atomic
// reference-count update of each lock() serialized them: ~0.3 ms). It holds them, as the step's kernels hold their
// weights: a parameter replaced since is released when the step is rebuilt.
struct Watch : torch::CustomClassHolder {
  std::vector<at::Tensor> tensors;
  std::vector<std::pair<const void*, uint32_t>> seen;  // (data pointer, version) when made

  static std::pair<const void*, uint32_t> state(const at::Tensor& t) {
    const c10::TensorImpl* p = t.unsafeGetTensorImpl();
    return {p->data(), p->version_counter().current_version()};
  }

  explicit Watch(std::vector<at::Tensor> ts) : tensors(std::move(ts)) {
    for (const at::Tensor& t : tensors) seen.push_back(state(t));
  }

  bool unchanged() const {
    bool same = true;
    for (size_t i = 0; i < tensors.size(); ++i) same &= state(tensors[i]) == seen[i];  // no early exit: the loads
    return same;                                                                       // of every tensor in flight
  }
};

}  // namespace

TORCH_LIBRARY(scratchchat, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("linear_i8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("linear_panel(Tensor x, Tensor panels, int n, Tensor? scale=None, Tensor? bias=None, Tensor? residual=None) "
        "-> Tensor");
  m.def("lora(Tensor x, Tensor y, Tensor[] a, Tensor[] b, Tensor pieces, Tensor coef, Tensor? residual=None) -> Tensor");
  m.def("read_pieces(Tensor buf, int[] sizes) -> float");
  m.def("decode_blocks(Tensor x, Tensor?[] tensors, int[] meta, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor positions, Tensor? cos, Tensor? sin, Tensor? coef, Tensor[] lora_a, Tensor[] lora_b, float eps) -> Tensor");
  m.def("decode_step(Tensor idx, Tensor?[] emb, Tensor?[] tensors, int[] meta, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor positions, Tensor? cos, Tensor? sin, Tensor? coef, Tensor[] lora_a, "
        "Tensor[] lora_b, float eps, Tensor?[] head, int[] head_meta) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, Tensor? cos, "
        "Tensor? sin, int n_heads) -> Tensor");
  m.def("linear_dpbf16(Tensor x, Tensor panels, int n, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("refine_top(Tensor logits, Tensor x, Tensor weight, int k) -> Tensor");
  m.def("argmax(Tensor logits) -> Tensor");
  m.def("copy_positions(Tensor(a!)[] dst, int dst_row, Tensor[] src, int src_row, int n) -> ()");
  m.def("linear_dpi8(Tensor x, Tensor panels, int n, Tensor scale, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("has_avx512_bf16() -> bool", []() { return cpu_has_avx512_bf16(); });
  m.def("has_avx512_vnni() -> bool", []() { return cpu_has_avx512_vnni(); });
  m.def("prefix_attention(Tensor q, Tensor k, Tensor v, Tensor positions) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.class_<Watch>("Watch")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("unchanged", &Watch::unchanged);
}

TORCH_LIBRARY_IMPL(scratchchat, CPU, m) {
  using T = const at::Tensor&;
  using OT = const std::optional<at::Tensor>&;
  m.impl("linear", [](T x, T w, OT bias, OT residual) { return linear(x, w, bias, residual, nullptr); });
  m.impl("linear_i8", [](T x, T q, T scale, OT bias, OT residual) {
    return linear_i8(x, q, scale, bias, residual, nullptr);
  });
  m.impl("linear_panel", [](T x, T panels, int64_t n, OT scale, OT bias, OT residual) {
    return linear_panel(x, panels, n, scale, bias, residual, nullptr);
  });
  m.impl("lora", &lora);
  m.impl("decode_blocks", &decode_blocks);
  m.impl("decode_step", &decode_step);
  m.impl("read_pieces", &read_pieces);
  m.impl("decode_attention", [](T qkv, T kc, T vc, T positions, OT cos, OT sin, int64_t n_heads) {
    return decode_attention(qkv, kc, vc, positions, cos, sin, n_heads);
  });
  m.impl("linear_dpbf16", [](T x, T panels, int64_t n, OT bias, OT residual) {
    return linear_dpbf16(x, panels, n, bias, residual, nullptr);
  });
  m.impl("linear_dpi8", [](T x, T panels, int64_t n, T scale, OT bias, OT residual) {
    return linear_dpi8(x, panels, n, scale, bias, residual, nullptr);
  });
  m.impl("refine_top", &refine_top);
  m.impl("argmax", &argmax);
  m.impl("copy_positions", &copy_positions);
  m.impl("prefix_attention", &prefix_attention);
  m.impl("rms_norm", [](T x, T weight, double eps) { return rms_norm(x, weight, eps); });
  m.impl("layer_norm", [](T x, T weight, const std::optional<at::Tensor>& bias, double eps) {
    return layer_norm(x, weight, bias, eps);
  });
  m.impl("silu_mul", [](T gate_up) { return silu_mul(gate_up); });
  m.impl("gelu_tanh", [](T x) { return gelu_tanh(x); });
}
