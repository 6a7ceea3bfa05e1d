// Device code of the decode kernels (included by decode.cu only).
//
// _partial_kernel: one CTA = up to 8*NRG query rows x one chunk of one key segment of one
// KV head. A row is a (request, query head) pair of that KV head's group, so GQA heads and,
// for the cascade's shared prefix (batch stride 0), many requests share each K/V load.
// K/V tiles are staged in shared memory with cp.async double buffering and read by every
// warp. Warp layout: NRG row groups x WK key groups (NRG*WK = warps); a warp holds 8 rows
// in registers and walks its key slots; inside a warp, LPK = Dh/8 lanes cover one key
// (8 elements each, 16-byte loads) and 32/LPK keys are processed side by side. States are
// merged across lanes (shuffles) and warps (shared memory), then written either as the
// final output (single split) or as an fp32 partial state for _reduce_kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

namespace cacheaug {

constexpr int kRowsPerWarp = 8;
constexpr int kTileBytes = 8192;  // per K (and per V) buffer; x2 for double buffering

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 8 contiguous elements from 16-byte-aligned memory (shared or global) to float.
__device__ __forceinline__ void load8_aligned(const float* p, float f[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8_aligned(const __half* p, float f[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x; f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8_aligned(const __nv_bfloat16* p, float f[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x; f[2 * i + 1] = t.y;
  }
}

template <typename T>
__device__ __forceinline__ void load8_global(const T* p, int64_t sd, bool vec, float f[8]) {
  if (vec) {
    load8_aligned(p, f);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_f(p[i * sd]);
  }
}

struct PartialParams {
  const void* q; int64_t sqb, sqh, sqd;
  const void* k; int64_t skb, skh, skt, skd;
  const void* v; int64_t svb, svh, svt, svd;
  const void* lens; int lens_i64; int64_t lens_stride;
  // outputs: final (o in the input dtype + optional lse) or fp32 partials
  void* o; int64_t sob, soh, sod;
  float* lse; int64_t sleb, sleh;
  float* po; float* pl; int n_slots, split_off;
  int final_out;
  int B, Hq, Hkv, G;
  int seg_t;        // segment length when !lens_is_seg
  int lens_is_seg;  // segment length of request b = lens[b]
  int chunk;        // keys per split
  int qbase;        // query position = qbase + lens[b] - 1
  int pos_off;      // absolute position of segment key 0
  int window;       // 0 = off
  float scale, softcap;  // softcap 0 = off
  int shared_rows;  // 1: a CTA's rows run over requests (cascade shared prefix)
  int row_tiles_per_req;  // decode: ceil(G / 8)
  int rows_per_cta;
  int nrg, wk;      // warp layout
  int kv_vec, q_vec;
};

__device__ __forceinline__ int load_len(const PartialParams& p, int b) {
  const int64_t i = (int64_t)b * p.lens_stride;
  return p.lens_i64 ? (int)reinterpret_cast<const int64_t*>(p.lens)[i] : reinterpret_cast<const int*>(p.lens)[i];
}

// Row range [row_base, row_end) of the flattened (request, head-in-group) rows for this CTA.
__device__ __forceinline__ void cta_rows(const PartialParams& p, int tile, int& row_base, int& row_end) {
  if (p.shared_rows) {
    row_base = tile * p.rows_per_cta;
    row_end = min(p.B * p.G, row_base + p.rows_per_cta);
  } else {
    const int b = tile / p.row_tiles_per_req, gc = tile % p.row_tiles_per_req;
    row_base = b * p.G + gc * kRowsPerWarp;
    row_end = min(b * p.G + p.G, row_base + kRowsPerWarp);
  }
}

template <typename T, int D>
__device__ __forceinline__ void load_tile(T* sK, T* sV, const T* kb, const T* vb, const PartialParams& p,
                                          int n0, int cnt, int tile_keys) {
  constexpr int CH = D / 8;
  const int total = tile_keys * CH;
  for (int c = threadIdx.x; c < total; c += blockDim.x) {
    const int key = c / CH, part = c % CH;
    T* dk = sK + key * D + part * 8;
    T* dv = sV + key * D + part * 8;
    if (key < cnt) {
      const int64_t n = n0 + key;
      const T* gk = kb + n * p.skt + (int64_t)part * 8 * p.skd;
      const T* gv = vb + n * p.svt + (int64_t)part * 8 * p.svd;
      if (p.kv_vec) {
#pragma unroll
        for (int o = 0; o < (int)(8 * sizeof(T)); o += 16) {
          __pipeline_memcpy_async(reinterpret_cast<char*>(dk) + o, reinterpret_cast<const char*>(gk) + o, 16);
          __pipeline_memcpy_async(reinterpret_cast<char*>(dv) + o, reinterpret_cast<const char*>(gv) + o, 16);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          dk[i] = gk[i * p.skd];
          dv[i] = gv[i * p.svd];
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        dk[i] = from_f<T>(0.f);
        dv[i] = from_f<T>(0.f);
      }
    }
  }
  __pipeline_commit();
}

// Merge state (mo, lo, ao) into (m, l, a).
__device__ __forceinline__ void merge_state(float& m, float& l, float a[8], float mo, float lo, const float ao[8]) {
  const float mn = fmaxf(m, mo);
  if (mn == -CUDART_INF_F) {  // no finite score on either side: empty (l = 0, a = 0) or NaN - keep a NaN
    l += lo;
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] += ao[i];
    return;
  }
  const float x = __expf(m - mn), y = __expf(mo - mn);
  l = l * x + lo * y;
#pragma unroll
  for (int i = 0; i < 8; ++i) a[i] = a[i] * x + ao[i] * y;
  m = mn;
}

template <typename T, int D>
__global__ void __launch_bounds__(256) partial_kernel(const PartialParams p) {
  constexpr int LPK = D / 8;        // lanes per key
  constexpr int KPW = 32 / LPK;     // keys per warp step
  constexpr int TILE = kTileBytes / (D * (int)sizeof(T));
  __shared__ __align__(16) char smem_raw[4 * kTileBytes];
  // buffer b: K at smem_raw + 2*b*kTileBytes, V right after it
  auto sK = [&](int b) { return reinterpret_cast<T*>(smem_raw + 2 * b * kTileBytes); };
  auto sV = [&](int b) { return reinterpret_cast<T*>(smem_raw + (2 * b + 1) * kTileBytes); };

  const int hkv = blockIdx.x % p.Hkv;
  const int tile_id = blockIdx.x / p.Hkv;
  const int split = blockIdx.y;
  int row_base, row_end;
  cta_rows(p, tile_id, row_base, row_end);
  const int b_first = row_base / p.G, b_last = (row_end - 1) / p.G;

  // key range of this CTA: [lo, hi)
  int lo = split * p.chunk;
  int hi = lo + p.chunk;
  int max_seg = 0, min_first = INT32_MAX;
  for (int b = b_first; b <= b_last; ++b) {
    const int len = load_len(p, b);
    const int seg = p.lens_is_seg ? len : p.seg_t;
    max_seg = max(max_seg, seg);
    if (p.window > 0) min_first = min(min_first, p.qbase + len - p.window - p.pos_off);
  }
  hi = min(hi, max_seg);
  if (p.window > 0) lo = max(lo, min_first);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rg = warp / p.wk, kg = warp % p.wk;
  const int part = lane % LPK, slot = lane / LPK;
  const int wrow0 = row_base + rg * kRowsPerWarp;
  const int nr = max(0, min(kRowsPerWarp, row_end - wrow0));  // warp-uniform

  const T* Q = reinterpret_cast<const T*>(p.q);
  float q[kRowsPerWarp][8], acc[kRowsPerWarp][8], m[kRowsPerWarp], l[kRowsPerWarp];
  int seg[kRowsPerWarp], first[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -CUDART_INF_F;
    l[r] = 0.f;
    seg[r] = 0;
    first[r] = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) { q[r][i] = 0.f; acc[r][i] = 0.f; }
    if (r < nr) {
      const int grow = wrow0 + r, b = grow / p.G, h = hkv * p.G + grow % p.G;
      load8_global(Q + b * p.sqb + h * p.sqh + (int64_t)part * 8 * p.sqd, p.sqd, p.q_vec, q[r]);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[r][i] *= p.scale;
      const int len = load_len(p, b);
      seg[r] = p.lens_is_seg ? len : p.seg_t;
      first[r] = p.window > 0 ? p.qbase + len - p.window - p.pos_off : 0;
    }
  }

  const T* kb = reinterpret_cast<const T*>(p.k) + (int64_t)b_first * p.skb + (int64_t)hkv * p.skh;
  const T* vb = reinterpret_cast<const T*>(p.v) + (int64_t)b_first * p.svb + (int64_t)hkv * p.svh;
  int buf = 0;
  if (lo < hi) load_tile<T, D>(sK(0), sV(0), kb, vb, p, lo, min(TILE, hi - lo), TILE);
  for (int ts = lo; ts < hi; ts += TILE) {
    const int next = ts + TILE;
    if (next < hi) {
      load_tile<T, D>(sK(buf ^ 1), sV(buf ^ 1), kb, vb, p, next, min(TILE, hi - next), TILE);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    if (nr > 0) {
      for (int jb = kg * KPW; jb < TILE; jb += p.wk * KPW) {
        if (ts + jb >= hi) break;  // warp-uniform
        const int j = jb + slot, n = ts + j;
        float kf[8], vf[8], s[kRowsPerWarp] = {};
        load8_aligned(sK(buf) + j * D + part * 8, kf);
        load8_aligned(sV(buf) + j * D + part * 8, vf);
        // reference.finite_keys: a key with a non-finite k or v element scores NaN for every row
        // that sees it (x * 0 is 0 for finite x, NaN for +-Inf / NaN; the shuffle sum below
        // spreads it over the key's lanes), so o and lse turn NaN, never +-inf or a finite +-softcap.
        float bad = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) bad += kf[i] * 0.f + vf[i] * 0.f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (r < nr) {
            float d = bad;
#pragma unroll
            for (int i = 0; i < 8; ++i) d = fmaf(q[r][i], kf[i], d);
            s[r] = d;
          }
        }
#pragma unroll
        for (int off = LPK / 2; off > 0; off >>= 1) {
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
            if (r < nr) s[r] += __shfl_xor_sync(0xffffffffu, s[r], off);
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (r < nr && n < hi && n < seg[r] && n >= first[r]) {
            float sc = s[r];
            if (p.softcap > 0.f) sc = p.softcap * tanhf(sc / p.softcap);
            if (sc > m[r]) {
              const float alpha = __expf(m[r] - sc);  // 0 when m = -inf
              m[r] = sc;
              l[r] = l[r] * alpha + 1.f;
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[r][i] = fmaf(acc[r][i], alpha, vf[i]);
            } else {
              const float pr = __expf(sc - m[r]);
              l[r] += pr;
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[r][i] = fmaf(pr, vf[i], acc[r][i]);
            }
          }
        }
      }
    }
    __syncthreads();
    buf ^= 1;
  }

  // merge the key slots of a warp (lanes with equal `part`)
#pragma unroll
  for (int off = LPK; off < 32; off <<= 1) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (r < nr) {
        const float mo = __shfl_xor_sync(0xffffffffu, m[r], off);
        const float lo_ = __shfl_xor_sync(0xffffffffu, l[r], off);
        float ao[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) ao[i] = __shfl_xor_sync(0xffffffffu, acc[r][i], off);
        merge_state(m[r], l[r], acc[r], mo, lo_, ao);
      }
    }
  }
  // merge the key groups (warps) of each row group through shared memory
  if (p.wk > 1) {
    float* red = reinterpret_cast<float*>(smem_raw);  // tiles are no longer needed
    constexpr int STRIDE = D + 2;
    if (kg > 0 && slot == 0) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (r < nr) {
          float* e = red + ((rg * (p.wk - 1) + kg - 1) * kRowsPerWarp + r) * STRIDE;
          if (part == 0) { e[0] = m[r]; e[1] = l[r]; }
#pragma unroll
          for (int i = 0; i < 8; ++i) e[2 + part * 8 + i] = acc[r][i];
        }
      }
    }
    __syncthreads();
    if (kg == 0) {
      for (int w = 1; w < p.wk; ++w) {
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (r < nr) {
            const float* e = red + ((rg * (p.wk - 1) + w - 1) * kRowsPerWarp + r) * STRIDE;
            float ao[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) ao[i] = e[2 + part * 8 + i];
            merge_state(m[r], l[r], acc[r], e[0], e[1], ao);
          }
        }
      }
    }
  }
  if (kg != 0 || slot != 0) return;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (r >= nr) continue;
    const int grow = wrow0 + r, b = grow / p.G, h = hkv * p.G + grow % p.G;
    // l >= 0; != differs from > only for NaN: a row that saw a NaN stays NaN, never "empty"
    const bool nonempty = l[r] != 0.f;
    const float inv = nonempty ? 1.f / l[r] : 0.f;
    const float lse = nonempty ? m[r] + __logf(l[r]) : -CUDART_INF_F;
    if (p.final_out) {
      T* o = reinterpret_cast<T*>(p.o) + b * p.sob + h * p.soh;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[(int64_t)(part * 8 + i) * p.sod] = from_f<T>(acc[r][i] * inv);
      if (p.lse != nullptr && part == 0) p.lse[b * p.sleb + h * p.sleh] = lse;
    } else {
      const int64_t row = ((int64_t)b * p.Hq + h) * p.n_slots + p.split_off + split;
      float* po = p.po + row * D + part * 8;
#pragma unroll
      for (int i = 0; i < 8; ++i) po[i] = acc[r][i] * inv;
      if (part == 0) p.pl[row] = lse;
    }
  }
}

