// Block-sparse linear kernels for CPUs with AVX512-BF16 (see kiln/sparsity/kernels.py).
//
// Plain C ABI on raw pointers, no torch headers: it builds in a few seconds with g++ and is
// loaded with ctypes; tensors are allocated by the caller. Threads come from OpenMP; the shared
// object asks for libgomp.so.1, which resolves to the copy torch already loaded, so these
// parallel regions run on torch's own intra-op pool (no second pool spinning against it).
//
// All three products of a linear layer are computed output-stationary with one register-blocked
// micro-kernel (6 rows x 64 columns of fp32 accumulators, vdpbf16ps on bf16 pairs):
//   forward   Y[t, r-block] = sum_{kept (r, c)} X[t, c-block] @ W[r, c]^T      (block CSR)
//   grad in   dX[t, c-block] = sum_{kept (r, c)} dY[t, r-block] @ W[r, c]      (block CSC)
//   grad w    dW[r, c] = dY[:, r-block]^T @ X[:, c-block]  for kept blocks only (K = tokens)
// Work is proportional to the kept blocks. The B operand is packed into VNNI pairs (two
// consecutive K values side by side) in 64-column panels, so the inner loop streams contiguous
// memory; the A operand (activations, read in place) is prefetched one micro-tile ahead, which
// doubled the forward / grad-in speed (its rows are a whole activation row apart). Loops run
// segment-outer so one B panel (64 pairs x 64 columns, 16 KB) stays in L1 for a whole task.
//
// Each exported function is ONE OpenMP parallel region (work-sharing loops with barriers
// inside): a region start wakes the worker threads, and on a loaded machine that wake-up can
// cost more than the region's work. A linear layer is 2 regions per step, the fused MLP
// (fc1 -> exact GELU -> fc2, token tiles kept in L2) also 2.
//
// AMX build (-DKILN_AMX -mamx-tile -mamx-bf16, a second shared object loaded only where the CPU
// has AMX and Linux granted the tile data, see bs_amx_init): the same loops, but full 16-row
// slices of every product run on tiles: 2 x 2 tiles of 16 x 16 fp32 accumulators (32 x 32
// outputs), K in steps of 32 bf16, A rows read in place (activations, or dY^T / dH^T for the
// weight gradient), B tiles read from the same VNNI-pair panels with a row stride. Leftover rows
// (tokens % 16) and token pairs (pairs % 16 in the weight gradient) use the AVX512 micro-kernel.
// AMX's A operand needs 32 consecutive K values per row, and the weight gradient's K is the
// token index, so there its A side (dY, dH) is packed transposed, [N, tokens], instead of as
// token pairs (same size, so the caller's buffers do not change).
#include <immintrin.h>
#include <omp.h>
#ifdef KILN_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

constexpr int kMR = 6;   // rows per micro-tile (6 x 4 = 24 zmm accumulators)
constexpr int kCW = 64;  // columns per panel (4 zmm of fp32)

// acc[MR][NR] (+)= sum_p A[m, pair p] . B[pair p, n];  A pair at a + m * a_rs + p * a_ps
// (uint16 units), B vector v at b + p * b_ps + 32 v. acc is read from / written to out.
template <int MR, int NR>
inline void ukernel(int64_t kpairs, const uint16_t* a, int64_t a_rs, int64_t a_ps,
                    const uint16_t* b, int64_t b_ps, float* out, int64_t ldo, bool load) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NR; ++v)
      acc[i][v] = load ? _mm512_loadu_ps(out + i * ldo + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < kpairs; ++p) {
    __m512bh bv[NR];
    for (int v = 0; v < NR; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512((const void*)(b + p * b_ps + 32 * v));
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * a_rs + p * a_ps, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NR; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NR; ++v) _mm512_storeu_ps(out + i * ldo + 16 * v, acc[i][v]);
}

template <int NR>
inline void ukernel_rows(int rows, int64_t kpairs, const uint16_t* a, int64_t a_rs,
                         int64_t a_ps, const uint16_t* b, int64_t b_ps, float* out, int64_t ldo,
                         bool load) {
  switch (rows) {
    case 6: ukernel<6, NR>(kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load); break;
    case 5: ukernel<5, NR>(kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load); break;
    case 4: ukernel<4, NR>(kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load); break;
    case 3: ukernel<3, NR>(kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load); break;
    case 2: ukernel<2, NR>(kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load); break;
    default: ukernel<1, NR>(kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load); break;
  }
}

inline void mkernel(int nr, int rows, int64_t kpairs, const uint16_t* a, int64_t a_rs,
                    int64_t a_ps, const uint16_t* b, int64_t b_ps, float* out, int64_t ldo,
                    bool load) {
  if (nr == 4)
    ukernel_rows<4>(rows, kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load);
  else
    ukernel_rows<2>(rows, kpairs, a, a_rs, a_ps, b, b_ps, out, ldo, load);
}

inline uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

inline void store_bf16(uint16_t* dst, const float* src, const float* bias, int n) {
  for (int v = 0; v < n; v += 16) {
    __m512 x = _mm512_loadu_ps(src + v);
    if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + v));
    _mm256_storeu_si256((__m256i*)(dst + v), (__m256i)_mm512_cvtneps_pbh(x));
  }
}

