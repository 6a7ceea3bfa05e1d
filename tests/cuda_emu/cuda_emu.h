// cuda_emu.h - run CUDA C++ device code on the CPU (force-included with g++ -include).
//
// The CUDA sources are compiled as host C++ by g++ against the real CUDA headers (types, fp16/bf16
// host conversions); this header adds what device code needs and the host compiler lacks:
//   - threadIdx / blockIdx / blockDim / gridDim (per emulated thread), warpSize;
//   - one fiber per CUDA thread; the blocks of a grid run one after another (cuda_emu.cpp);
//   - __syncthreads(): a counting barrier that fails on threads waiting at different call sites
//     or after other threads of the block exited;
//   - __shfl_sync / __shfl_xor_sync / __shfl_down_sync / __shfl_up_sync: a rendezvous of the lanes
//     in the mask, failing on a caller outside the mask, an exited lane, a lane waiting elsewhere
//     (divergent call sites) or a source lane outside the mask;
//   - __shared__ arrays: static storage (one block runs at a time), filled with 0xFF (NaN for
//     floats) when a block first reaches the declaration; 48 KiB static limit checked;
//   - cp.async (__pipeline_memcpy_async / _commit / _wait_prior, include/cuda_pipeline.h): done at
//     once or held back until the wait (the schedule), with size and alignment checks;
//   - kernel launches (the build rewrites k<<<g, b, smem, s>>>(args) into cuda_emu::launch):
//     grid y/z <= 65535, threads <= 1024 and <= __launch_bounds__, shared memory <= 48 KiB;
//   - the few runtime calls the launcher makes (cudaGetDevice, cudaDeviceGetAttribute,
//     cudaGetLastError, cudaGetErrorString).
// Numerics: __expf/__logf are expf/logf (no fast-math approximations); see README.md.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_runtime.h>  // the real header: dim3, uint4, float4, cudaError_t (host declarations only)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __device__
#define __device__

namespace cuda_emu {

struct ThreadCtx {
  uint3 idx;  // threadIdx of the running fiber
};

struct BlockCtx {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};

extern ThreadCtx* g_thread __attribute__((visibility("hidden")));  // the running fiber's context (one grid runs at a time)
extern BlockCtx g_block __attribute__((visibility("hidden")));

enum ShflKind { kShflIdx = 0, kShflXor = 1, kShflDown = 2, kShflUp = 3 };

void syncthreads(const char* file, int line);
uint64_t shfl_bits(const char* file, int line, int kind, unsigned mask, uint64_t bits, int arg, int width);
void register_shared(void* p, size_t bytes, const char* name);
void pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill, const char* file, int line);
void pipeline_commit();
void pipeline_wait_prior(size_t n);
[[noreturn]] void device_fail(const char* file, int line, const char* what);

template <typename T>
inline T shfl(const char* file, int line, int kind, unsigned mask, T v, int arg, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = shfl_bits(file, line, kind, mask, bits, arg, width);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

// One grid: fibers run `invoke(body)` for every thread of every block.
using Invoke = void (*)(void*);
void run_grid(int bound, const char* name, dim3 grid, dim3 block, size_t dyn_smem, Invoke invoke, void* body);

template <typename F>
void invoke_body(void* f) {
  (*static_cast<F*>(f))();
}

// The launch configuration <<<grid, block[, smem[, stream]]>>>.
struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  LaunchCfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

// kernel<<<cfg>>>(args...): arguments are copied once, converted to the kernel's parameter
// types (as a launch does), and every thread gets its own copy of them.
template <typename... P, typename... A>
void launch(int bound, const char* name, void (*kernel)(P...), const LaunchCfg& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto body = [&]() { std::apply(kernel, params); };
  run_grid(bound, name, cfg.grid, cfg.block, cfg.smem, &invoke_body<decltype(body)>, &body);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::g_thread->idx)
#define blockIdx (::cuda_emu::g_block.block_idx)
#define blockDim (::cuda_emu::g_block.block_dim)
#define gridDim (::cuda_emu::g_block.grid_dim)
#define warpSize 32

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(mask, v, lane, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflIdx, mask, v, lane, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lanemask, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflXor, mask, v, lanemask, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflDown, mask, v, delta, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflUp, mask, v, delta, ##__VA_ARGS__)

// Device math the host compiler lacks. The __ intrinsics are the exact libm functions here.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __int_as_float(int x) {
  float f;
  memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float x) {
  int i;
  memcpy(&i, &x, 4);
  return i;
}
inline double __longlong_as_double(long long x) {
  double d;
  memcpy(&d, &x, 8);
  return d;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
