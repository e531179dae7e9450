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
// doubled the forward / grad-in speed (its rows are a whole activation row apart).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// exp(x) for x <= 0 (x >= -87): 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2, degree-6 Taylor.
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
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

// Exact (erf) GELU pieces: cdf = Phi(x) = 0.5 (1 + erf(x / sqrt2)), pdf = phi(x).
// erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7, far below bf16 resolution).
inline void gelu_parts(__m512 x, __m512& cdf, __m512& pdf) {
  const __m512 e = exp_neg(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.5f)));
  const __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678f)));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 q = _mm512_set1_ps(1.061405429f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
  const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(q, t), e);  // 1 - erf(|x| / sqrt2)
  const __m512 half_tail = _mm512_mul_ps(tail, _mm512_set1_ps(0.5f));
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  cdf = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.f), half_tail), half_tail);
  pdf = _mm512_mul_ps(e, _mm512_set1_ps(0.39894228f));
}

inline __m512 bf16_load(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void bf16_store(uint16_t* p, __m512 x) {
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x));
}

// Epilogues of bs_lines, on one output row of n values (n % 16 == 0):
// 0: out = acc + bias;  1: aux = acc + bias (pre-activation), out = gelu(aux);
// 2: out = acc * gelu'(aux)  (the GELU backward fused into grad-in).
inline void epilogue(int mode, uint16_t* dst, const float* src, const float* bias,
                     uint16_t* aux, int n) {
  if (mode == 0) return store_bf16(dst, src, bias, n);
  for (int v = 0; v < n; v += 16) {
    __m512 x = _mm512_loadu_ps(src + v), cdf, pdf;
    if (mode == 1) {
      if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + v));
      bf16_store(aux + v, x);
      x = bf16_load(aux + v);  // GELU of the stored (rounded) pre-activation, like torch
      gelu_parts(x, cdf, pdf);
      bf16_store(dst + v, _mm512_mul_ps(x, cdf));
    } else {
      const __m512 h = bf16_load(aux + v);
      gelu_parts(h, cdf, pdf);
      bf16_store(dst + v, _mm512_mul_ps(x, _mm512_fmadd_ps(h, pdf, cdf)));
    }
  }
}

template <typename T>
inline uint16_t bits(T v) {
  if constexpr (sizeof(T) == 4) return to_bf16(v);
  else return v;
}

template <typename T>
void pack_weight_impl(const T* W, int64_t in_f, const int64_t* rows, const int64_t* cols,
                      int64_t nnzb, int64_t b, int transpose, uint16_t* out, int nthreads) {
  const int64_t cw = std::min<int64_t>(b, kCW), bp = b / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t j = 0; j < nnzb; ++j) {
    const T* blk = W + rows[j] * b * in_f + cols[j] * b;
    uint32_t* o = reinterpret_cast<uint32_t*>(out + j * b * b);  // [b/cw][b/2][cw] pairs
    if (transpose) {  // pair (W[2p, n], W[2p + 1, n]): two rows interleaved, rows contiguous
      for (int64_t p = 0; p < bp; ++p) {
        const T* r0 = blk + 2 * p * in_f;
        const T* r1 = r0 + in_f;
        for (int64_t n = 0; n < b; ++n)
          o[((n / cw) * bp + p) * cw + n % cw] = bits(r0[n]) | (uint32_t)bits(r1[n]) << 16;
      }
    } else {  // pair (W[n, 2p], W[n, 2p + 1]): consecutive elements of row n
      for (int64_t n = 0; n < b; ++n) {
        const T* r = blk + n * in_f;
        uint32_t* on = o + (n / cw) * bp * cw + n % cw;
        for (int64_t p = 0; p < bp; ++p)
          on[p * cw] = bits(r[2 * p]) | (uint32_t)bits(r[2 * p + 1]) << 16;
      }
    }
  }
}

}  // namespace

