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
//       position, causal attention over the row's cached keys (grouped-query heads), softmax in float32
//   scratchchat::rms_norm(x, weight, eps) -> x / sqrt(mean(x^2) + eps) * weight, in the weight's dtype
//   scratchchat::silu_mul(gate_up) -> silu(gate) * up for the fused (..., 2F) gate/up output
//
// Rounding follows the PyTorch path of engine/model.py step by step (bf16 intermediates rounded where it rounds
// them, no FMA contraction: built with -ffp-contract=off), so decode steps agree with prefill.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline __m256 load8(const int8_t* p) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
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

// dots[i * NW + j] = x[i, :] . w[j, :] for NX rows of x (stride ldx) and NW rows of w (stride K).
template <typename WT, int NW, int NX>
inline void tile(const float* x, int64_t ldx, const WT* w, int64_t K, float* dots) {
  __m256 acc[NX][NW];
  for (int i = 0; i < NX; ++i)
    for (int j = 0; j < NW; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[NX];
    for (int i = 0; i < NX; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < NW; ++j) {
      const __m256 wv = load8(w + j * K + k);
      for (int i = 0; i < NX; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < NX; ++i)
    for (int j = 0; j < NW; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * ldx + t] * widen(w[j * K + t]);
      dots[i * NW + j] = s;
    }
}

// What happens to a dot product on its way out: per-feature int8 scale, bias, and optionally the residual add of the
// layer (y = residual + out, float32, with out rounded to bf16 first when the activations are bf16, as the PyTorch
// path rounds the projection's output before adding it to the float32 residual stream).
struct Epilogue {
  const float* scale = nullptr;
  const float* bias = nullptr;
  const float* residual = nullptr;  // (R, N) float32
  bool round_bf16 = false;

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
  });
  for (int64_t n = full * NW; n < N; ++n) block<WT, 1, NX>(x, R, K, w, n, N, ep, y);
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

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The output, and the epilogue's bias and residual: y is float32 (rounded to x's dtype afterwards) unless a
// residual is added, which keeps the sum in float32 like the residual stream it belongs to.
struct Output {
  at::Tensor y, bias, residual;
  Epilogue ep;

  Output(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& res) {
    const int64_t R = x.size(0);
    y = at::empty({R, N}, x.options().dtype(at::kFloat));
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

  at::Tensor result(const at::Tensor& x) const {
    return residual.defined() || x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual) {
  check_inputs(x, w, bias);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "the weight must be float32 or bfloat16, not ", w.scalar_type());
  const at::Tensor xf = as_float(x), wc = w.contiguous();
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  Output out(x, N, bias, residual);
  if (wc.scalar_type() == at::kFloat)
    run(xf.data_ptr<float>(), R, K, wc.data_ptr<float>(), N, out.ep, out.y.data_ptr<float>());
  else
    run(xf.data_ptr<float>(), R, K, wc.data_ptr<bf16>(), N, out.ep, out.y.data_ptr<float>());
  return out.result(x);
}

at::Tensor linear_i8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_inputs(x, q, bias);
  TORCH_CHECK(q.scalar_type() == at::kChar, "q must be int8, not ", q.scalar_type());
  TORCH_CHECK(scale.numel() == q.size(0), "scale has ", scale.numel(), " entries, not ", q.size(0));
  const at::Tensor xf = as_float(x), qc = q.contiguous(), sf = as_float(scale);
  const int64_t R = x.size(0), K = x.size(1), N = q.size(0);
  Output out(x, N, bias, residual);
  out.ep.scale = sf.data_ptr<float>();
  run(xf.data_ptr<float>(), R, K, qc.data_ptr<int8_t>(), N, out.ep, out.y.data_ptr<float>());
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
template <typename T>
inline void rope(const T* x, const float* cos, const float* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) {
    const float c = widen(T(cos[i])), s = widen(T(i < half ? -sin[i] : sin[i]));
    const float a = widen(T(widen(x[i]) * c));
    const float b = widen(T(widen(x[(i + half) % hd]) * s));
    out[i] = T(a + b);
  }
}

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
  // 1. rotated queries (as T, widened to float32 for the dot products); keys and values into the cache
  std::vector<float> q(B * H * hd);
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
        for (int64_t d = 0; d < hd; ++d) q[(b * H + h) * hd + d] = widen(tmp[d]);
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
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);
  // threads only for enough work per task (~64k multiply-adds): short contexts run on the calling thread
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (2 * longest * hd));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(S), acc(hd);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep, n = pos[b] + 1;
      const float* qh = q.data() + i * hd;
      const T* kh = kd + b * sb + g * sh;
      const T* vhp = vd + b * vb + g * vh;
      float m = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        w[t] = dot(qh, kh + t * st, hd) * scale;
        m = std::max(m, w[t]);
      }
      float sum = 0.f;
      int64_t t = 0;
      const __m256 mv = _mm256_set1_ps(m);
      __m256 sv = _mm256_setzero_ps();
      for (; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(w.data() + t), mv));
        _mm256_storeu_ps(w.data() + t, e);
        sv = _mm256_add_ps(sv, e);
      }
      sum = hsum(sv);
      for (; t < n; ++t) {
        w[t] = exp1(w[t] - m);
        sum += w[t];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (t = 0; t < n; ++t) {
        const float wt = w[t];
        const T* vrow = vhp + t * vt;
        int64_t d = 0;
        const __m256 wv = _mm256_set1_ps(wt);
        for (; d + 8 <= hd; d += 8)
          _mm256_storeu_ps(acc.data() + d, _mm256_fmadd_ps(wv, load8(vrow + d), _mm256_loadu_ps(acc.data() + d)));
        for (; d < hd; ++d) acc[d] += wt * widen(vrow[d]);
      }
      const float inv = 1.0f / sum;
      T* o = out + b * H * hd + h * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = T(acc[d] * inv);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& kc, const at::Tensor& vc,
                            const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin, int64_t n_heads) {
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
    c = cos->to(at::kFloat).contiguous();
    s = sin->to(at::kFloat).contiguous();
    TORCH_CHECK(c.dim() == 2 && c.size(1) == hd && s.sizes() == c.sizes(), "RoPE tables must be (S, hd)");
  }
  at::Tensor y = at::empty({B, n_heads * hd}, qkv.options());
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