// exp(x) for x <= 0: 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2, degree-6 Taylor. x is clamped
// at -80 so that the result and the products made from it stay normal floats (subnormal
// arithmetic is microcoded: the forward ran ~2x slower with many |h| > 13).
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-80.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 recip(__m512 d) {  // 1 / d: rcp14 and one Newton step (~2^-28 relative)
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

// Exact (erf) GELU and its derivative from one exp: Phi(x) = 0.5 (1 + erf(x / sqrt2)) by
// Abramowitz-Stegun 7.1.26, 1 - erf(z) = (a1 t + ... + a5 t^5) e^{-z^2}, t = 1 / (1 + p z),
// |error| < 1.5e-7 (far below bf16 resolution); e^{-z^2} = e^{-x^2/2} is also phi's exp.
// gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x).
inline void gelu_and_grad(__m512 x, __m512& gelu, __m512& grad) {
  const __m512 e = exp_neg(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.5f)));
  const __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678f)));
  const __m512 t = recip(_mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 q = _mm512_set1_ps(1.061405429f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
  const __m512 half_tail = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(q, t), e),
                                         _mm512_set1_ps(0.5f));
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 cdf =
      _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.f), half_tail), half_tail);
  gelu = _mm512_mul_ps(x, cdf);
  grad = _mm512_fmadd_ps(_mm512_mul_ps(x, e), _mm512_set1_ps(0.39894228f), cdf);
}

inline __m512 bf16_load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void bf16_store(uint16_t* p, __m512 x) {
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x));
}

// Epilogues of line_task, on one output row of n values (n % 16 == 0):
// 0: out = acc + bias;  1: h = acc + bias rounded to bf16, out = gelu(h), aux = gelu'(h)
// (saved for the backward instead of h);  2: out = acc * aux (the GELU backward, fused).
inline void epilogue(int mode, uint16_t* dst, const float* src, const float* bias,
                     uint16_t* aux, int n) {
  if (mode == 0) return store_bf16(dst, src, bias, n);
  for (int v = 0; v < n; v += 16) {
    __m512 x = _mm512_loadu_ps(src + v);
    if (mode == 1) {
      if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + v));
      // GELU of the bf16-rounded pre-activation, as torch computes it from a bf16 h
      const __m256i hb = (__m256i)_mm512_cvtneps_pbh(x);
      x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hb), 16));
      __m512 gelu, grad;
      gelu_and_grad(x, gelu, grad);
      bf16_store(dst + v, gelu);
      bf16_store(aux + v, grad);
    } else {
      bf16_store(dst + v, _mm512_mul_ps(x, bf16_load(aux + v)));
    }
  }
}

// n (a multiple of 32) bf16 zeros at p: streaming stores where p is 64-byte aligned (the
// zeros are not read back soon, so they skip the cache and its read-for-ownership).
inline void zero_bf16(uint16_t* p, int64_t n) {
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0)
    for (int64_t i = 0; i < n; i += 32) _mm512_stream_si512((__m512i*)(p + i), _mm512_setzero_si512());
  else
    std::memset(p, 0, n * 2);
}

template <typename T>
inline uint16_t bits(T v) {
  if constexpr (sizeof(T) == 4) return to_bf16(v);
  else return v;
}


