// Block-sparse linear kernels for CPUs with AVX512-BF16 (see kiln/sparsity/kernels.py).
//
// All three products of a linear layer are computed "output-stationary" with one register-blocked
// micro-kernel (MR token rows x 64 output columns of fp32 accumulators, vdpbf16ps on bf16 pairs):
//   forward   Y[t, r-block] = sum_{kept (r, c)} X[t, c-block] @ W[r, c]^T      (block CSR)
//   grad in   dX[t, c-block] = sum_{kept (r, c)} dY[t, r-block] @ W[r, c]      (block CSC)
//   grad w    dW[r, c] = dY[:, r-block]^T @ X[:, c-block]  for kept blocks only (K = tokens)
// so there are no gathers, scatter-adds or fp32 partial buffers: work is proportional to the
// kept blocks. The "B" operand is packed into VNNI pairs (two consecutive K values side by side);
// weights are packed per call (cheap: only kept blocks), activations for grad-w are packed along
// tokens by pack_token_pairs.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kMR = 6;  // token rows per micro-tile (6 x 4 = 24 zmm accumulators)

// acc[MR][NR] = sum_s sum_p A_s[m, pair p] . B_s[pair p, n]
// A pair address: A[s] + m * a_rs + p * a_ps (uint16 units); B vector: B[s] + p * b_ps + 16 v.
template <int MR, int NR>
inline void ukernel(int nseg, const uint16_t* const* A, int64_t a_rs, int64_t a_ps,
                    const uint16_t* const* B, int64_t b_ps, int64_t kpairs, float* out,
                    int64_t ldo) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NR; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int s = 0; s < nseg; ++s) {
    const uint16_t* a = A[s];
    const uint16_t* b = B[s];
    for (int64_t p = 0; p < kpairs; ++p) {
      __m512bh bv[NR];
      for (int v = 0; v < NR; ++v)
        bv[v] = (__m512bh)_mm512_loadu_si512((const void*)(b + p * b_ps + 32 * v));
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, a + i * a_rs + p * a_ps, 4);
        __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < NR; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NR; ++v) _mm512_storeu_ps(out + i * ldo + 16 * v, acc[i][v]);
}

template <int NR>
inline void ukernel_rows(int rows, int nseg, const uint16_t* const* A, int64_t a_rs,
                         int64_t a_ps, const uint16_t* const* B, int64_t b_ps, int64_t kpairs,
                         float* out, int64_t ldo) {
  switch (rows) {
    case 6: ukernel<6, NR>(nseg, A, a_rs, a_ps, B, b_ps, kpairs, out, ldo); break;
    case 5: ukernel<5, NR>(nseg, A, a_rs, a_ps, B, b_ps, kpairs, out, ldo); break;
    case 4: ukernel<4, NR>(nseg, A, a_rs, a_ps, B, b_ps, kpairs, out, ldo); break;
    case 3: ukernel<3, NR>(nseg, A, a_rs, a_ps, B, b_ps, kpairs, out, ldo); break;
    case 2: ukernel<2, NR>(nseg, A, a_rs, a_ps, B, b_ps, kpairs, out, ldo); break;
    default: ukernel<1, NR>(nseg, A, a_rs, a_ps, B, b_ps, kpairs, out, ldo); break;
  }
}

inline void store_bf16(uint16_t* dst, const float* src, const float* bias, int n) {
  for (int v = 0; v < n; v += 16) {
    __m512 x = _mm512_loadu_ps(src + v);
    if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + v));
    __m256bh h = _mm512_cvtneps_pbh(x);
    _mm256_storeu_si256((__m256i*)(dst + v), (__m256i)h);
  }
}

inline const uint16_t* u16(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr());
}