extern "C" {

// Output-stationary product over a compressed block list (CSR or CSC of kept blocks):
// out[t, line-block] = sum_{j in ptr[line]..ptr[line+1]} act[t, idx[j]-block] @ packed[j] (+ bias)
// act: [T, lda] bf16; packed: [nnzb, b/cw, b/2, cw, 2] bf16 (cw = min(b, 64)); out: [T, ldo].
// mode / aux: see epilogue() (aux is [T, ldo] bf16: pre-activation written or read).
void bs_lines(const uint16_t* act, int64_t T, int64_t lda, const uint16_t* packed,
              const int64_t* ptr, const int64_t* idx, int64_t lines, int64_t b,
              const float* bias, uint16_t* out, int64_t ldo, int mode, uint16_t* aux,
              int nthreads) {
  const int64_t MT = 48;  // tokens per task (8 micro-tiles)
  const int64_t ntiles = (T + MT - 1) / MT, ntasks = lines * ntiles;
  const int64_t cw = std::min<int64_t>(b, kCW), nr = cw / 16, bp = b / 2;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> tile(MT * b);  // fp32 accumulators of one task
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t line = task / ntiles, t0 = (task % ntiles) * MT, t1 = std::min(T, t0 + MT);
      const int64_t j0 = ptr[line], nseg = ptr[line + 1] - j0;
      const float* bb = bias ? bias + line * b : nullptr;
      for (int64_t m = t0; m < t1; ++m)  // the epilogue's rows are a whole row apart too
        for (int64_t c = 0; c < b; c += 32) {
          _mm_prefetch((const char*)(out + m * ldo + line * b + c), _MM_HINT_T1);
          if (aux) _mm_prefetch((const char*)(aux + m * ldo + line * b + c), _MM_HINT_T1);
        }
      if (nseg == 0) {
        std::fill(tile.begin(), tile.end(), 0.f);
      } else {
        for (int64_t n0 = 0; n0 < b; n0 += cw)
          for (int64_t m = t0; m < t1; m += kMR) {
            const int rows = (int)std::min<int64_t>(kMR, t1 - m);
            float* o = tile.data() + (m - t0) * b + n0;
            if (m + kMR < t1)  // prefetch the next micro-tile's A rows
              for (int64_t s = 0; s < nseg; ++s)
                for (int i = 0; i < kMR; ++i)
                  for (int64_t c = 0; c < cw; c += 32)
                    _mm_prefetch((const char*)(act + (m + kMR + i) * lda + idx[j0 + s] * b + n0 + c),
                                 _MM_HINT_T0);
            for (int64_t s = 0; s < nseg; ++s) {
              const uint16_t* bpan = packed + (j0 + s) * b * b + (n0 / cw) * bp * cw * 2;
              mkernel((int)nr, rows, bp, act + m * lda + idx[j0 + s] * b, lda, 2, bpan, 2 * cw,
                      o, b, s > 0);
            }
          }
      }
      for (int64_t m = t0; m < t1; ++m)
        epilogue(mode, out + m * ldo + line * b, tile.data() + (m - t0) * b, bb,
                 aux ? aux + m * ldo + line * b : nullptr, (int)b);
    }
  }
}

// src [T, N] bf16 -> [N/b, ceil(T/2), b, 2]: consecutive tokens side by side (zero-padded).
// colsum (optional, fp32 [N]) receives the column sums of src (the bias gradient).
void bs_pack_token_pairs(const uint16_t* s, int64_t T, int64_t N, int64_t b, uint16_t* d,
                         float* colsum, int nthreads) {
  const int64_t Tp = (T + 1) / 2, nb = N / b;
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int64_t PT = 64;  // token pairs per task
  const int64_t nchunks = (Tp + PT - 1) / PT;
  std::vector<float> partial(colsum ? nchunks * N : 0, 0.f);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t task = 0; task < nchunks; ++task) {
    const int64_t p1 = std::min(Tp, (task + 1) * PT);
    float* cs = colsum ? partial.data() + task * N : nullptr;
    for (int64_t p = task * PT; p < p1; ++p) {
      const uint16_t* r0 = s + (2 * p) * N;
      const bool has1 = 2 * p + 1 < T;
      const uint16_t* r1 = s + (2 * p + 1) * N;
      for (int64_t c = 0; c < N; c += 32) {
        __m512i a = _mm512_loadu_si512((const void*)(r0 + c));
        __m512i z = has1 ? _mm512_loadu_si512((const void*)(r1 + c)) : _mm512_setzero_si512();
        const int64_t cb = c / b, ci = c % b;
        uint16_t* o = d + ((cb * Tp + p) * b + ci) * 2;
        _mm512_storeu_si512((void*)o, _mm512_permutex2var_epi16(a, lo, z));
        _mm512_storeu_si512((void*)(o + 32), _mm512_permutex2var_epi16(a, hi, z));
        if (cs) {  // bf16 -> fp32 is a 16-bit shift
          const __m512i al = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(a));
          const __m512i ah = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(a, 1));
          const __m512i zl = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(z));
          const __m512i zh = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(z, 1));
          __m512 lo32 = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(al, 16)),
                                      _mm512_castsi512_ps(_mm512_slli_epi32(zl, 16)));
          __m512 hi32 = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(ah, 16)),
                                      _mm512_castsi512_ps(_mm512_slli_epi32(zh, 16)));
          _mm512_storeu_ps(cs + c, _mm512_add_ps(_mm512_loadu_ps(cs + c), lo32));
          _mm512_storeu_ps(cs + c + 16, _mm512_add_ps(_mm512_loadu_ps(cs + c + 16), hi32));
        }
      }
    }
  }
  if (colsum) {
    for (int64_t c = 0; c < N; ++c) colsum[c] = 0.f;
    for (int64_t k = 0; k < nchunks; ++k)
      for (int64_t c = 0; c < N; ++c) colsum[c] += partial[k * N + c];
  }
}