#ifdef KILN_AMX
// Tile registers: C 0-3 (rows 0-15 / 16-31 x cols 0-15 / 16-31), A 4-5, B 6-7; all 16 x 64 B.
struct alignas(64) TileCfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tile state is per thread: configure on entry to a parallel region, release on exit.
struct TileScope {
  TileScope() {
    TileCfg c{};
    c.palette = 1;
    for (int i = 0; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = 16;
    _tile_loadconfig(&c);
  }
  ~TileScope() { _tile_release(); }
};

template <int MT>
inline void amx_zero() {
  _tile_zero(0);
  _tile_zero(1);
  if (MT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
}

template <int MT>
inline void amx_load_c(float* c, int64_t ldc) {
  _tile_loadd(0, c, ldc * 4);
  _tile_loadd(1, c + 16, ldc * 4);
  if (MT == 2) {
    _tile_loadd(2, c + 16 * ldc, ldc * 4);
    _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
  }
}

template <int MT>
inline void amx_store_c(float* c, int64_t ldc) {
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  if (MT == 2) {
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
  }
}

// C (MT*16 x 32) += A (MT*16 rows, row stride lda, 32 bf16 of K per step) x B (16 pairs per
// step, pair-row stride ldb, 32 columns as pairs); strides in uint16 units.
template <int MT>
inline void amx_steps(int64_t ksteps, const uint16_t* a, int64_t lda, const uint16_t* b,
                      int64_t ldb) {
  for (int64_t k = 0; k < ksteps; ++k) {
    const uint16_t* ak = a + 32 * k;
    const uint16_t* bk = b + 16 * k * ldb;
    _tile_loadd(6, bk, ldb * 2);
    _tile_loadd(7, bk + 32, ldb * 2);
    _tile_loadd(4, ak, lda * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (MT == 2) {
      _tile_loadd(5, ak + 16 * lda, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// In-register transpose of 16 x 16 32-bit values (one token pair per input row -> one
// column's 16 pairs per output row).
inline void transpose16(__m512i* r) {
  __m512 t[16], q[16];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = _mm512_castsi512_ps(r[2 * i]), b = _mm512_castsi512_ps(r[2 * i + 1]);
    t[2 * i] = _mm512_unpacklo_ps(a, b);
    t[2 * i + 1] = _mm512_unpackhi_ps(a, b);
  }
  for (int i = 0; i < 4; ++i) {
    q[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    q[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    q[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    q[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      t[8 * h + j] = _mm512_shuffle_f32x4(q[8 * h + j], q[8 * h + j + 4], 0x88);
      t[8 * h + j + 4] = _mm512_shuffle_f32x4(q[8 * h + j], q[8 * h + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
    r[j + 8] = _mm512_castps_si512(_mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd));
  }
}
#else
struct TileScope {
  TileScope() {}  // no tiles in the AVX512 build (user-provided: no unused warning)
};
#endif

// One kept block of W [out, in] into VNNI bf16 pairs in 64-column panels, [b/cw][b/2][cw][2]
// (cw = min(b, 64)): transpose=0 (forward): B[p][n] = W[row b + n, col b + 2p .. 2p+1];
// transpose=1 (grad-in): B[p][n] = W[row b + 2p .. 2p+1, col b + n].
template <typename T>
void pack_block(const T* W, int64_t in_f, int64_t row, int64_t col, int64_t b, int transpose,
                uint16_t* out) {
  const int64_t cw = std::min<int64_t>(b, kCW), bp = b / 2;
  const T* blk = W + row * b * in_f + col * b;
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t n0 = 0; n0 < b; n0 += cw) {  // one 64-column panel at a time (no divisions)
    uint32_t* panel = o + (n0 / cw) * bp * cw;
    if (transpose) {  // pair (W[2p, n], W[2p + 1, n]): two rows interleaved, rows contiguous
      for (int64_t p = 0; p < bp; ++p) {
        const T* r0 = blk + 2 * p * in_f + n0;
        const T* r1 = r0 + in_f;
        uint32_t* op = panel + p * cw;
        for (int64_t n = 0; n < cw; ++n) op[n] = bits(r0[n]) | (uint32_t)bits(r1[n]) << 16;
      }
    } else {  // pair (W[n, 2p], W[n, 2p + 1]): consecutive elements of row n
      for (int64_t n = 0; n < cw; ++n) {
        const T* r = blk + (n0 + n) * in_f;
        for (int64_t p = 0; p < bp; ++p)
          panel[p * cw + n] = bits(r[2 * p]) | (uint32_t)bits(r[2 * p + 1]) << 16;
      }
    }
  }
}

#ifdef KILN_AMX
constexpr int64_t kMT = 64;  // tokens per task: 2 x 32-row tile blocks
#else
constexpr int64_t kMT = 48;  // tokens per task (8 micro-tiles); 96-192 measured no faster
#endif

// One (line, token tile) of the output-stationary product:
// out[t, line-block] = epilogue(sum_{j in ptr[line]..} act[t, idx[j]-block] @ packed[j]),
// act / out / aux point at the tile's first row; rows < kMT.
// live (if not null): per segment block index, 0 where act's block is all zero (skipped).
void line_task(const uint16_t* act, int64_t lda, const uint16_t* packed, const int64_t* ptr,
               const int64_t* idx, int64_t line, int64_t b, int64_t rows_n, float* tile,
               int mode, const float* bias, uint16_t* out, int64_t ldo, uint16_t* aux,
               const uint8_t* live = nullptr) {
  const int64_t j0 = ptr[line], nseg = ptr[line + 1] - j0;
  const int64_t cw = std::min<int64_t>(b, kCW), nr = cw / 16, bp = b / 2;
  const float* bb = bias ? bias + line * b : nullptr;
  out += line * b;
  if (aux) aux += line * b;
  if (mode == 2 && nseg == 0) {  // a zero product times gelu': zeros (aux may be unwritten)
    for (int64_t m = 0; m < rows_n; ++m) std::memset(out + m * ldo, 0, b * 2);
    return;
  }
  for (int64_t m = 0; m < rows_n; ++m)  // the epilogue's rows are a whole row apart too
    for (int64_t c = 0; c < b; c += 32) {
      _mm_prefetch((const char*)(out + m * ldo + c), _MM_HINT_T1);
      if (aux) _mm_prefetch((const char*)(aux + m * ldo + c), _MM_HINT_T1);
    }
#ifdef KILN_AMX
  // Full 16-row slices on tiles: accumulators stay in tiles across all segments.
  const int64_t m0 = rows_n / 16 * 16;
  for (int64_t n = 0; n < b; n += 32) {
    const int64_t boff = (n / cw) * bp * cw * 2 + (n % cw) * 2;
    for (int64_t m = 0; m < m0; m += 32) {
      const bool two = m + 32 <= m0;
      two ? amx_zero<2>() : amx_zero<1>();
      for (int64_t s = 0; s < nseg; ++s) {
        if (live && !live[idx[j0 + s]]) continue;
        const uint16_t* a = act + m * lda + idx[j0 + s] * b;
        const uint16_t* bb = packed + (j0 + s) * b * b + boff;
        if (two)
          amx_steps<2>(b / 32, a, lda, bb, 2 * cw);
        else
          amx_steps<1>(b / 32, a, lda, bb, 2 * cw);
      }
      two ? amx_store_c<2>(tile + m * b + n, b) : amx_store_c<1>(tile + m * b + n, b);
    }
  }
#else
  const int64_t m0 = 0;
#endif
  bool started = false;  // a live segment has written the leftover rows' accumulators
  for (int64_t s = 0; s < nseg && m0 < rows_n; ++s) {  // segment-outer: B panel stays in L1
    if (live && !live[idx[j0 + s]]) continue;
    const uint16_t* a0 = act + idx[j0 + s] * b;
    for (int64_t n0 = 0; n0 < b; n0 += cw) {
      const uint16_t* bpan = packed + (j0 + s) * b * b + (n0 / cw) * bp * cw * 2;
      for (int64_t m = m0; m < rows_n; m += kMR) {
        const int rows = (int)std::min<int64_t>(kMR, rows_n - m);
        if (n0 == 0 && m + kMR < rows_n)  // prefetch the next micro-tile's A rows
          for (int i = 0; i < kMR; ++i)
            for (int64_t c = 0; c < b; c += 32)
              _mm_prefetch((const char*)(a0 + (m + kMR + i) * lda + c), _MM_HINT_T0);
        mkernel((int)nr, rows, bp, a0 + m * lda, lda, 2, bpan, 2 * cw, tile + m * b + n0, b,
                started);
      }
    }
    started = true;
  }
  if (!started) std::fill(tile + m0 * b, tile + rows_n * b, 0.f);
  for (int64_t m = 0; m < rows_n; ++m)
    epilogue(mode, out + m * ldo, tile + m * b, bb, aux ? aux + m * ldo : nullptr, (int)b);
}

// Token pairs of rows [t0, t1) (t0 even) of a row-major [*, N] bf16 matrix whose row t0 is at
// src (row stride lds), into dst [N/b, Tp, b, 2]; row T (odd T) is zero. colsum += column sums.
// used (if not null): per b-block of columns, 0 where nobody reads the pairs (left unwritten).
void pack_pairs_rows(const uint16_t* src, int64_t lds, int64_t N, int64_t b, int64_t t0,
                     int64_t t1, int64_t T, uint16_t* dst, float* colsum,
                     const uint8_t* used = nullptr) {
  const int64_t Tp = (T + 1) / 2;
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t t = t0; t < t1; t += 2) {
    const uint16_t* r0 = src + (t - t0) * lds;
    const bool has1 = t + 1 < T;
    const uint16_t* r1 = r0 + lds;
    const int64_t p = t / 2;
    for (int64_t c = 0; c < N; c += 32) {
      const __m512i a = _mm512_loadu_si512((const void*)(r0 + c));
      const __m512i z = has1 ? _mm512_loadu_si512((const void*)(r1 + c)) : _mm512_setzero_si512();
      const int64_t cb = b == 64 ? c >> 6 : b == 128 ? c >> 7 : c / b;  // no idiv for 64, 128
      uint16_t* o = dst + ((cb * Tp + p) * b + (c - cb * b)) * 2;
      if (used && !used[cb]) {  // nobody reads these pairs: zeros keep the output defined
        zero_bf16(o, 64);
        continue;
      }
      _mm512_storeu_si512((void*)o, _mm512_permutex2var_epi16(a, lo, z));
      _mm512_storeu_si512((void*)(o + 32), _mm512_permutex2var_epi16(a, hi, z));
      if (colsum) {  // bf16 -> fp32 is a 16-bit shift
        for (int half = 0; half < 2; ++half) {
          const __m256i ah = half ? _mm512_extracti64x4_epi64(a, 1) : _mm512_castsi512_si256(a);
          const __m256i zh = half ? _mm512_extracti64x4_epi64(z, 1) : _mm512_castsi512_si256(z);
          const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ah), 16));
          const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(zh), 16));
          float* cs = colsum + c + 16 * half;
          _mm512_storeu_ps(cs, _mm512_add_ps(_mm512_loadu_ps(cs), _mm512_add_ps(x, y)));
        }
      }
    }
  }
}

#ifdef KILN_AMX
// The weight gradient's A side for tiles: rows [t0, t1) (t0 % 32 == 0) of a row-major [*, N]
// bf16 matrix whose row t0 is at src, transposed into dst [N, Tk] (Tk = 2 Tp: tokens
// contiguous; token T of an odd T is zero). colsum += column sums.
void pack_rows_t(const uint16_t* src, int64_t lds, int64_t N, int64_t b, int64_t t0,
                 int64_t t1, int64_t T, uint16_t* dst, float* colsum, const uint8_t* used) {
  const int64_t Tp = (T + 1) / 2;
  uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t c = 0; c < N; c += 32)
    for (int64_t t = t0; t < t1 && (!used || used[c / b]); t += 32) {  // 16 pairs x 32 columns
      const int64_t np = std::min<int64_t>(16, (t1 - t + 1) / 2);
      __m512i vl[16], vh[16];
      for (int64_t i = 0; i < 16; ++i) {
        if (i >= np) {
          vl[i] = vh[i] = _mm512_setzero_si512();
          continue;
        }
        const uint16_t* r0 = src + (t + 2 * i - t0) * lds + c;
        const __m512i a = _mm512_loadu_si512((const void*)r0);
        const __m512i z =
            t + 2 * i + 1 < T ? _mm512_loadu_si512((const void*)(r0 + lds)) : _mm512_setzero_si512();
        vl[i] = _mm512_permutex2var_epi16(a, lo, z);
        vh[i] = _mm512_permutex2var_epi16(a, hi, z);
        if (colsum)
          for (int half = 0; half < 2; ++half) {
            const __m256i ah = half ? _mm512_extracti64x4_epi64(a, 1) : _mm512_castsi512_si256(a);
            const __m256i zh = half ? _mm512_extracti64x4_epi64(z, 1) : _mm512_castsi512_si256(z);
            const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ah), 16));
            const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(zh), 16));
            float* cs = colsum + c + 16 * half;
            _mm512_storeu_ps(cs, _mm512_add_ps(_mm512_loadu_ps(cs), _mm512_add_ps(x, y)));
          }
      }
      transpose16(vl);
      transpose16(vh);
      // Rows of dst are 2 Tp bf16 apart (4 KB for 2048 tokens: every store of a group maps to
      // the same L1 set), and dst is read only after the barrier: whole aligned lines go
      // around the cache with streaming stores (perf: this packing was ~15% of a step).
      const __mmask16 keep = (__mmask16)((1u << np) - 1);
      const bool stream = np == 16 && ((reinterpret_cast<uintptr_t>(d32 + t / 2) |
                                        static_cast<uintptr_t>(Tp * 4)) & 63) == 0;
      for (int64_t j = 0; j < 16; ++j) {
        uint32_t* lo_row = d32 + (c + j) * Tp + t / 2;
        uint32_t* hi_row = d32 + (c + 16 + j) * Tp + t / 2;
        if (stream) {
          _mm512_stream_si512((__m512i*)lo_row, vl[j]);
          _mm512_stream_si512((__m512i*)hi_row, vh[j]);
        } else {
          _mm512_mask_storeu_epi32(lo_row, keep, vl[j]);
          _mm512_mask_storeu_epi32(hi_row, keep, vh[j]);
        }
      }
    }
  _mm_sfence();  // the weight-gradient loop reads dst after a barrier, maybe on another thread
}
#endif

