// cuda_emu.cpp - the runtime of cuda_emu.h: fibers, barriers, warp shuffles, cp.async, launches.
//
// A grid runs on the calling OS thread, one block after another (reverse order in the reverse
// schedule). A block is one fiber per CUDA thread (a small x86-64 context switch; ASan is told
// about every switch). The scheduler resumes the runnable fibers in thread order (forward or
// reverse) until each blocks at a barrier or a shuffle or exits; a shuffle completes as soon as
// every lane of its mask has arrived, a barrier when no fiber can run. Any rule broken (see
// cuda_emu.h) fails the launch: cudaGetLastError returns cudaErrorLaunchFailure (or
// cudaErrorInvalidConfiguration for launch checks) and cudaGetErrorString / cuda_emu_last_message
// say what and where.
#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#error "cuda_emu: the fiber switch is written for x86-64"
#endif

// cuda_emu_switch(save, to): saves the callee-saved registers on the current stack, stores the stack
// pointer in *save, and resumes the stack `to` (the FP control state is shared: nothing changes it).
extern "C" void cuda_emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace cuda_emu {

ThreadCtx* g_thread = nullptr;
BlockCtx g_block;

namespace {

constexpr size_t kStackBytes = EMU_ASAN ? (512u << 10) : (128u << 10);
constexpr size_t kStaticSmemLimit = 48u << 10;
constexpr int kMaxThreads = 1024;

enum State { kReady, kBarrier, kShuffle, kDone };

struct Copy {
  char* dst;
  const char* src;
  size_t n, zfill;
};

struct Fiber {
  ThreadCtx ctx;
  int linear = 0, lane = 0, warp = 0;
  State state = kReady;
  const char* file = "";
  int line = 0;
  uint64_t shfl_val = 0, shfl_out = 0;
  int shfl_src = 0;
  unsigned shfl_mask = 0;
  std::vector<Copy> uncommitted;
  std::deque<std::vector<Copy>> groups;
  void* sp = nullptr;
  char* stack = nullptr;  // mmap'ed, lowest page a guard page
  void* fake_stack = nullptr;
};

struct Warp {
  int arrived = 0, size = 0;
  unsigned mask = 0;
  const char* file = "";
  int line = 0;
};

struct SharedVar {
  void* p;
  size_t bytes;
  const char* name;
  long long gen;
};

struct Config {
  bool reverse = false;
  bool defer = true;
  int sms = 132;
};

Config g_cfg;
static std::vector<Fiber> t_fibers;
static std::vector<Warp> t_warps;
static std::vector<SharedVar> t_shared;  // every __shared__ array seen so far
static long long t_gen = 0;               // block counter: a new generation per block
static size_t t_static_smem = 0;          // static shared bytes of the running kernel
static const char* t_kernel = "";
static void* t_sched_sp = nullptr;
#if EMU_ASAN
static const void* t_main_stack_bottom = nullptr;
static size_t t_main_stack_size = 0;
static bool t_from_sched = false;  // the fiber being entered comes from the scheduler's stack
#endif
static Fiber* t_cur = nullptr;
static bool t_failed = false;
static Invoke t_invoke = nullptr;
static void* t_body = nullptr;
static cudaError_t t_last = cudaSuccess;
static std::string t_msg;
static std::string t_log;

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

std::string where() {
  const BlockCtx& b = g_block;
  std::string s = fmt("kernel %s, block (%u,%u,%u)", t_kernel, b.block_idx.x, b.block_idx.y, b.block_idx.z);
  if (t_cur != nullptr)
    s += fmt(", thread (%u,%u,%u) (warp %d lane %d)", t_cur->ctx.idx.x, t_cur->ctx.idx.y, t_cur->ctx.idx.z,
             t_cur->warp, t_cur->lane);
  return s;
}

void set_error(cudaError_t e, const std::string& msg) {
  if (t_last == cudaSuccess) t_last = e;
  if (!t_failed) t_msg = msg;
  t_failed = true;
}

// fiber -> scheduler
void yield() {
  Fiber* f = t_cur;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(f->state == kDone ? nullptr : &f->fake_stack, t_main_stack_bottom,
                                 t_main_stack_size);
#endif
  cuda_emu_switch(&f->sp, t_sched_sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

// fiber -> the next runnable lane of its warp (schedule order), else the scheduler: a warp runs
// from shuffle to shuffle without a round trip through the scheduler.
void wait_in_warp() {
  Fiber* f = t_cur;
  const int base = f->warp * 32, size = t_warps[f->warp].size;
  for (int k = 1; k < size; ++k) {
    const int l = g_cfg.reverse ? (f->lane - k + size) % size : (f->lane + k) % size;
    Fiber* o = &t_fibers[base + l];
    if (o->state != kReady) continue;
    t_cur = o;
    g_thread = &o->ctx;
#if EMU_ASAN
    t_from_sched = false;
    __sanitizer_start_switch_fiber(&f->fake_stack, o->stack, kStackBytes);
    cuda_emu_switch(&f->sp, o->sp);
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#else
    cuda_emu_switch(&f->sp, o->sp);
#endif
    return;
  }
  yield();
}

void do_copies(const std::vector<Copy>& g) {
  for (const Copy& c : g) {
    memcpy(c.dst, c.src, c.n - c.zfill);
    memset(c.dst + (c.n - c.zfill), 0, c.zfill);
  }
}

void finish_pipeline(Fiber& f) {
  while (!f.groups.empty()) {
    do_copies(f.groups.front());
    f.groups.pop_front();
  }
  do_copies(f.uncommitted);
  f.uncommitted.clear();
}

void check_warp_not_waiting(const char* what) {
  Fiber& f = *t_cur;
  const Warp& w = t_warps[f.warp];
  if (w.arrived > 0 && ((w.mask >> f.lane) & 1u))
    device_fail(f.file, f.line,
                fmt("lane %d %s while lanes of its warp wait for it in a shuffle at %s:%d (divergent warp)", f.lane,
                    what, w.file, w.line)
                    .c_str());
}

[[noreturn]] void fiber_entry() {
#if EMU_ASAN
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  if (t_from_sched) {
    t_main_stack_bottom = bottom;
    t_main_stack_size = size;
  }
#endif
  t_invoke(t_body);
  Fiber& f = *t_cur;
  finish_pipeline(f);  // copies still in flight land when the thread ends
  f.file = "(thread exit)";
  f.line = 0;
  check_warp_not_waiting("exited");
  f.state = kDone;
  yield();
  abort();  // never resumed
}

char* new_stack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "cuda_emu: cannot map a fiber stack\n");
    abort();
  }
  mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
  return static_cast<char*>(p);
}

void init_fiber(Fiber& f) {
  if (f.stack == nullptr) f.stack = new_stack();
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  *--s = 0;                                            // fake return address of fiber_entry
  *--s = reinterpret_cast<uint64_t>(&fiber_entry);     // popped by `ret`: rsp % 16 == 8 at entry
  for (int i = 0; i < 6; ++i) *--s = 0;                // rbp rbx r12-r15
  f.sp = s;
  f.state = kReady;
  f.fake_stack = nullptr;
  f.uncommitted.clear();
  f.groups.clear();
}

void resume(Fiber& f) {
  t_cur = &f;
  g_thread = &f.ctx;
#if EMU_ASAN
  void* fake = nullptr;
  t_from_sched = true;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
  cuda_emu_switch(&t_sched_sp, f.sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  cuda_emu_switch(&t_sched_sp, f.sp);
#endif
  t_cur = nullptr;
  g_thread = nullptr;
}

// Nothing can run: release a barrier every live thread waits at, or report why it cannot be.
void resolve_stuck(int n) {
  int done = 0, bar = 0;
  const Fiber* first_bar = nullptr;
  for (int i = 0; i < n; ++i) {
    const Fiber& f = t_fibers[i];
    if (f.state == kShuffle) {
      const Warp& w = t_warps[f.warp];
      for (int l = 0; l < w.size; ++l) {
        const Fiber& o = t_fibers[f.warp * 32 + l];
        if (((w.mask >> l) & 1u) && o.state != kShuffle) {
          t_cur = nullptr;
          set_error(cudaErrorLaunchFailure,
                    fmt("cuda_emu: %s: warp %d: shuffle at %s:%d waits for lane %d, which %s %s:%d (divergent warp)",
                        where().c_str(), f.warp, w.file, w.line, l, o.state == kDone ? "exited at" : "waits at",
                        o.file, o.line));
          return;
        }
      }
    }
    if (f.state == kDone) ++done;
    if (f.state == kBarrier) {
      ++bar;
      if (first_bar == nullptr) first_bar = &f;
    }
  }
  if (bar == 0) return;
  if (done > 0) {
    set_error(cudaErrorLaunchFailure,
              fmt("cuda_emu: %s: __syncthreads at %s:%d reached by %d threads after %d threads of the block exited",
                  where().c_str(), first_bar->file, first_bar->line, bar, done));
    return;
  }
  for (int i = 0; i < n; ++i) {
    const Fiber& f = t_fibers[i];
    if (f.line != first_bar->line || (f.file != first_bar->file && strcmp(f.file, first_bar->file) != 0)) {
      set_error(cudaErrorLaunchFailure,
                fmt("cuda_emu: %s: divergent __syncthreads: thread %d waits at %s:%d, thread %d at %s:%d",
                    where().c_str(), first_bar->linear, first_bar->file, first_bar->line, f.linear, f.file, f.line));
      return;
    }
  }
  for (int i = 0; i < n; ++i) t_fibers[i].state = kReady;
}

void run_block(int n) {
  ++t_gen;
  for (int i = 0; i < n; ++i) init_fiber(t_fibers[i]);
  for (Warp& w : t_warps) w.arrived = 0;
  while (!t_failed) {
    bool ran = false, all_done = true;
    for (int k = 0; k < n && !t_failed; ++k) {
      Fiber& f = t_fibers[g_cfg.reverse ? n - 1 - k : k];
      if (f.state == kReady) {
        resume(f);
        ran = true;
      }
      if (f.state != kDone) all_done = false;
    }
    if (t_failed || all_done) return;
    if (!ran) resolve_stuck(n);
  }
}

}  // namespace

[[noreturn]] void device_fail(const char* file, int line, const char* what) {
  set_error(cudaErrorLaunchFailure, fmt("cuda_emu: %s: %s:%d: %s", where().c_str(), file, line, what));
  if (t_cur == nullptr) {
    fprintf(stderr, "%s\n", t_msg.c_str());
    abort();
  }
  t_cur->state = kDone;  // abandoned: the scheduler stops the block
  yield();
  abort();
}

void syncthreads(const char* file, int line) {
  Fiber& f = *t_cur;
  f.file = file;
  f.line = line;
  check_warp_not_waiting("waits at __syncthreads");
  f.state = kBarrier;
  wait_in_warp();
}

uint64_t shfl_bits(const char* file, int line, int kind, unsigned mask, uint64_t bits, int arg, int width) {
  Fiber& f = *t_cur;
  Warp& w = t_warps[f.warp];
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    device_fail(file, line, fmt("shuffle width %d is not a power of 2 in [1, 32]", width).c_str());
  if (!((mask >> f.lane) & 1u))
    device_fail(file, line, fmt("lane %d calls a shuffle with mask 0x%08x, which leaves it out", f.lane, mask).c_str());
  if (w.size < 32 && (mask >> w.size) != 0)
    device_fail(file, line, fmt("shuffle mask 0x%08x names lanes past the warp's %d threads", mask, w.size).c_str());
  const int seg = f.lane & ~(width - 1);
  int src = f.lane;
  switch (kind) {
    case kShflIdx: src = seg + (arg & (width - 1)); break;
    case kShflXor: src = f.lane ^ arg; if (src < seg || src >= seg + width) src = f.lane; break;
    case kShflDown: src = f.lane + arg; if (src >= seg + width) src = f.lane; break;
    default: src = f.lane - arg; if (src < seg) src = f.lane; break;
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.file = file;
    w.line = line;
    for (int l = 0; l < w.size; ++l) {
      const Fiber& o = t_fibers[f.warp * 32 + l];
      if (((mask >> l) & 1u) && o.state == kDone)
        device_fail(file, line, fmt("shuffle with mask 0x%08x: lane %d has exited", mask, l).c_str());
      if (((mask >> l) & 1u) && o.state == kBarrier)
        device_fail(file, line,
                    fmt("shuffle with mask 0x%08x: lane %d waits at __syncthreads %s:%d (divergent warp)", mask, l,
                        o.file, o.line)
                        .c_str());
    }
  } else if (w.mask != mask || w.line != line || (w.file != file && strcmp(w.file, file) != 0)) {
    device_fail(file, line,
                fmt("divergent shuffles: this lane (mask 0x%08x) and lanes at %s:%d (mask 0x%08x)", mask, w.file,
                    w.line, w.mask)
                    .c_str());
  }
  f.file = file;
  f.line = line;
  f.shfl_val = bits;
  f.shfl_src = src;
  f.shfl_mask = mask;
  if (++w.arrived < __builtin_popcount(mask)) {
    f.state = kShuffle;
    wait_in_warp();
    return f.shfl_out;
  }
  // the last lane of the mask: every lane's value is in, deliver the results
  for (int l = 0; l < w.size; ++l) {
    if (!((mask >> l) & 1u)) continue;
    Fiber& o = t_fibers[f.warp * 32 + l];
    if (!((mask >> o.shfl_src) & 1u))
      device_fail(file, line,
                  fmt("lane %d reads lane %d, which is not in the shuffle mask 0x%08x", l, o.shfl_src, mask).c_str());
    o.shfl_out = t_fibers[f.warp * 32 + o.shfl_src].shfl_val;
    if (&o != &f) o.state = kReady;
  }
  w.arrived = 0;
  return f.shfl_out;
}

void register_shared(void* p, size_t bytes, const char* name) {
  for (SharedVar& v : t_shared) {
    if (v.p != p) continue;
    if (v.gen != t_gen) {  // the first thread of this block to get here
      memset(p, 0xFF, bytes);
      v.gen = t_gen;
    }
    return;
  }
  t_shared.push_back({p, bytes, name, t_gen});
  memset(p, 0xFF, bytes);
  t_static_smem += bytes;
  if (t_static_smem > kStaticSmemLimit)
    device_fail(__FILE__, __LINE__,
                fmt("static shared memory %zu bytes (with __shared__ %s) > 48 KiB", t_static_smem, name).c_str());
}

static bool in_shared(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  for (const SharedVar& v : t_shared) {
    const char* b = static_cast<const char*>(v.p);
    if (v.gen == t_gen && c >= b && c + n <= b + v.bytes) return true;
  }
  return false;
}

void pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill, const char* file, int line) {
  if (size != 4 && size != 8 && size != 16)
    device_fail(file, line, fmt("cp.async of %zu bytes (4, 8 or 16 only)", size).c_str());
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0)
    device_fail(file, line, fmt("misaligned cp.async of %zu bytes: dst %p src %p", size, dst, src).c_str());
  if (zfill > size) device_fail(file, line, "cp.async zero-fill larger than the copy");
  if (!in_shared(dst, size)) device_fail(file, line, "cp.async destination is not in this block's shared memory");
  Copy c{static_cast<char*>(dst), static_cast<const char*>(src), size, zfill};
  if (g_cfg.defer) {
    t_cur->uncommitted.push_back(c);
  } else {
    do_copies({c});
  }
}