// Pack kept blocks of the dense weight W [out, in] (fp32: is_f32, else bf16) into VNNI bf16
// 64-column panels, layout [nnzb, b/cw, b/2, cw, 2]:
// transpose=0 (forward, CSR order): B[p][n] pair = W[r b + n, c b + 2p .. 2p+1]
// transpose=1 (grad-in, CSC order): B[p][n] pair = W[r b + 2p .. 2p+1, c b + n]
void bs_pack_weight(const void* W, int is_f32, int64_t in_f, const int64_t* rows,
                    const int64_t* cols, int64_t nnzb, int64_t b, int transpose, uint16_t* out,
                    int nthreads) {
  if (is_f32)
    pack_weight_impl(static_cast<const float*>(W), in_f, rows, cols, nnzb, b, transpose, out,
                     nthreads);
  else
    pack_weight_impl(static_cast<const uint16_t*>(W), in_f, rows, cols, nnzb, b, transpose, out,
                     nthreads);
}

// Dense-shaped weight gradient: dW[r, c] = dY_r^T X_c for kept blocks, zeros elsewhere.
// dyp: token pairs of dY [out/b, Tp, b, 2]; xp: token pairs of X [in/b, Tp, b, 2].
// grad: [out, in], fp32 if fp32_out else bf16.
void bs_grad_weight(const uint16_t* dyp, const uint16_t* xp, int64_t Tp, const int64_t* crow,
                    const int64_t* col, int64_t out_f, int64_t in_f, int64_t b, int fp32_out,
                    void* grad, int nthreads) {
  const int64_t nbr = out_f / b, nbc = in_f / b, nnzb = crow[nbr];
  const int64_t cw = std::min<int64_t>(b, kCW), nr = cw / 16, esz = fp32_out ? 4 : 2;
  const int64_t KC = 256;  // K (token-pair) chunk: keeps the B panel (KC x cw pairs) in L1
  char* g = static_cast<char*>(grad);
  std::vector<int64_t> row_of(nnzb);
  for (int64_t r = 0; r < nbr; ++r)
    for (int64_t j = crow[r]; j < crow[r + 1]; ++j) row_of[j] = r;
  const int64_t nchunk = b / cw, ntasks = nnzb * nchunk + nbr;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> tile(b * cw);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      if (task >= nnzb * nchunk) {  // zero the unkept blocks of one block-row
        const int64_t r = task - nnzb * nchunk;
        int64_t j = crow[r];
        for (int64_t c = 0; c < nbc; ++c) {
          if (j < crow[r + 1] && col[j] == c) {
            ++j;
            continue;
          }
          for (int64_t o = 0; o < b; ++o)
            std::memset(g + ((r * b + o) * in_f + c * b) * esz, 0, b * esz);
        }
        continue;
      }
      const int64_t j = task / nchunk, n0 = (task % nchunk) * cw;
      const int64_t r = row_of[j], c = col[j];
      const uint16_t* A0 = dyp + r * Tp * b * 2;
      const uint16_t* B0 = xp + c * Tp * b * 2 + n0 * 2;
      for (int64_t k0 = 0; k0 < Tp; k0 += KC) {
        const int64_t kp = std::min(KC, Tp - k0);
        for (int64_t m = 0; m < b; m += kMR) {
          const int rows = (int)std::min<int64_t>(kMR, b - m);
          mkernel((int)nr, rows, kp, A0 + (k0 * b + m) * 2, 2, 2 * b, B0 + k0 * b * 2, 2 * b,
                  tile.data() + m * cw, cw, k0 > 0);
        }
      }
      for (int64_t m = 0; m < b; ++m) {
        char* dst = g + ((r * b + m) * in_f + c * b + n0) * esz;
        if (fp32_out)
          std::memcpy(dst, tile.data() + m * cw, cw * 4);
        else
          store_bf16(reinterpret_cast<uint16_t*>(dst), tile.data() + m * cw, nullptr, (int)cw);
      }
    }
  }
}

}  // extern "C"