// The weight gradient's A side (dY, dH): token pairs [N/b, Tp, b, 2] for the AVX512 kernel,
// transposed [N, Tk] for tiles. used (if not null): per b-block of columns, 0 where the
// columns are zero and unread (GradJob::live); left unwritten (AMX) or zero-filled (AVX512).
void pack_a_side(const uint16_t* src, int64_t lds, int64_t N, int64_t b, int64_t t0,
                 int64_t t1, int64_t T, uint16_t* dst, float* colsum,
                 const uint8_t* used = nullptr) {
#ifdef KILN_AMX
  pack_rows_t(src, lds, N, b, t0, t1, T, dst, colsum, used);
#else
  pack_pairs_rows(src, lds, N, b, t0, t1, T, dst, colsum, used);
#endif
}

void reduce_partials(const std::vector<float>& partial, int64_t n, int64_t N, float* out) {
  for (int64_t c = 0; c < N; ++c) out[c] = 0.f;
  for (int64_t k = 0; k < n; ++k)
    for (int64_t c = 0; c < N; ++c) out[c] += partial[k * N + c];
}

// Weight-gradient job: dW[r, c] = dY_r^T X_c for kept blocks (block CSR crow/col), zeros
// elsewhere; xp: token pairs [in/b, Tp, b, 2]; dyp: the same for dY (AVX512 build) or dY^T
// [out, 2 Tp] (AMX build, see pack_a_side).
struct GradJob {
  const uint16_t* dyp;
  const uint16_t* xp;
  int64_t Tp;
  const int64_t* crow;
  const int64_t* col;
  int64_t out_f, in_f, b;
  int fp32_out;
  char* grad;
  const uint8_t* live;  // per block-row of dW, 0 where dY's block is all zero (null: all live)
  std::vector<int64_t> row_of;
  int64_t nnzb = 0, nchunk = 0, nbr = 0;

