// Emulated <cuda_pipeline.h> (found before the real one on the include path): the cp.async
// primitives of the CUDA pipeline API, implemented by cuda_emu.cpp (held back until the wait or
// done at once, per the schedule; size and alignment checked).
#pragma once

#include "../cuda_emu.h"

#define __pipeline_memcpy_async(dst, src, ...) \
  ::cuda_emu::pipeline_memcpy_async_at(__FILE__, __LINE__, dst, src, __VA_ARGS__)
#define __pipeline_commit() ::cuda_emu::pipeline_commit()
#define __pipeline_wait_prior(n) ::cuda_emu::pipeline_wait_prior(n)

namespace cuda_emu {
inline void pipeline_memcpy_async_at(const char* file, int line, void* dst, const void* src, size_t size,
                                     size_t zfill = 0) {
  pipeline_memcpy_async(dst, src, size, zfill, file, line);
}
}  // namespace cuda_emu