void pipeline_commit() {
  Fiber& f = *t_cur;
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void pipeline_wait_prior(size_t n) {
  Fiber& f = *t_cur;
  while (f.groups.size() > n) {
    do_copies(f.groups.front());
    f.groups.pop_front();
  }
}

void run_grid(int bound, const char* name, dim3 grid, dim3 block, size_t dyn_smem, Invoke invoke, void* body) {
  t_kernel = name;
  t_failed = false;
  t_cur = nullptr;
  g_block.block_idx = make_uint3(0, 0, 0);
  const long long threads = (long long)block.x * block.y * block.z;
  std::string bad;
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
    bad = fmt("grid (%u,%u,%u): x must be in [1, 2^31-1], y and z in [1, 65535]", grid.x, grid.y, grid.z);
  else if (threads < 1 || threads > kMaxThreads || block.z > 64)
    bad = fmt("block (%u,%u,%u): 1 to 1024 threads, z <= 64", block.x, block.y, block.z);
  else if (threads > bound)
    bad = fmt("%lld threads per block > __launch_bounds__(%d)", threads, bound);
  else if (dyn_smem > kStaticSmemLimit)
    bad = fmt("%zu bytes of dynamic shared memory > 48 KiB", dyn_smem);
  t_log += fmt("%s grid=(%u,%u,%u) block=(%u,%u,%u)\n", name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
  if (!bad.empty()) {
    set_error(cudaErrorInvalidConfiguration, fmt("cuda_emu: launch of %s: %s", name, bad.c_str()));
    return;
  }
  const int n = (int)threads;
  if ((int)t_fibers.size() < kMaxThreads) t_fibers.resize(kMaxThreads);
  t_warps.assign((n + 31) / 32, Warp{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = t_fibers[i];
    f.linear = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.ctx.idx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.file = "";
    f.line = 0;
  }
  for (int w = 0; w < (int)t_warps.size(); ++w) t_warps[w].size = n - 32 * w < 32 ? n - 32 * w : 32;
  t_invoke = invoke;
  t_body = body;
  t_static_smem = 0;
  for (SharedVar& v : t_shared) v.gen = -1;  // a new kernel counts its own static shared memory
  t_shared.clear();
  g_block.block_dim = block;
  g_block.grid_dim = grid;
  const long long nblocks = (long long)grid.x * grid.y * grid.z;
  for (long long k = 0; k < nblocks && !t_failed; ++k) {
    const long long b = g_cfg.reverse ? nblocks - 1 - k : k;
    g_block.block_idx = make_uint3((unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                                   (unsigned)(b / ((long long)grid.x * grid.y)));
    run_block(n);
  }
}

}  // namespace cuda_emu

// ---------------------------------------------------------------- the runtime calls the launcher makes

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = cuda_emu::g_cfg.sms;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuda_emu::t_last;
  cuda_emu::t_last = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (!cuda_emu::t_msg.empty()) return cuda_emu::t_msg.c_str();
  return "cuda_emu: error";
}

// ---------------------------------------------------------------- the driver's controls (ctypes)

// reverse: run threads and blocks in reverse order; defer: hold cp.async back until the wait.
// sms: the SM count cudaDeviceGetAttribute reports (read once by the launcher: set it first).
void cuda_emu_configure(int reverse, int defer, int sms) {
  cuda_emu::g_cfg.reverse = reverse != 0;
  cuda_emu::g_cfg.defer = defer != 0;
  if (sms > 0) cuda_emu::g_cfg.sms = sms;
}

// The message of the last failure (empty if none) and the launches since the last reset.
const char* cuda_emu_last_message(void) { return cuda_emu::t_msg.c_str(); }
const char* cuda_emu_launch_log(void) { return cuda_emu::t_log.c_str(); }
void cuda_emu_reset(void) {
  cuda_emu::t_msg.clear();
  cuda_emu::t_log.clear();
  cuda_emu::t_last = cudaSuccess;
}

}  // extern "C"