  void init() {
    nbr = out_f / b;
    nnzb = crow[nbr];
    nchunk = b / std::min<int64_t>(b, kCW);
    row_of.resize(nnzb);
    for (int64_t r = 0; r < nbr; ++r)
      for (int64_t j = crow[r]; j < crow[r + 1]; ++j) row_of[j] = r;
  }
  int64_t ntasks() const { return nnzb * nchunk + nbr; }

  void run(int64_t task, float* tile) const {
    const int64_t cw = std::min<int64_t>(b, kCW), nr = cw / 16, esz = fp32_out ? 4 : 2;
    const int64_t KC = 256;  // token pairs per K chunk: the B panel (KC x cw pairs) stays in L1
    if (task >= nnzb * nchunk) {  // zero the unkept blocks of one block-row
      const int64_t r = task - nnzb * nchunk;
      int64_t j = crow[r];
      for (int64_t c = 0; c < in_f / b; ++c) {
        if (j < crow[r + 1] && col[j] == c) {
          ++j;
          continue;
        }
        for (int64_t o = 0; o < b; ++o)
          zero_bf16(reinterpret_cast<uint16_t*>(grad + ((r * b + o) * in_f + c * b) * esz),
                    b * esz / 2);
      }
      return;
    }
    const int64_t j = task / nchunk, n0 = (task % nchunk) * cw;
    const int64_t r = row_of[j], c = col[j];
    const uint16_t* A0 = dyp + r * Tp * b * 2;
    const uint16_t* B0 = xp + c * Tp * b * 2 + n0 * 2;
    if (Tp == 0 || (live && !live[r])) {  // no tokens, or dY's block is zero: a zero gradient
      std::fill(tile, tile + b * cw, 0.f);
      store(r, c, n0, tile);
      return;
    }
#ifdef KILN_AMX
    // A = dY^T rows (tokens contiguous): full 16-pair steps on tiles, leftover pairs below.
    const int64_t kt = Tp / 16 * 16, Tk = 2 * Tp;
    for (int64_t k0 = 0; k0 < kt; k0 += KC) {
      const int64_t kp = std::min(KC, kt - k0);
      for (int64_t m = 0; m < b; m += 32)
        for (int64_t n = 0; n < cw; n += 32) {
          float* cp = tile + m * cw + n;
          k0 ? amx_load_c<2>(cp, cw) : amx_zero<2>();
          amx_steps<2>(kp / 16, A0 + m * Tk + 2 * k0, Tk, B0 + k0 * b * 2 + n * 2, 2 * b);
          amx_store_c<2>(cp, cw);
        }
    }
    if (kt < Tp)
      for (int64_t m = 0; m < b; m += kMR) {
        const int rows = (int)std::min<int64_t>(kMR, b - m);
        mkernel((int)nr, rows, Tp - kt, A0 + m * Tk + 2 * kt, Tk, 2, B0 + kt * b * 2, 2 * b,
                tile + m * cw, cw, kt > 0);
      }
#else
    for (int64_t k0 = 0; k0 < Tp; k0 += KC) {
      const int64_t kp = std::min(KC, Tp - k0);
      for (int64_t m = 0; m < b; m += kMR) {
        const int rows = (int)std::min<int64_t>(kMR, b - m);
        mkernel((int)nr, rows, kp, A0 + (k0 * b + m) * 2, 2, 2 * b, B0 + k0 * b * 2, 2 * b,
                tile + m * cw, cw, k0 > 0);
      }
    }
#endif
    store(r, c, n0, tile);
  }

