/* cacheaug_engine CUDA kernels: a plain C launcher API (DESIGN.md sections 3-4).
 *
 * Every function takes raw device pointers, sizes, ELEMENT strides for every tensor, a
 * cudaStream_t, and a caller-owned buffer for an error message. It returns 0 on success
 * and a non-zero CA_ERR_* code otherwise (the message says what and why). No libtorch:
 * torch tensors, CuPy arrays and any DLPack / __cuda_array_interface__ producer can call it.
 *
 * Semantics follow cacheaug_engine/reference.py: lse is the natural-log log-sum-exp in
 * fp32; a row with no visible key gets o = 0 and lse = -inf; `softcap` (0 = off) maps a
 * score s to c*tanh(s/c); `window` (0 = off) keeps keys at absolute position > qpos - window
 * where the query sits at qpos = lens - 1 (decode) or T + suffix_lens - 1 (cascade).
 *
 * Supported: dtype fp32 / fp16 / bf16, head dim 64, 128 or 256, any Hq % Hkv == 0, any
 * lengths (0 and 1 included), any strides (16-byte vector loads when the last dim is
 * contiguous and aligned, element loads otherwise).
 *
 * Work buffers: the split-KV kernels write fp32 partial states into a caller-provided
 * workspace; ca_*_workspace reports how many bytes a call needs (it reads the device's
 * SM count for the split heuristic, so it needs a working device too).
 */
#ifndef CACHEAUG_H_
#define CACHEAUG_H_

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum ca_dtype { CA_FLOAT32 = 0, CA_FLOAT16 = 1, CA_BFLOAT16 = 2 };

enum ca_status {
  CA_OK = 0,
  CA_ERR_INVALID = 1,   /* bad argument: shape, dtype, stride, pointer, unsupported Dh */
  CA_ERR_NO_DEVICE = 2, /* no usable CUDA device / driver */
  CA_ERR_CUDA = 3,      /* a CUDA call or launch failed */
};

/* Decode: q [B,Hq,Dh]; k,v [B,Hkv,Tmax,Dh]; lens [B] (int32 or int64, lens_is_int64);
 * o [B,Hq,Dh] in the input dtype; lse [B,Hq] fp32 (may be NULL). num_splits <= 0 picks
 * the heuristic. Strides are in elements: q_st[3], k_st[4], v_st[4], o_st[3], lse_st[2]. */
int ca_decode_workspace(int B, int Hq, int Hkv, int64_t Tmax, int Dh, int num_splits,
                        int* splits_out, size_t* bytes_out, char* err, size_t err_len);

int ca_decode_attention(int dtype, int B, int Hq, int Hkv, int64_t Tmax, int Dh,
                        const void* q, const int64_t* q_st,
                        const void* k, const int64_t* k_st,
                        const void* v, const int64_t* v_st,
                        const void* lens, int lens_is_int64, int64_t lens_stride,
                        void* o, const int64_t* o_st, float* lse, const int64_t* lse_st,
                        float scale, float softcap, int64_t window, int num_splits,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream,
                        char* err, size_t err_len);

/* Cascade: q [B,Hq,Dh]; k_shared,v_shared [Hkv,T,Dh] (read once per step for tiles of up
 * to 64 (request, head) rows); k_suffix,v_suffix [B,Hkv,L,Dh]; suffix_lens [B] in [0,L].
 * The shared and suffix partial states are merged exactly by log-sum-exp. */
int ca_cascade_workspace(int B, int Hq, int Hkv, int64_t T, int64_t L, int Dh, int num_splits,
                         int* shared_splits_out, int* suffix_splits_out, size_t* bytes_out,
                         char* err, size_t err_len);

int ca_cascade_decode(int dtype, int B, int Hq, int Hkv, int64_t T, int64_t L, int Dh,
                      const void* q, const int64_t* q_st,
                      const void* k_shared, const int64_t* ks_st,
                      const void* v_shared, const int64_t* vs_st,
                      const void* k_suffix, const int64_t* kx_st,
                      const void* v_suffix, const int64_t* vx_st,
                      const void* suffix_lens, int lens_is_int64, int64_t lens_stride,
                      void* o, const int64_t* o_st, float* lse, const int64_t* lse_st,
                      float scale, float softcap, int64_t window, int num_splits,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream,
                      char* err, size_t err_len);

/* merge_states over N rows of Dh: o_a/o_b/o with a row stride and an element stride,
 * lse_a/lse_b/lse fp32 with a row stride. */
int ca_merge_states(int dtype, int64_t N, int Dh,
                    const void* o_a, int64_t oa_row, int64_t oa_d, const float* lse_a, int64_t la_row,
                    const void* o_b, int64_t ob_row, int64_t ob_d, const float* lse_b, int64_t lb_row,
                    void* o, int64_t o_row, int64_t o_d, float* lse, int64_t l_row,
                    cudaStream_t stream, char* err, size_t err_len);

/* 0 when a CUDA device is usable; CA_ERR_NO_DEVICE with the runtime's reason otherwise. */
int ca_check_device(char* err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* CACHEAUG_H_ */