// One CTA per (b, h) row: exact log-sum-exp merge of n_slots fp32 partial states.
template <typename T>
__global__ void reduce_kernel(const float* po, const float* pl, int n_slots, int D, int Hq, T* o, int64_t sob,
                              int64_t soh, int64_t sod, float* lse, int64_t sleb, int64_t sleh) {
  const int row = blockIdx.x, b = row / Hq, h = row % Hq;
  const float* pls = pl + (int64_t)row * n_slots;
  float mx = -CUDART_INF_F;
  for (int s = 0; s < n_slots; ++s) mx = fmaxf(mx, pls[s]);
  const float ms = mx == -CUDART_INF_F ? 0.f : mx;
  float total = 0.f;
  for (int s = 0; s < n_slots; ++s) total += __expf(pls[s] - ms);
  // NaN partial lse (a row that saw a NaN) -> NaN out; only an exact 0 weight is skipped
  const float inv = total != 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < n_slots; ++s) {
      const float w = __expf(pls[s] - ms);
      if (w != 0.f) a = fmaf(w, po[((int64_t)row * n_slots + s) * D + d], a);
    }
    o[b * sob + h * soh + d * sod] = from_f<T>(a * inv);
  }
  if (threadIdx.x == 0 && lse != nullptr) lse[b * sleb + h * sleh] = total != 0.f ? ms + __logf(total) : -CUDART_INF_F;
}