  void store(int64_t r, int64_t c, int64_t n0, const float* tile) const {
    const int64_t cw = std::min<int64_t>(b, kCW), esz = fp32_out ? 4 : 2;
    for (int64_t m = 0; m < b; ++m) {
      char* dst = grad + ((r * b + m) * in_f + c * b + n0) * esz;
      if (fp32_out)
        std::memcpy(dst, tile + m * cw, cw * 4);
      else
        store_bf16(reinterpret_cast<uint16_t*>(dst), tile + m * cw, nullptr, (int)cw);
    }
  }
};

// Set up jobs; returns (total tasks, largest block) for grad_jobs_for.
std::pair<int64_t, int64_t> grad_jobs_init(GradJob* jobs, int n) {
  int64_t total = 0, bmax = 0;
  for (int k = 0; k < n; ++k) {
    jobs[k].init();
    total += jobs[k].ntasks();
    bmax = std::max(bmax, jobs[k].b);
  }
  return {total, bmax};
}

// Work-sharing loop over all jobs' tasks; call inside a parallel region (tile: bmax * kCW).
void grad_jobs_for(const GradJob* jobs, int64_t total, float* tile) {
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < total; ++task) {
    int64_t t = task;
    int k = 0;
    while (t >= jobs[k].ntasks()) t -= jobs[k++].ntasks();
    jobs[k].run(t, tile);
  }
}

struct PackJob {
  const void* W;
  int is_f32;
  int64_t in_f;
  const int64_t* rows;
  const int64_t* cols;
  int64_t nnzb, b;
  int transpose;
  uint16_t* out;
};

// Work-sharing loop packing every job's blocks; call inside a parallel region.
void pack_jobs_for(const PackJob* jobs, int n) {
  int64_t total = 0;
  for (int k = 0; k < n; ++k) total += jobs[k].nnzb;
#pragma omp for schedule(dynamic, 4)
  for (int64_t task = 0; task < total; ++task) {
    int64_t j = task;
    int k = 0;
    while (j >= jobs[k].nnzb) j -= jobs[k++].nnzb;
    const PackJob& q = jobs[k];
    if (q.is_f32)
      pack_block(static_cast<const float*>(q.W), q.in_f, q.rows[j], q.cols[j], q.b, q.transpose,
                 q.out + j * q.b * q.b);
    else
      pack_block(static_cast<const uint16_t*>(q.W), q.in_f, q.rows[j], q.cols[j], q.b,
                 q.transpose, q.out + j * q.b * q.b);
  }
}

}  // namespace

extern "C" {

#ifdef KILN_AMX
// 0 when this thread's process may use AMX tiles: the CPU has AMX-TILE and AMX-BF16 (cpuid 7.0
// EDX bits 24, 22) and Linux granted the tile data (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA; without it the first tile instruction faults); 1: no AMX; 2: refused.
int bs_amx_init() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 22) & 1)) return 1;
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 0 : 2;
}
#endif

// Linear forward in ONE parallel region: pack W [out, in] for the forward (wp, CSR order
// rows / cols) and for grad-in (wt, CSC order crows / ccols); barrier; then
// y = x W^T + bias over (block-row, token tile) tasks. ptr: block-CSR row pointers.
void bs_linear_forward(const uint16_t* x, int64_t T, int64_t in_f, int64_t out_f,
                       const void* W, int is_f32, const int64_t* ptr, const int64_t* rows,
                       const int64_t* cols, const int64_t* crows, const int64_t* ccols,
                       int64_t b, const float* bias, uint16_t* wp, uint16_t* wt, uint16_t* y,
                       int nthreads) {
  const int64_t nnzb = ptr[out_f / b];
  const PackJob jobs[2] = {{W, is_f32, in_f, rows, cols, nnzb, b, 0, wp},
                           {W, is_f32, in_f, crows, ccols, nnzb, b, 1, wt}};
  const int64_t ntiles = (T + kMT - 1) / kMT, ntasks = (out_f / b) * ntiles;
#pragma omp parallel num_threads(nthreads)
  {
    pack_jobs_for(jobs, 2);  // ends with a barrier
    const TileScope tiles;
    std::vector<float> tile(kMT * b);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t line = task / ntiles, t0 = (task % ntiles) * kMT;
      line_task(x + t0 * in_f, in_f, wp, ptr, cols, line, b, std::min(kMT, T - t0), tile.data(),
                0, bias, y + t0 * out_f, out_f, nullptr);
    }
  }
}