// Output-stationary sparse product over a compressed block list (CSR or CSC of kept blocks):
// out[t, line-block] = sum_{j in ptr[line]..ptr[line+1]} act[t, idx[j]-block] @ packed[j]
// act: [T, act_cols] bf16, packed: [nnzb, b/2, b, 2] bf16, out: [T, lines * b] bf16.
torch::Tensor bsr_lines(const torch::Tensor& act, const torch::Tensor& packed,
                        const torch::Tensor& ptr, const torch::Tensor& idx,
                        const torch::Tensor& bias, int64_t out_cols, int64_t b) {
  TORCH_CHECK(act.scalar_type() == at::kBFloat16 && act.is_contiguous() && act.dim() == 2);
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous());
  TORCH_CHECK(b % 32 == 0, "block size must be a multiple of 32");
  const int64_t T = act.size(0), lda = act.size(1), lines = out_cols / b;
  auto out = torch::empty({T, out_cols}, act.options());
  const uint16_t* x = u16(act);
  const uint16_t* w = u16(packed);
  uint16_t* y = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t* pp = ptr.data_ptr<int64_t>();
  const int64_t* ii = idx.data_ptr<int64_t>();
  const float* bb = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t MT = 96;  // tokens per task
  const int64_t ntiles = (T + MT - 1) / MT, ntasks = lines * ntiles;
  const int nb_chunk = b == 32 ? 32 : 64;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<const uint16_t*> A, B;
    alignas(64) float tile[kMR * 64];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t line = task / ntiles, t0 = (task % ntiles) * MT, t1 = std::min(T, t0 + MT);
      const int64_t j0 = pp[line], nseg = pp[line + 1] - j0;
      A.resize(std::max<int64_t>(nseg, 1));  // nseg == 0: zeros (+ bias)
      B.resize(std::max<int64_t>(nseg, 1));
      for (int64_t n0 = 0; n0 < b; n0 += nb_chunk) {
        for (int64_t m = t0; m < t1; m += kMR) {
          const int rows = (int)std::min<int64_t>(kMR, t1 - m);
          uint16_t* dst = y + m * out_cols + line * b + n0;
          for (int64_t s = 0; s < nseg; ++s) {
            A[s] = x + m * lda + ii[j0 + s] * b;
            B[s] = w + (j0 + s) * b * b + n0 * 2;
          }
          if (nb_chunk == 64)
            ukernel_rows<4>(rows, (int)nseg, A.data(), lda, 2, B.data(), 2 * b, b / 2, tile, 64);
          else
            ukernel_rows<2>(rows, (int)nseg, A.data(), lda, 2, B.data(), 2 * b, b / 2, tile, 64);
          for (int i = 0; i < rows; ++i)
            store_bf16(dst + i * out_cols, tile + i * 64, bb ? bb + line * b + n0 : nullptr,
                       nb_chunk);
        }
      }
    }
  }
  return out;
}

// src [T, N] bf16 -> [N/b, ceil(T/2), b, 2]: consecutive tokens side by side (zero-padded).
torch::Tensor pack_token_pairs(const torch::Tensor& src, int64_t b) {
  TORCH_CHECK(src.scalar_type() == at::kBFloat16 && src.is_contiguous() && src.dim() == 2);
  const int64_t T = src.size(0), N = src.size(1), Tp = (T + 1) / 2, nb = N / b;
  auto out = torch::empty({nb, Tp, b, 2}, src.options());
  const uint16_t* s = u16(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr());
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int64_t PT = 64;  // token pairs per task
  const int64_t nchunks = (Tp + PT - 1) / PT;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < nchunks; ++task) {
    const int64_t p1 = std::min(Tp, (task + 1) * PT);
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
      }
    }
  }
  return out;
}

// Pack kept blocks of the dense weight W [out, in] (fp32 or bf16) into VNNI bf16 blocks.
// transpose=false (forward, CSR order): packed[j][p][o][e] = W[r b + o, c b + 2p + e]
// transpose=true (grad-in, CSC order): packed[j][p][i][e] = W[r b + 2p + e, c b + i]
template <typename T>
void pack_weight_impl(const T* W, int64_t in_f, const int64_t* rows, const int64_t* cols,
                      int64_t nnzb, int64_t b, bool transpose, uint16_t* out) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t j = 0; j < nnzb; ++j) {
    const T* blk = W + rows[j] * b * in_f + cols[j] * b;
    uint16_t* o = out + j * b * b;
    for (int64_t p = 0; p < b / 2; ++p)
      for (int64_t n = 0; n < b; ++n)
        for (int e = 0; e < 2; ++e) {
          const T v = transpose ? blk[(2 * p + e) * in_f + n] : blk[n * in_f + 2 * p + e];
          o[(p * b + n) * 2 + e] = c10::BFloat16(static_cast<float>(v)).x;
        }
  }
}

