// The emulator's own checks: one small kernel per rule cuda_emu enforces (and a few that must pass).
// selftest(name, reverse, defer, out) launches kernel `name` and returns "ok" or the launch error.
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstring>

__global__ void bar_ok(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[63 - threadIdx.x];
}

__global__ void bar_missing(float* out) {  // reads another warp's write without a barrier
  __shared__ float s[64];
  s[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = s[63 - threadIdx.x];
}

__global__ void bar_divergent(float*) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void bar_after_exit(float*) {
  if (threadIdx.x == 3) return;
  __syncthreads();
}

__global__ void shfl_ok(float* out) {
  float v = (float)threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31;
  out[threadIdx.x] = v + 1000.f * __shfl_sync(0xffffffffu, (float)lane, 31 - lane) +
                     1e5f * __shfl_down_sync(0xffffffffu, (float)lane, 1, 16);
}

__global__ void shfl_half_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffu, 1.f, 1); }

__global__ void shfl_exited(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void shfl_divergent(float* out) {
  float v = 1.f;
  if (threadIdx.x & 1) {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void shfl_src_outside_mask(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xffffu, 1.f, 20);
}

__global__ void cp_async_ok(const float* src, float* out) {
  __shared__ __align__(16) float s[256];
  __pipeline_memcpy_async(s + 4 * threadIdx.x, src + 4 * threadIdx.x, 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
  out[threadIdx.x] = s[(4 * threadIdx.x + 4) % 256];
}

__global__ void cp_async_missing_wait(const float* src, float* out) {
  __shared__ __align__(16) float s[256];
  __pipeline_memcpy_async(s + 4 * threadIdx.x, src + 4 * threadIdx.x, 16);
  __pipeline_commit();
  __syncthreads();
  out[threadIdx.x] = s[(4 * threadIdx.x + 4) % 256];
  __pipeline_wait_prior(0);
}

__global__ void cp_async_misaligned(const float* src, float*) {
  __shared__ __align__(16) float s[256];
  __pipeline_memcpy_async(s + 1, src, 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

__global__ void smem_is_poisoned(const float*, float* out) {
  __shared__ float s[64];
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void smem_too_big(float*) {
  __shared__ char s[49 * 1024];
  s[threadIdx.x] = 0;
}

__global__ void __launch_bounds__(32) bounded(float*) {}

__global__ void grid_y(float* out) {
  if (blockIdx.y == gridDim.y - 1 && threadIdx.x == 0) out[0] = (float)gridDim.y;
}

extern "C" const char* selftest(const char* name, float* src, float* out) {
  const dim3 b64(64);
  if (!strcmp(name, "bar_ok")) bar_ok<<<1, b64>>>(out);
  else if (!strcmp(name, "bar_missing")) bar_missing<<<1, b64>>>(out);
  else if (!strcmp(name, "bar_divergent")) bar_divergent<<<1, b64>>>(out);
  else if (!strcmp(name, "bar_after_exit")) bar_after_exit<<<1, b64>>>(out);
  else if (!strcmp(name, "shfl_ok")) shfl_ok<<<1, b64>>>(out);
  else if (!strcmp(name, "shfl_half_mask")) shfl_half_mask<<<1, b64>>>(out);
  else if (!strcmp(name, "shfl_exited")) shfl_exited<<<1, b64>>>(out);
  else if (!strcmp(name, "shfl_divergent")) shfl_divergent<<<1, b64>>>(out);
  else if (!strcmp(name, "shfl_src_outside_mask")) shfl_src_outside_mask<<<1, b64>>>(out);
  else if (!strcmp(name, "cp_async_ok")) cp_async_ok<<<1, b64>>>(src, out);
  else if (!strcmp(name, "cp_async_missing_wait")) cp_async_missing_wait<<<1, b64>>>(src, out);
  else if (!strcmp(name, "cp_async_misaligned")) cp_async_misaligned<<<1, b64>>>(src, out);
  else if (!strcmp(name, "smem_is_poisoned")) smem_is_poisoned<<<1, b64>>>(src, out);
  else if (!strcmp(name, "smem_too_big")) smem_too_big<<<1, b64>>>(out);
  else if (!strcmp(name, "bounded_ok")) bounded<<<1, 32>>>(out);
  else if (!strcmp(name, "bounded_over")) bounded<<<1, 64>>>(out);
  else if (!strcmp(name, "threads_over")) bar_ok<<<1, 2048>>>(out);
  else if (!strcmp(name, "grid_y_ok")) grid_y<<<dim3(1, 65535), 32>>>(out);
  else if (!strcmp(name, "grid_y_over")) grid_y<<<dim3(1, 65536), 32>>>(out);
  else return "unknown self-test";
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "ok" : cudaGetErrorString(e);
}