// Linear backward in ONE parallel region (null outputs skipped). Token tiles first:
// dyp = pairs(dy) and db = colsum(dy) (needs dyp); xp = pairs(x); dx = dy W (wt: packed CSC,
// ccol / crow_t its pointers / row indices). Barrier, then (if grad is not null) the
// dense-shaped dW from (dyp, xp) over the block-CSR ptr / col, fp32 if fp32_out else bf16.
void bs_linear_backward(const uint16_t* dy, const uint16_t* x, int64_t T, int64_t in_f,
                        int64_t out_f, const uint16_t* wt, const int64_t* ccol,
                        const int64_t* crow_t, const int64_t* ptr, const int64_t* col,
                        int64_t b, uint16_t* dx, uint16_t* dyp, uint16_t* xp, float* db,
                        int fp32_out, void* grad, int nthreads) {
  const int64_t ntiles = (T + kMT - 1) / kMT;
  std::vector<float> part(db ? ntiles * out_f : 0, 0.f);
  GradJob job{dyp, xp, (T + 1) / 2, ptr, col, out_f, in_f, b, fp32_out,
              static_cast<char*>(grad), nullptr, {}};
  const auto [gtotal, bmax] = grad_jobs_init(&job, grad ? 1 : 0);
#pragma omp parallel num_threads(nthreads)
  {
    const TileScope tiles;
    std::vector<float> tile(std::max(kMT * b, bmax * kCW));
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < ntiles; ++k) {
      const int64_t t0 = k * kMT, n = std::min(kMT, T - t0);
      if (dyp)
        pack_a_side(dy + t0 * out_f, out_f, out_f, b, t0, t0 + n, T, dyp,
                        db ? part.data() + k * out_f : nullptr);
      if (xp) pack_pairs_rows(x + t0 * in_f, in_f, in_f, b, t0, t0 + n, T, xp, nullptr);
      if (dx)
        for (int64_t line = 0; line < in_f / b; ++line)
          line_task(dy + t0 * out_f, out_f, wt, ccol, crow_t, line, b, n, tile.data(), 0,
                    nullptr, dx + t0 * in_f, in_f, nullptr);
    }  // implicit barrier: all token pairs are written
    grad_jobs_for(&job, gtotal, tile.data());
    _mm_sfence();  // order the streaming zero stores before the results are handed back
  }
  if (db) reduce_partials(part, ntiles, out_f, db);
}

// Fused sparse MLP forward in ONE parallel region (each region costs a wake-up of the worker
// threads, which on a loaded machine can exceed the work): pack W1, W2 for the forward (w1p,
// w2p, CSR order rows/cols) and for grad-in (w1t, w2t, CSC order crows/ccols); barrier; then
// token tiles, which do not depend on each other: h = x W1^T + b1, g = gelu(h) (tile kept in
// L2, saved as token pairs gp with block b2 for dW2), gelu'(h) (saved in h's place),
// y = g W2^T + b2.
// x [T, d]; W1 [f, d], W2 [d, f] (fp32 if f32_*, else bf16); ptr*: block-CSR row pointers.
void bs_mlp_forward(const uint16_t* x, int64_t T, int64_t d, int64_t f, const void* w1,
                    int f32_1, const int64_t* ptr1, const int64_t* rows1, const int64_t* cols1,
                    const int64_t* crows1, const int64_t* ccols1, int64_t b1, const float* bias1,
                    uint16_t* w1p, uint16_t* w1t, const void* w2, int f32_2, const int64_t* ptr2,
                    const int64_t* rows2, const int64_t* cols2, const int64_t* crows2,
                    const int64_t* ccols2, int64_t b2, const float* bias2, uint16_t* w2p,
                    uint16_t* w2t, uint16_t* h, uint16_t* gp, uint16_t* y, int nthreads) {
  const int64_t nnz1 = ptr1[f / b1], nnz2 = ptr2[d / b2];
  const PackJob jobs[4] = {{w1, f32_1, d, rows1, cols1, nnz1, b1, 0, w1p},
                           {w1, f32_1, d, crows1, ccols1, nnz1, b1, 1, w1t},
                           {w2, f32_2, f, rows2, cols2, nnz2, b2, 0, w2p},
                           {w2, f32_2, f, crows2, ccols2, nnz2, b2, 1, w2t}};
  const int64_t ntiles = (T + kMT - 1) / kMT;
  // Only the hidden columns that fc2 reads (block-columns of W2 with a kept block) are needed:
  // fc1 lines (b1 rows of W1) that cover none of them skip their product, GELU and stores, and
  // their g columns are not packed (the backward's fc2 grad-in writes zeros there, never
  // reading their gelu'; both are zero-filled so the outputs stay defined). At 87.5% with
  // random blocks ~45% of the lines are skipped.
  std::vector<uint8_t> used2(f / b2, 0), need1(f / b1, 0);
  for (int64_t j = 0; j < nnz2; ++j) used2[cols2[j]] = 1;
  for (int64_t r = 0; r < f / b1; ++r)
    for (int64_t c = r * b1 / b2; c <= ((r + 1) * b1 - 1) / b2; ++c) need1[r] |= used2[c];
#pragma omp parallel num_threads(nthreads)
  {
    pack_jobs_for(jobs, 4);  // ends with a barrier
    const TileScope tiles;
    std::vector<float> tile(kMT * std::max(b1, b2));
    std::vector<uint16_t> g(kMT * f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < ntiles; ++k) {
      const int64_t t0 = k * kMT, n = std::min(kMT, T - t0);
      for (int64_t line = 0; line < f / b1; ++line)
        if (need1[line])
          line_task(x + t0 * d, d, w1p, ptr1, cols1, line, b1, n, tile.data(), 1, bias1,
                    g.data(), f, h + t0 * f);
        else  // gelu' nobody reads: zeros keep the saved output defined
          for (int64_t m = 0; m < n; ++m) zero_bf16(h + (t0 + m) * f + line * b1, b1);
      pack_pairs_rows(g.data(), f, f, b2, t0, t0 + n, T, gp, nullptr, used2.data());
      for (int64_t line = 0; line < d / b2; ++line)
        line_task(g.data(), f, w2p, ptr2, cols2, line, b2, n, tile.data(), 0, bias2, y + t0 * d,
                  d, nullptr);
    }
    _mm_sfence();  // order the streaming stores before the results are handed back
  }
}

