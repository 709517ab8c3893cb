// Depthwise convolution on CPU through oneDNN, as XLA FFI custom calls.
//
// Built by `make kernels` (g++, Debian's libdnnl-dev, jax.ffi.include_dir()) into
// _dnnl_depthwise.so next to this file; `kernels.py` loads it when present. Three
// handlers, float32, NHWC activations and the (k, k, 1, C) kernel of the JAX model:
//   DnnlDepthwiseFwd         y  = conv(x, w)
//   DnnlDepthwiseBwdData     dx = d conv / dx applied to dy
//   DnnlDepthwiseBwdWeights  dw = d conv / dw applied to dy
// A depthwise conv is a grouped conv with groups = C and one input and one output
// channel per group; in oneDNN's logical (g, o, i, h, w) order the kernel's memory
// (h, w, 1, C) is the `hwigo` layout. oneDNN picks its own weights layout (`any`; with
// `hwigo` itself it falls back to im2col + GEMM), so the small kernel is reordered on
// the way in and its gradient on the way out; activations stay NHWC. Primitives are
// created once per shape and cached (creating one costs far more than running it).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

struct Geometry {
  int64_t n, h, w, c, k, oh, ow, stride, pt, pb, pl, pr;
  std::string Key(int kind) const {
    return std::to_string(kind) + ":" + std::to_string(n) + "," + std::to_string(h) + "," +
           std::to_string(w) + "," + std::to_string(c) + "," + std::to_string(k) + "," +
           std::to_string(stride) + "," + std::to_string(pt) + "," + std::to_string(pb) + "," +
           std::to_string(pl) + "," + std::to_string(pr);
  }
  memory::desc Src() const { return {{n, c, h, w}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Dst() const { return {{n, c, oh, ow}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Wei(Tag tag = Tag::hwigo) const {
    return {{c, 1, 1, k, k}, memory::data_type::f32, tag};
  }
  memory::dims Strides() const { return {stride, stride}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  dnnl::convolution_forward::desc desc(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.Wei(Tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR());
  return dnnl::convolution_forward::primitive_desc(desc, Engine());
}

struct Entry {
  std::unique_ptr<dnnl::primitive> primitive;
  memory::desc weights;  // the layout the primitive reads or writes the kernel in
  std::string impl;
};

// kind 0: forward, 1: backward data, 2: backward weights.
Entry MakeEntry(const Geometry& g, int kind) {
  auto fwd = ForwardPd(g);
  if (kind == 0) {
    return {std::make_unique<dnnl::convolution_forward>(fwd), fwd.weights_desc(),
            fwd.impl_info_str()};
  }
  if (kind == 1) {
    dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, g.Src(),
                                               g.Wei(Tag::any), g.Dst(), g.Strides(),
                                               g.PadL(), g.PadR());
    dnnl::convolution_backward_data::primitive_desc pd(desc, Engine(), fwd);
    return {std::make_unique<dnnl::convolution_backward_data>(pd), pd.weights_desc(),
            pd.impl_info_str()};
  }
  dnnl::convolution_backward_weights::desc desc(dnnl::algorithm::convolution_direct, g.Src(),
                                                g.Wei(Tag::any), g.Dst(), g.Strides(),
                                                g.PadL(), g.PadR());
  dnnl::convolution_backward_weights::primitive_desc pd(desc, Engine(), fwd);
  return {std::make_unique<dnnl::convolution_backward_weights>(pd), pd.diff_weights_desc(),
          pd.impl_info_str()};
}

const Entry& Cached(const Geometry& g, int kind) {
  static std::mutex mu;
  static std::map<std::string, Entry> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(g.Key(kind));
  if (it == cache.end()) it = cache.emplace(g.Key(kind), MakeEntry(g, kind)).first;
  return it->second;
}

// x: (n, h, w, c) and y: (n, oh, ow, c) give the geometry; the kernel is (k, k, 1, c).
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, int64_t k,
                      int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], k, y[1], y[2], stride, pt, pb, pl, pr};
}

ffi::Error Run(const Geometry& g, int kind, void* src_or_dst_a, void* weights,
               void* src_or_dst_b) {
  try {
    const Entry& entry = Cached(g, kind);
    dnnl::stream stream(Engine());
    memory user_weights(g.Wei(), Engine(), weights);
    memory weights_mem = user_weights;
    if (entry.weights != g.Wei()) weights_mem = memory(entry.weights, Engine());
    if (kind != 2 && entry.weights != g.Wei()) {
      dnnl::reorder(user_weights, weights_mem).execute(stream, user_weights, weights_mem);
    }
    std::unordered_map<int, memory> args;
    if (kind == 0) {  // a = x, b = y
      args = {{DNNL_ARG_SRC, memory(g.Src(), Engine(), src_or_dst_a)},
              {DNNL_ARG_WEIGHTS, weights_mem},
              {DNNL_ARG_DST, memory(g.Dst(), Engine(), src_or_dst_b)}};
    } else if (kind == 1) {  // a = dy, b = dx
      args = {{DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), src_or_dst_a)},
              {DNNL_ARG_WEIGHTS, weights_mem},
              {DNNL_ARG_DIFF_SRC, memory(g.Src(), Engine(), src_or_dst_b)}};
    } else {  // a = x, b = dy; weights = dw (written)
      args = {{DNNL_ARG_SRC, memory(g.Src(), Engine(), src_or_dst_a)},
              {DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), src_or_dst_b)},
              {DNNL_ARG_DIFF_WEIGHTS, weights_mem}};
    }
    entry.primitive->execute(stream, args);
    if (kind == 2 && entry.weights != g.Wei()) {
      dnnl::reorder(weights_mem, user_weights).execute(stream, weights_mem, user_weights);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
               int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), w.dimensions()[0], stride, pt, pb,
                            pl, pr);
  return Run(g, 0, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error BwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), w.dimensions()[0], stride, pt,
                            pb, pl, pr);
  return Run(g, 1, dy.typed_data(), w.typed_data(), dx->typed_data());
}

ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), dw->dimensions()[0], stride, pt,
                            pb, pl, pr);
  return Run(g, 2, x.typed_data(), dw->typed_data(), dy.typed_data());
}

auto Bind() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlDepthwiseFwd, Fwd, Bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlDepthwiseBwdData, BwdData, Bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlDepthwiseBwdWeights, BwdWeights, Bind());

// Which oneDNN implementation serves a shape (e.g. "jit_dw:avx512_core"), for tests and
// benchmarks: a reference ("ref:any") implementation would be orders of magnitude slower.
extern "C" const char* DnnlDepthwiseImplInfo(int64_t n, int64_t h, int64_t w, int64_t c,
                                             int64_t k, int64_t stride, int64_t pt, int64_t pb,
                                             int64_t pl, int64_t pr, int kind) {
  static thread_local std::string info;
  const int64_t oh = (h + pt + pb - k) / stride + 1, ow = (w + pl + pr - k) / stride + 1;
  try {
    info = Cached(Geometry{n, h, w, c, k, oh, ow, stride, pt, pb, pl, pr}, kind).impl;
  } catch (const dnnl::error& e) {
    info = std::string("error: ") + e.what();
  }
  return info.c_str();
}