torch::Tensor pack_weight(const torch::Tensor& W, const torch::Tensor& rows,
                          const torch::Tensor& cols, int64_t b, bool transpose) {
  TORCH_CHECK(W.is_contiguous() && W.dim() == 2);
  const int64_t nnzb = rows.numel();
  auto out = torch::empty({nnzb, b / 2, b, 2}, W.options().dtype(at::kBFloat16));
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  if (W.scalar_type() == at::kFloat)
    pack_weight_impl(W.data_ptr<float>(), W.size(1), rows.data_ptr<int64_t>(),
                     cols.data_ptr<int64_t>(), nnzb, b, transpose, o);
  else if (W.scalar_type() == at::kBFloat16)
    pack_weight_impl(W.data_ptr<at::BFloat16>(), W.size(1), rows.data_ptr<int64_t>(),
                     cols.data_ptr<int64_t>(), nnzb, b, transpose, o);
  else
    TORCH_CHECK(false, "weight must be float32 or bfloat16");
  return out;
}

// Dense-shaped weight gradient: dW[r, c] = dY_r^T X_c for kept blocks, zeros elsewhere.
// dyp: pack_token_pairs(dY) [out/b, Tp, b, 2], xp: pack_token_pairs(X) [in/b, Tp, b, 2].
torch::Tensor bsr_grad_weight(const torch::Tensor& dyp, const torch::Tensor& xp,
                              const torch::Tensor& crow, const torch::Tensor& col,
                              int64_t out_f, int64_t in_f, int64_t b, bool fp32_out) {
  const int64_t Tp = dyp.size(1), nbr = out_f / b, nbc = in_f / b;
  auto grad = torch::empty({out_f, in_f}, dyp.options().dtype(fp32_out ? at::kFloat
                                                                       : at::kBFloat16));
  const uint16_t* a = u16(dyp);
  const uint16_t* x = u16(xp);
  const int64_t* pp = crow.data_ptr<int64_t>();
  const int64_t* cc = col.data_ptr<int64_t>();
  const int64_t esz = fp32_out ? 4 : 2;
  char* g = reinterpret_cast<char*>(grad.data_ptr());
  // Tasks: (kept block, 64-col chunk) for the products, then one zero-fill task per block-row.
  const int64_t nnzb = col.numel();
  const int nb_chunk = b == 32 ? 32 : 64, nchunk = (int)(b / nb_chunk);
  std::vector<int64_t> row_of(nnzb);
  for (int64_t r = 0; r < nbr; ++r)
    for (int64_t j = pp[r]; j < pp[r + 1]; ++j) row_of[j] = r;
  const int64_t ntasks = nnzb * nchunk + nbr;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    alignas(64) float tile[kMR * 64];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      if (task >= nnzb * nchunk) {  // zero the unkept blocks of one block-row
        const int64_t r = task - nnzb * nchunk;
        int64_t j = pp[r];
        for (int64_t c = 0; c < nbc; ++c) {
          if (j < pp[r + 1] && cc[j] == c) { ++j; continue; }
          for (int64_t o = 0; o < b; ++o)
            std::memset(g + ((r * b + o) * in_f + c * b) * esz, 0, b * esz);
        }
        continue;
      }
      const int64_t j = task / nchunk, n0 = (task % nchunk) * nb_chunk;
      const int64_t r = row_of[j], c = cc[j];
      const uint16_t* A0 = a + r * Tp * b * 2;
      const uint16_t* B0 = x + c * Tp * b * 2 + n0 * 2;
      for (int64_t m = 0; m < b; m += kMR) {
        const int rows = (int)std::min<int64_t>(kMR, b - m);
        const uint16_t* A[1] = {A0 + m * 2};
        const uint16_t* B[1] = {B0};
        if (nb_chunk == 64)
          ukernel_rows<4>(rows, 1, A, 2, 2 * b, B, 2 * b, Tp, tile, 64);
        else
          ukernel_rows<2>(rows, 1, A, 2, 2 * b, B, 2 * b, Tp, tile, 64);
        for (int i = 0; i < rows; ++i) {
          char* dst = g + ((r * b + m + i) * in_f + c * b + n0) * esz;
          if (fp32_out)
            std::memcpy(dst, tile + i * 64, nb_chunk * 4);
          else
            store_bf16(reinterpret_cast<uint16_t*>(dst), tile + i * 64, nullptr, nb_chunk);
        }
      }
    }
  }
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bsr_lines", &bsr_lines, "output-stationary block-sparse product (forward / grad-in)");
  m.def("pack_token_pairs", &pack_token_pairs, "pack [T, N] bf16 into token-pair VNNI blocks");
  m.def("pack_weight", &pack_weight, "pack kept weight blocks into VNNI bf16");
  m.def("bsr_grad_weight", &bsr_grad_weight, "dense-shaped weight grad, kept blocks only");
}
