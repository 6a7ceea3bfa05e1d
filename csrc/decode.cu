// Host side of the decode kernels: argument checks, split planning, launches (cacheaug.h).
//
// Split heuristic (flash-decoding): a CTA covers one KV head x up to 8 query rows (decode)
// or up to 64 (request, head) rows of the shared prefix (cascade), for one chunk of keys.
// With n_ctas CTAs per split we want about kWaves * SMs CTAs in flight, so
//   splits = clamp(ceil(kWaves * SMs / n_ctas), 1, min(ceil(T / kMinChunk), kMaxSplits))
// and the chunk is rounded up to a multiple of 64 keys (a whole number of smem tiles). Long
// caches with few requests get many splits; big batches get one (no reduction pass at all).
// The plan depends only on sizes (Tmax, not the lens values), so nothing syncs with the host.
#include <cstdio>
#include <cstring>

#include "cacheaug.h"
#include "decode_kernels.cuh"

namespace {

using cacheaug::PartialParams;

constexpr int kWaves = 2;
constexpr int kMinChunk = 256;
constexpr int kMaxSplits = 64;
constexpr int kChunkAlign = 64;
constexpr int kMaxGridY = 65535;  // splits are gridDim.y

int fail(char* err, size_t n, int code, const char* fmt, const char* a = "", long long x = 0) {
  if (err != nullptr && n > 0) {
    char buf[512];
    snprintf(buf, sizeof(buf), fmt, a, x);
    snprintf(err, n, "%s", buf);
  }
  return code;
}

bool no_device_error(cudaError_t e) {
  return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInitializationError ||
         e == cudaErrorCompatNotSupportedOnDevice || e == cudaErrorSystemDriverMismatch ||
         e == cudaErrorNoKernelImageForDevice || e == cudaErrorDevicesUnavailable;
}

int cuda_fail(char* err, size_t n, cudaError_t e, const char* what) {
  if (no_device_error(e)) {
    if (err != nullptr && n > 0)
      snprintf(err, n, "no CUDA device: these kernels need a CUDA GPU and a driver new enough for the CUDA runtime (%s: %s)", what,
               cudaGetErrorString(e));
    return CA_ERR_NO_DEVICE;
  }
  if (err != nullptr && n > 0) snprintf(err, n, "CUDA error in %s: %s", what, cudaGetErrorString(e));
  return CA_ERR_CUDA;
}

// SM count of the current device (cached per device index).
int sm_count(int* out, char* err, size_t n) {
  static int cache[128] = {0};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cuda_fail(err, n, e, "cudaGetDevice");
  if (dev >= 0 && dev < 128 && cache[dev] > 0) {
    *out = cache[dev];
    return CA_OK;
  }
  int sms = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return cuda_fail(err, n, e, "cudaDeviceGetAttribute");
  if (dev >= 0 && dev < 128) cache[dev] = sms;
  *out = sms;
  return CA_OK;
}

long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

// (splits, chunk) for a segment of t keys covered by n_ctas CTAs per split, and *reserve: the
// workspace slots to hold for t keys. The chunk is rounded up after the split count is chosen,
// which can lower the count as t grows (132 SMs, 8 CTAs: 8448 keys 33 splits, 8449 keys 27), so
// the workspace is sized by the count before rounding: never below the splits used, and never
// decreasing in t - a workspace planned for a capacity fits every shorter run.
void plan_splits(long long n_ctas, long long t, int sms, int requested, int* splits, int* chunk, int* reserve) {
  if (t <= 0) {
    *splits = 1;
    *chunk = kChunkAlign;
    *reserve = 1;
    return;
  }
  long long s = requested > 0 ? requested : cdiv((long long)kWaves * sms, n_ctas > 0 ? n_ctas : 1);
  if (requested <= 0) s = s < cdiv(t, kMinChunk) ? s : cdiv(t, kMinChunk);
  if (s > kMaxSplits && requested <= 0) s = kMaxSplits;
  if (s < 1) s = 1;
  if (s > t) s = t;
  if (s > kMaxGridY) s = kMaxGridY;
  long long c = cdiv(t, s);
  if (requested <= 0) c = cdiv(c, kChunkAlign) * kChunkAlign;
  *chunk = (int)c;
  *splits = (int)cdiv(t, c);
  *reserve = (int)s;
}

struct Layout {
  int shared_rows, rows_per_cta, nrg, wk, row_tiles_per_req;
  long long tiles;
};

Layout decode_layout(int B, int G) {
  Layout L{};
  L.shared_rows = 0;
  L.rows_per_cta = cacheaug::kRowsPerWarp;
  L.nrg = 1;
  L.wk = 4;
  L.row_tiles_per_req = (int)cdiv(G, cacheaug::kRowsPerWarp);
  L.tiles = (long long)B * L.row_tiles_per_req;
  return L;
}

// Shared prefix: one CTA applies each K/V tile to up to 64 (request, head) rows.
Layout shared_layout(int B, int G) {
  Layout L{};
  const long long rows = (long long)B * G;
  L.shared_rows = 1;
  L.row_tiles_per_req = 1;
  if (rows <= 8) { L.nrg = 1; L.wk = 4; }
  else if (rows <= 16) { L.nrg = 2; L.wk = 2; }
  else if (rows <= 32) { L.nrg = 4; L.wk = 1; }
  else { L.nrg = 8; L.wk = 1; }
  L.rows_per_cta = L.nrg * cacheaug::kRowsPerWarp;
  L.tiles = cdiv(rows, L.rows_per_cta);
  return L;
}

size_t elem_size(int dtype) { return dtype == CA_FLOAT32 ? 4 : 2; }

// 16-byte vector loads: last dim contiguous, base aligned, other strides keep alignment.
bool vec_ok(const void* ptr, int dtype, const int64_t* st, int nd) {
  const int64_t per16 = 16 / (int64_t)elem_size(dtype);
  if (((uintptr_t)ptr) % 16 != 0 || st[nd - 1] != 1) return false;
  for (int i = 0; i < nd - 1; ++i)
    if (st[i] % per16 != 0) return false;
  return true;
}

int check_common(int dtype, int B, int Hq, int Hkv, int Dh, float scale, float softcap, int64_t window, char* err,
                 size_t n) {
  if (dtype != CA_FLOAT32 && dtype != CA_FLOAT16 && dtype != CA_BFLOAT16)
    return fail(err, n, CA_ERR_INVALID, "%sdtype code %lld is not fp32 (0), fp16 (1) or bf16 (2)", "", dtype);
  if (Dh != 64 && Dh != 128 && Dh != 256)
    return fail(err, n, CA_ERR_INVALID, "%shead dim %lld is not supported by the cuda backend (64, 128 or 256; "
                "the triton and torch backends take any Dh)", "", Dh);
  if (B < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0)
    return fail(err, n, CA_ERR_INVALID, "%sHq must be a positive multiple of Hkv (got Hq %% Hkv = %lld)", "",
                Hkv > 0 ? Hq % Hkv : -1);
  if (!(scale > 0.f)) return fail(err, n, CA_ERR_INVALID, "%sscale must be > 0");
  if (softcap < 0.f) return fail(err, n, CA_ERR_INVALID, "%ssoftcap must be >= 0 (0 = off)");
  if (window < 0 || window > INT32_MAX) return fail(err, n, CA_ERR_INVALID, "%swindow out of range: %lld", "", window);
  return CA_OK;
}

template <typename T>
cudaError_t launch_partial_t(const PartialParams& p, dim3 grid, int threads, int Dh, cudaStream_t s) {
  switch (Dh) {
    case 64: cacheaug::partial_kernel<T, 64><<<grid, threads, 0, s>>>(p); break;
    case 128: cacheaug::partial_kernel<T, 128><<<grid, threads, 0, s>>>(p); break;
    default: cacheaug::partial_kernel<T, 256><<<grid, threads, 0, s>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_partial(int dtype, const PartialParams& p, const Layout& L, int splits, int Dh, cudaStream_t s) {
  dim3 grid((unsigned)(L.tiles * p.Hkv), (unsigned)splits);
  const int threads = 32 * L.nrg * L.wk;
  if (dtype == CA_FLOAT16) return launch_partial_t<__half>(p, grid, threads, Dh, s);
  if (dtype == CA_BFLOAT16) return launch_partial_t<__nv_bfloat16>(p, grid, threads, Dh, s);
  return launch_partial_t<float>(p, grid, threads, Dh, s);
}

cudaError_t launch_reduce(int dtype, const float* po, const float* pl, int slots, int B, int Hq, int Dh, void* o,
                          const int64_t* o_st, float* lse, const int64_t* lse_st, cudaStream_t s) {
  const int64_t sle0 = lse ? lse_st[0] : 0, sle1 = lse ? lse_st[1] : 0;
  const unsigned grid = (unsigned)((long long)B * Hq);
  const int threads = Dh >= 128 ? 128 : 64;
  if (dtype == CA_FLOAT16)
    cacheaug::reduce_kernel<__half><<<grid, threads, 0, s>>>(po, pl, slots, Dh, Hq, (__half*)o, o_st[0], o_st[1], o_st[2],
                                                             lse, sle0, sle1);
  else if (dtype == CA_BFLOAT16)
    cacheaug::reduce_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(po, pl, slots, Dh, Hq, (__nv_bfloat16*)o, o_st[0],
                                                                    o_st[1], o_st[2], lse, sle0, sle1);
  else
    cacheaug::reduce_kernel<float><<<grid, threads, 0, s>>>(po, pl, slots, Dh, Hq, (float*)o, o_st[0], o_st[1], o_st[2],
                                                            lse, sle0, sle1);
  return cudaGetLastError();
}

PartialParams base_params(int dtype, int B, int Hq, int Hkv, int Dh, const void* q, const int64_t* q_st,
                          const void* lens, int lens_i64, int64_t lens_stride, float scale, float softcap,
                          int64_t window) {
  PartialParams p;
  memset(&p, 0, sizeof(p));
  p.q = q; p.sqb = q_st[0]; p.sqh = q_st[1]; p.sqd = q_st[2];
  p.lens = lens; p.lens_i64 = lens_i64; p.lens_stride = lens_stride;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.G = Hq / Hkv;
  p.scale = scale; p.softcap = softcap; p.window = (int)window;
  p.q_vec = vec_ok(q, dtype, q_st, 3);
  (void)Dh;
  return p;
}

void set_kv(PartialParams& p, int dtype, const void* k, const int64_t* k_st, const void* v, const int64_t* v_st,
            bool shared) {
  p.k = k; p.v = v;
  if (shared) {  // [Hkv, T, Dh]: batch stride 0
    p.skb = 0; p.skh = k_st[0]; p.skt = k_st[1]; p.skd = k_st[2];
    p.svb = 0; p.svh = v_st[0]; p.svt = v_st[1]; p.svd = v_st[2];
    p.kv_vec = vec_ok(k, dtype, k_st, 3) && vec_ok(v, dtype, v_st, 3);
  } else {
    p.skb = k_st[0]; p.skh = k_st[1]; p.skt = k_st[2]; p.skd = k_st[3];
    p.svb = v_st[0]; p.svh = v_st[1]; p.svt = v_st[2]; p.svd = v_st[3];
    p.kv_vec = vec_ok(k, dtype, k_st, 4) && vec_ok(v, dtype, v_st, 4);
  }
}

void set_layout(PartialParams& p, const Layout& L) {
  p.shared_rows = L.shared_rows;
  p.rows_per_cta = L.rows_per_cta;
  p.nrg = L.nrg;
  p.wk = L.wk;
  p.row_tiles_per_req = L.row_tiles_per_req;
}

}  // namespace

extern "C" {

int ca_check_device(char* err, size_t err_len) {
  int sms = 0;
  return sm_count(&sms, err, err_len);
}

int ca_decode_workspace(int B, int Hq, int Hkv, int64_t Tmax, int Dh, int num_splits, int* splits_out,
                        size_t* bytes_out, char* err, size_t err_len) {
  int sms = 0;
  int rc = sm_count(&sms, err, err_len);
  if (rc != CA_OK) return rc;
  if (Hkv <= 0 || Hq % Hkv != 0 || Tmax < 0 || Tmax > INT32_MAX)
    return fail(err, err_len, CA_ERR_INVALID, "%sbad sizes for decode (Hq %% Hkv != 0 or Tmax out of range)");
  const Layout L = decode_layout(B, Hq / Hkv);
  int splits = 1, chunk = 0, reserve = 1;
  plan_splits(L.tiles * Hkv, Tmax, sms, num_splits, &splits, &chunk, &reserve);
  *splits_out = splits;
  *bytes_out = reserve > 1 ? (size_t)B * Hq * reserve * (Dh + 1) * sizeof(float) : 0;
  return CA_OK;
}

int ca_decode_attention(int dtype, int B, int Hq, int Hkv, int64_t Tmax, int Dh, const void* q, const int64_t* q_st,
                        const void* k, const int64_t* k_st, const void* v, const int64_t* v_st, const void* lens,
                        int lens_is_int64, int64_t lens_stride, void* o, const int64_t* o_st, float* lse,
                        const int64_t* lse_st, float scale, float softcap, int64_t window, int num_splits,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream, char* err, size_t err_len) {
  int splits = 1;
  size_t need = 0;
  int rc = ca_decode_workspace(B, Hq, Hkv, Tmax, Dh, num_splits, &splits, &need, err, err_len);
  if (rc != CA_OK) return rc;
  rc = check_common(dtype, B, Hq, Hkv, Dh, scale, softcap, window, err, err_len);
  if (rc != CA_OK) return rc;
  if (B == 0) return CA_OK;
  if (!q || !k || !v || !lens || !o) return fail(err, err_len, CA_ERR_INVALID, "%sa required pointer is null");
  if (workspace_bytes < need || (need > 0 && workspace == nullptr))
    return fail(err, err_len, CA_ERR_INVALID, "%sworkspace too small: need %lld bytes", "", (long long)need);
  const Layout L = decode_layout(B, Hq / Hkv);
  int chunk = 0, reserve = 0;
  int sms = 0;
  sm_count(&sms, nullptr, 0);
  plan_splits(L.tiles * Hkv, Tmax, sms, num_splits, &splits, &chunk, &reserve);
  PartialParams p = base_params(dtype, B, Hq, Hkv, Dh, q, q_st, lens, lens_is_int64, lens_stride, scale, softcap,
                                window);
  set_kv(p, dtype, k, k_st, v, v_st, false);
  set_layout(p, L);
  p.seg_t = (int)Tmax; p.lens_is_seg = 1; p.chunk = chunk; p.qbase = 0; p.pos_off = 0;
  float* po = reinterpret_cast<float*>(workspace);
  float* pl = po ? po + (size_t)B * Hq * splits * Dh : nullptr;
  if (splits == 1) {
    p.final_out = 1;
    p.o = o; p.sob = o_st[0]; p.soh = o_st[1]; p.sod = o_st[2];
    p.lse = lse; p.sleb = lse ? lse_st[0] : 0; p.sleh = lse ? lse_st[1] : 0;
  } else {
    p.po = po; p.pl = pl; p.n_slots = splits; p.split_off = 0;
  }
  cudaError_t e = launch_partial(dtype, p, L, splits, Dh, stream);
  if (e != cudaSuccess) return cuda_fail(err, err_len, e, "decode partial kernel launch");
  if (splits > 1) {
    e = launch_reduce(dtype, po, pl, splits, B, Hq, Dh, o, o_st, lse, lse_st, stream);
    if (e != cudaSuccess) return cuda_fail(err, err_len, e, "decode reduce kernel launch");
  }
  return CA_OK;
}

int ca_cascade_workspace(int B, int Hq, int Hkv, int64_t T, int64_t L, int Dh, int num_splits, int* shared_splits_out,
                         int* suffix_splits_out, size_t* bytes_out, char* err, size_t err_len) {
  int sms = 0;
  int rc = sm_count(&sms, err, err_len);
  if (rc != CA_OK) return rc;
  if (Hkv <= 0 || Hq % Hkv != 0 || T < 0 || L < 0 || T > INT32_MAX || L > INT32_MAX || T + L > INT32_MAX)
    return fail(err, err_len, CA_ERR_INVALID, "%sbad sizes for cascade (Hq %% Hkv != 0 or T/L out of range)");
  const int G = Hq / Hkv;
  int sa = 0, sb = 0, chunk = 0, ra = 0, rb = 0;
  if (T > 0) plan_splits(shared_layout(B, G).tiles * Hkv, T, sms, num_splits, &sa, &chunk, &ra);
  if (L > 0) plan_splits(decode_layout(B, G).tiles * Hkv, L, sms, num_splits, &sb, &chunk, &rb);
  *shared_splits_out = sa;
  *suffix_splits_out = sb;
  *bytes_out = (size_t)B * Hq * (ra + rb) * (Dh + 1) * sizeof(float);
  return CA_OK;
}

int ca_cascade_decode(int dtype, int B, int Hq, int Hkv, int64_t T, int64_t Lsuf, int Dh, const void* q,
                      const int64_t* q_st, const void* k_shared, const int64_t* ks_st, const void* v_shared,
                      const int64_t* vs_st, const void* k_suffix, const int64_t* kx_st, const void* v_suffix,
                      const int64_t* vx_st, const void* suffix_lens, int lens_is_int64, int64_t lens_stride, void* o,
                      const int64_t* o_st, float* lse, const int64_t* lse_st, float scale, float softcap,
                      int64_t window, int num_splits, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                      char* err, size_t err_len) {
  int sa = 0, sb = 0;
  size_t need = 0;
  int rc = ca_cascade_workspace(B, Hq, Hkv, T, Lsuf, Dh, num_splits, &sa, &sb, &need, err, err_len);
  if (rc != CA_OK) return rc;
  rc = check_common(dtype, B, Hq, Hkv, Dh, scale, softcap, window, err, err_len);
  if (rc != CA_OK) return rc;
  if (B == 0) return CA_OK;
  if (!q || !o || !suffix_lens || (T > 0 && (!k_shared || !v_shared)) || (Lsuf > 0 && (!k_suffix || !v_suffix)))
    return fail(err, err_len, CA_ERR_INVALID, "%sa required pointer is null");
  if (workspace_bytes < need || (need > 0 && workspace == nullptr))
    return fail(err, err_len, CA_ERR_INVALID, "%sworkspace too small: need %lld bytes", "", (long long)need);
  int sms = 0;
  sm_count(&sms, nullptr, 0);
  const int G = Hq / Hkv, slots = sa + sb;
  float* po = reinterpret_cast<float*>(workspace);
  float* pl = po ? po + (size_t)B * Hq * slots * Dh : nullptr;
  cudaError_t e = cudaSuccess;
  if (sa > 0) {  // shared prefix: each K/V tile is applied to up to 64 (request, head) rows
    const Layout L = shared_layout(B, G);
    int splits = 0, chunk = 0, reserve = 0;
    plan_splits(L.tiles * Hkv, T, sms, num_splits, &splits, &chunk, &reserve);
    PartialParams p = base_params(dtype, B, Hq, Hkv, Dh, q, q_st, suffix_lens, lens_is_int64, lens_stride, scale,
                                  softcap, window);
    set_kv(p, dtype, k_shared, ks_st, v_shared, vs_st, true);
    set_layout(p, L);
    p.seg_t = (int)T; p.lens_is_seg = 0; p.chunk = chunk; p.qbase = (int)T; p.pos_off = 0;
    p.po = po; p.pl = pl; p.n_slots = slots; p.split_off = 0;
    e = launch_partial(dtype, p, L, splits, Dh, stream);
    if (e != cudaSuccess) return cuda_fail(err, err_len, e, "cascade shared-prefix kernel launch");
  }
  if (sb > 0) {  // per-request suffix (latents + generated tokens)
    const Layout L = decode_layout(B, G);
    int splits = 0, chunk = 0, reserve = 0;
    plan_splits(L.tiles * Hkv, Lsuf, sms, num_splits, &splits, &chunk, &reserve);
    PartialParams p = base_params(dtype, B, Hq, Hkv, Dh, q, q_st, suffix_lens, lens_is_int64, lens_stride, scale,
                                  softcap, window);
    set_kv(p, dtype, k_suffix, kx_st, v_suffix, vx_st, false);
    set_layout(p, L);
    p.seg_t = (int)Lsuf; p.lens_is_seg = 1; p.chunk = chunk; p.qbase = (int)T; p.pos_off = (int)T;
    p.po = po; p.pl = pl; p.n_slots = slots; p.split_off = sa;
    e = launch_partial(dtype, p, L, splits, Dh, stream);
    if (e != cudaSuccess) return cuda_fail(err, err_len, e, "cascade suffix kernel launch");
  }
  e = launch_reduce(dtype, po, pl, slots, B, Hq, Dh, o, o_st, lse, lse_st, stream);
  if (e != cudaSuccess) return cuda_fail(err, err_len, e, "cascade merge kernel launch");
  return CA_OK;
}

int ca_merge_states(int dtype, int64_t N, int Dh, const void* o_a, int64_t oa_row, int64_t oa_d, const float* lse_a,
                    int64_t la_row, const void* o_b, int64_t ob_row, int64_t ob_d, const float* lse_b, int64_t lb_row,
                    void* o, int64_t o_row, int64_t o_d, float* lse, int64_t l_row, cudaStream_t stream, char* err,
                    size_t err_len) {
  int sms = 0;
  int rc = sm_count(&sms, err, err_len);
  if (rc != CA_OK) return rc;
  if (dtype != CA_FLOAT32 && dtype != CA_FLOAT16 && dtype != CA_BFLOAT16)
    return fail(err, err_len, CA_ERR_INVALID, "%sdtype code %lld is not fp32 (0), fp16 (1) or bf16 (2)", "", dtype);
  if (N < 0 || Dh < 0) return fail(err, err_len, CA_ERR_INVALID, "%snegative size");
  if (N == 0) return CA_OK;
  if (!o_a || !o_b || !lse_a || !lse_b || !o || !lse)
    return fail(err, err_len, CA_ERR_INVALID, "%sa required pointer is null");
  const int warps = 4;
  const long long blocks = cdiv(N, warps);
  if (blocks > INT32_MAX) return fail(err, err_len, CA_ERR_INVALID, "%stoo many rows: %lld", "", N);
  const unsigned grid = (unsigned)blocks;
  if (dtype == CA_FLOAT16)
    cacheaug::merge_kernel<__half><<<grid, 32 * warps, 0, stream>>>(
        N, Dh, (const __half*)o_a, oa_row, oa_d, lse_a, la_row, (const __half*)o_b, ob_row, ob_d, lse_b, lb_row,
        (__half*)o, o_row, o_d, lse, l_row);
  else if (dtype == CA_BFLOAT16)
    cacheaug::merge_kernel<__nv_bfloat16><<<grid, 32 * warps, 0, stream>>>(
        N, Dh, (const __nv_bfloat16*)o_a, oa_row, oa_d, lse_a, la_row, (const __nv_bfloat16*)o_b, ob_row, ob_d, lse_b,
        lb_row, (__nv_bfloat16*)o, o_row, o_d, lse, l_row);
  else
    cacheaug::merge_kernel<float><<<grid, 32 * warps, 0, stream>>>(N, Dh, (const float*)o_a, oa_row, oa_d, lse_a,
                                                                   la_row, (const float*)o_b, ob_row, ob_d, lse_b,
                                                                   lb_row, (float*)o, o_row, o_d, lse, l_row);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_fail(err, err_len, e, "merge_states kernel launch");
  return CA_OK;
}

}  // extern "C"