// Fused sparse MLP backward in ONE parallel region. Token tiles first:
// dyp = pairs(dy) (block b2) and db2 = colsum(dy); dh = (dy W2) * gelu'(h) (tile in L2;
// the argument h holds gelu'(h), saved by the forward);
// dhp = pairs(dh) (block b1) and db1 = colsum(dh); dx = dh W1; xp = pairs(x) (block b1).
// Barrier, then both weight gradients (if g1 / g2 are not null): dW1 from (dhp, xp), dW2 from
// (dyp, gp), dense-shaped with zeros outside kept blocks. w2t / w1t: packed CSC of W2 / W1
// (ccol* / crow*t: CSC pointers / row indices); ptr* / col*: block-CSR; db1 / db2 may be null.
void bs_mlp_backward(const uint16_t* dy, const uint16_t* x, const uint16_t* h,
                     const uint16_t* gp, int64_t T, int64_t d, int64_t f, const uint16_t* w2t,
                     const int64_t* ccol2, const int64_t* crow2t, const int64_t* ptr2,
                     const int64_t* col2, int64_t b2, int f32_2, void* g2, const uint16_t* w1t,
                     const int64_t* ccol1, const int64_t* crow1t, const int64_t* ptr1,
                     const int64_t* col1, int64_t b1, int f32_1, void* g1, uint16_t* dx,
                     uint16_t* dyp, uint16_t* dhp, uint16_t* xp, float* db1, float* db2,
                     int nthreads) {
  const int64_t ntiles = (T + kMT - 1) / kMT, Tp = (T + 1) / 2;
  std::vector<float> p1(db1 ? ntiles * f : 0, 0.f), p2(db2 ? ntiles * d : 0, 0.f);
  // dH is zero in the hidden columns no kept W2 block reads (as in the forward): fc1 lines
  // (b1 blocks of them) covering none skip packing, and their dW1 blocks are zeros.
  const int64_t nnz2 = ptr2[d / b2];
  std::vector<uint8_t> used2(f / b2, 0), need1(f / b1, 0);
  for (int64_t j = 0; j < nnz2; ++j) used2[col2[j]] = 1;
  for (int64_t r = 0; r < f / b1; ++r)
    for (int64_t c = r * b1 / b2; c <= ((r + 1) * b1 - 1) / b2; ++c) need1[r] |= used2[c];
  GradJob jobs[2] = {
      {dhp, xp, Tp, ptr1, col1, f, d, b1, f32_1, static_cast<char*>(g1), need1.data(), {}},
      {dyp, gp, Tp, ptr2, col2, d, f, b2, f32_2, static_cast<char*>(g2), nullptr, {}}};
  const int njobs = g1 ? 2 : 0;
  const auto [gtotal, bmax] = grad_jobs_init(jobs, njobs);
#pragma omp parallel num_threads(nthreads)
  {
    const TileScope tiles;
    std::vector<float> tile(std::max(kMT * std::max(b1, b2), bmax * kCW));
    std::vector<uint16_t> dh(kMT * f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < ntiles; ++k) {
      const int64_t t0 = k * kMT, n = std::min(kMT, T - t0);
      pack_a_side(dy + t0 * d, d, d, b2, t0, t0 + n, T, dyp, db2 ? p2.data() + k * d : nullptr);
      for (int64_t line = 0; line < f / b2; ++line)
        line_task(dy + t0 * d, d, w2t, ccol2, crow2t, line, b2, n, tile.data(), 2, nullptr,
                  dh.data(), f, const_cast<uint16_t*>(h + t0 * f));
      pack_a_side(dh.data(), f, f, b1, t0, t0 + n, T, dhp, db1 ? p1.data() + k * f : nullptr,
                  need1.data());
      for (int64_t line = 0; line < d / b1; ++line)
        line_task(dh.data(), f, w1t, ccol1, crow1t, line, b1, n, tile.data(), 0, nullptr,
                  dx + t0 * d, d, nullptr, need1.data());
      pack_pairs_rows(x + t0 * d, d, d, b1, t0, t0 + n, T, xp, nullptr);
    }  // implicit barrier: all token pairs are written
    grad_jobs_for(jobs, gtotal, tile.data());
    _mm_sfence();  // order the streaming zero stores before the results are handed back
  }
  if (db1) reduce_partials(p1, ntiles, f, db1);
  if (db2) reduce_partials(p2, ntiles, d, db2);
}

}  // extern "C"