template <typename T>
__global__ void merge_kernel(int64_t N, int D, const T* oa, int64_t oar, int64_t oad, const float* la, int64_t lar,
                             const T* ob, int64_t obr, int64_t obd, const float* lb, int64_t lbr, T* o, int64_t orow,
                             int64_t od, float* lse, int64_t lr) {
  // one warp per row
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const float a = la[row * lar], b = lb[row * lbr];
  const float mx = fmaxf(a, b), ms = mx == -CUDART_INF_F ? 0.f : mx;
  const float wa = __expf(a - ms), wb = __expf(b - ms), total = wa + wb;
  // ops.merge_states' contract: an empty part (lse = -inf) contributes nothing whatever its o
  // holds; a NaN lse gives NaN o and lse (never the "empty" 0 / -inf).
  const float inv = total != 0.f ? 1.f / total : 0.f;
  for (int d = lane; d < D; d += 32) {
    const float x = to_f(oa[row * oar + d * oad]), y = to_f(ob[row * obr + d * obd]);
    const float xa = a == -CUDART_INF_F ? 0.f : wa * x, yb = b == -CUDART_INF_F ? 0.f : wb * y;
    o[row * orow + d * od] = from_f<T>((xa + yb) * inv);
  }
  if (lane == 0) {
    float l = total != 0.f ? ms + __logf(total) : -CUDART_INF_F;
    // reference.merge_states: logaddexp(+inf, x) = +inf (o is NaN); a NaN lse stays NaN
    if (mx == CUDART_INF_F) l = (a != a || b != b) ? CUDART_NAN_F : CUDART_INF_F;
    lse[row * lr] = l;
  }
}

}  // namespace cacheaug