template <typename T>
void rms_norm_impl(const float* x, const T* w, float eps, int64_t R, int64_t D, T* y) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (int64_t d = 0; d < D; ++d) y[r * D + d] = T((xr[d] * inv) * widen(w[d]));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.size(-1) == weight.numel(), "x has ", x.size(-1), " features, the weight ", weight.numel());
  const at::Tensor xf = x.to(at::kFloat).contiguous(), wc = weight.contiguous();
  const int64_t D = weight.numel(), R = xf.numel() / std::max<int64_t>(D, 1);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(weight.scalar_type()));
  if (wc.scalar_type() == at::kFloat)
    rms_norm_impl(xf.data_ptr<float>(), wc.data_ptr<float>(), static_cast<float>(eps), R, D, y.data_ptr<float>());
  else if (wc.scalar_type() == at::kBFloat16)
    rms_norm_impl(xf.data_ptr<float>(), wc.data_ptr<bf16>(), static_cast<float>(eps), R, D, y.data_ptr<bf16>());
  else
    TORCH_CHECK(false, "rms_norm takes float32 or bfloat16 weights, not ", wc.scalar_type());
  return y;
}

template <typename T>
void silu_mul_impl(const T* in, int64_t R, int64_t F, T* out) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    float s[8];
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = in + r * 2 * F;
      const T* u = g + F;
      T* o = out + r * F;
      int64_t i = 0;
      for (; i + 8 <= F; i += 8) {  // silu(x) = x / (1 + exp(-x)), as PyTorch's kernel computes it
        const __m256 x = load8(g + i);
        const __m256 one = _mm256_set1_ps(1.0f);
        _mm256_storeu_ps(s, _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)))));
        for (int j = 0; j < 8; ++j) o[i + j] = T(widen(T(s[j])) * widen(u[i + j]));
      }
      for (; i < F; ++i) {
        const float x = widen(g[i]);
        o[i] = T(widen(T(x / (1.0f + exp1(-x)))) * widen(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "gate_up must hold gate and up halves");
  const at::Tensor in = gate_up.contiguous();
  const int64_t F = in.size(-1) / 2, R = in.numel() / std::max<int64_t>(2 * F, 1);
  std::vector<int64_t> shape(in.sizes().begin(), in.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, in.options());
  if (in.scalar_type() == at::kFloat)
    silu_mul_impl(in.data_ptr<float>(), R, F, y.data_ptr<float>());
  else if (in.scalar_type() == at::kBFloat16)
    silu_mul_impl(in.data_ptr<bf16>(), R, F, y.data_ptr<bf16>());
  else
    TORCH_CHECK(false, "silu_mul takes float32 or bfloat16, not ", in.scalar_type());
  return y;
}

}  // namespace

TORCH_LIBRARY(scratchchat, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("linear_i8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, Tensor? cos, "
        "Tensor? sin, int n_heads) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(scratchchat, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_i8", &linear_i8);
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
}
