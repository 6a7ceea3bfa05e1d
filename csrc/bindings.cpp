// pybind11 module cacheaug_engine._C: thin glue over the C launcher API (cacheaug.h).
//
// Every function takes device pointers and the CUDA stream as Python ints, strides in
// elements as sequences, and raises NoCudaDeviceError (a RuntimeError) when no usable GPU
// or driver is present, ValueError for bad arguments and RuntimeError for CUDA failures.
// Nothing here touches CUDA at import time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cacheaug.h"

namespace py = pybind11;

namespace {

using Strides = std::vector<int64_t>;

struct NoCudaDevice : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct InvalidArg : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

void raise_for(int rc, const char* err) {
  if (rc == CA_OK) return;
  std::string msg = std::string("cacheaug_engine._C: ") + err;
  if (rc == CA_ERR_NO_DEVICE) throw NoCudaDevice(msg);
  if (rc == CA_ERR_INVALID) throw InvalidArg(msg);
  throw std::runtime_error(msg);
}

const int64_t* need(const Strides& s, size_t n, const char* name) {
  if (s.size() != n)
    throw InvalidArg(std::string("cacheaug_engine._C: ") + name + " needs " + std::to_string(n) + " strides, got " +
                     std::to_string(s.size()));
  return s.data();
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check_device() {
  char err[512] = {0};
  raise_for(ca_check_device(err, sizeof(err)), err);
}

std::tuple<int, size_t> decode_workspace(int B, int Hq, int Hkv, int64_t Tmax, int Dh, int num_splits) {
  char err[512] = {0};
  int splits = 0;
  size_t bytes = 0;
  raise_for(ca_decode_workspace(B, Hq, Hkv, Tmax, Dh, num_splits, &splits, &bytes, err, sizeof(err)), err);
  return {splits, bytes};
}

std::tuple<int, int, size_t> cascade_workspace(int B, int Hq, int Hkv, int64_t T, int64_t L, int Dh, int num_splits) {
  char err[512] = {0};
  int sa = 0, sb = 0;
  size_t bytes = 0;
  raise_for(ca_cascade_workspace(B, Hq, Hkv, T, L, Dh, num_splits, &sa, &sb, &bytes, err, sizeof(err)), err);
  return {sa, sb, bytes};
}

void decode_attention(int dtype, int B, int Hq, int Hkv, int64_t Tmax, int Dh, uintptr_t q, const Strides& q_st,
                      uintptr_t k, const Strides& k_st, uintptr_t v, const Strides& v_st, uintptr_t lens,
                      bool lens_is_int64, int64_t lens_stride, uintptr_t o, const Strides& o_st, uintptr_t lse,
                      const Strides& lse_st, float scale, float softcap, int64_t window, int num_splits,
                      uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
  const int64_t* qs = need(q_st, 3, "q");
  const int64_t* ks = need(k_st, 4, "k");
  const int64_t* vs = need(v_st, 4, "v");
  const int64_t* os = need(o_st, 3, "o");
  const int64_t* ls = lse ? need(lse_st, 2, "lse") : nullptr;
  char err[512] = {0};
  int rc;
  {
    py::gil_scoped_release release;
    rc = ca_decode_attention(dtype, B, Hq, Hkv, Tmax, Dh, ptr<const void>(q), qs, ptr<const void>(k), ks,
                             ptr<const void>(v), vs, ptr<const void>(lens), lens_is_int64 ? 1 : 0, lens_stride,
                             ptr<void>(o), os, ptr<float>(lse), ls, scale, softcap, window, num_splits,
                             ptr<void>(workspace), workspace_bytes, stream_of(stream), err, sizeof(err));
  }
  raise_for(rc, err);
}

void cascade_decode(int dtype, int B, int Hq, int Hkv, int64_t T, int64_t L, int Dh, uintptr_t q, const Strides& q_st,
                    uintptr_t ks, const Strides& ks_st, uintptr_t vs, const Strides& vs_st, uintptr_t kx,
                    const Strides& kx_st, uintptr_t vx, const Strides& vx_st, uintptr_t lens, bool lens_is_int64,
                    int64_t lens_stride, uintptr_t o, const Strides& o_st, uintptr_t lse, const Strides& lse_st,
                    float scale, float softcap, int64_t window, int num_splits, uintptr_t workspace,
                    size_t workspace_bytes, uintptr_t stream) {
  const int64_t* qs = need(q_st, 3, "q");
  const int64_t* kss = need(ks_st, 3, "k_shared");
  const int64_t* vss = need(vs_st, 3, "v_shared");
  const int64_t* kxs = need(kx_st, 4, "k_suffix");
  const int64_t* vxs = need(vx_st, 4, "v_suffix");
  const int64_t* os = need(o_st, 3, "o");
  const int64_t* ls = lse ? need(lse_st, 2, "lse") : nullptr;
  char err[512] = {0};
  int rc;
  {
    py::gil_scoped_release release;
    rc = ca_cascade_decode(dtype, B, Hq, Hkv, T, L, Dh, ptr<const void>(q), qs, ptr<const void>(ks), kss,
                           ptr<const void>(vs), vss, ptr<const void>(kx), kxs, ptr<const void>(vx), vxs,
                           ptr<const void>(lens), lens_is_int64 ? 1 : 0, lens_stride, ptr<void>(o), os,
                           ptr<float>(lse), ls, scale, softcap, window, num_splits, ptr<void>(workspace),
                           workspace_bytes, stream_of(stream), err, sizeof(err));
  }
  raise_for(rc, err);
}

void merge_states(int dtype, int64_t N, int Dh, uintptr_t o_a, int64_t oa_row, int64_t oa_d, uintptr_t lse_a,
                  int64_t la_row, uintptr_t o_b, int64_t ob_row, int64_t ob_d, uintptr_t lse_b, int64_t lb_row,
                  uintptr_t o, int64_t o_row, int64_t o_d, uintptr_t lse, int64_t l_row, uintptr_t stream) {
  char err[512] = {0};
  int rc;
  {
    py::gil_scoped_release release;
    rc = ca_merge_states(dtype, N, Dh, ptr<const void>(o_a), oa_row, oa_d, ptr<const float>(lse_a), la_row,
                         ptr<const void>(o_b), ob_row, ob_d, ptr<const float>(lse_b), lb_row, ptr<void>(o), o_row, o_d,
                         ptr<float>(lse), l_row, stream_of(stream), err, sizeof(err));
  }
  raise_for(rc, err);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cacheaug_engine CUDA kernels (decode, cascade decode, merge_states) on raw device pointers";
  // std::invalid_argument -> ValueError and std::runtime_error -> RuntimeError by default.
  py::register_exception<NoCudaDevice>(m, "NoCudaDeviceError", PyExc_RuntimeError);
  m.attr("FLOAT32") = static_cast<int>(CA_FLOAT32);
  m.attr("FLOAT16") = static_cast<int>(CA_FLOAT16);
  m.attr("BFLOAT16") = static_cast<int>(CA_BFLOAT16);
  m.attr("HEAD_DIMS") = py::make_tuple(64, 128, 256);
  m.def("check_device", &check_device, "Raise NoCudaDeviceError unless a CUDA device is usable.");
  m.def("decode_workspace", &decode_workspace, "(splits, workspace bytes) for decode_attention",
        py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Tmax"), py::arg("Dh"), py::arg("num_splits") = 0);
  m.def("cascade_workspace", &cascade_workspace,
        "(shared splits, suffix splits, workspace bytes) for cascade_decode", py::arg("B"), py::arg("Hq"),
        py::arg("Hkv"), py::arg("T"), py::arg("L"), py::arg("Dh"), py::arg("num_splits") = 0);
  m.def("decode_attention", &decode_attention, "Split-KV decode attention (see csrc/cacheaug.h).");
  m.def("cascade_decode", &cascade_decode, "Shared-prefix + suffix decode with an exact LSE merge.");
  m.def("merge_states", &merge_states, "Exact log-sum-exp merge of two attention states.");
}
