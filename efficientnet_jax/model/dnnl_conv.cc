// Convolutions on CPU through oneDNN, as XLA FFI custom calls: depthwise (groups = C)
// and ordinary (groups = 1) ones.
//
// Built by `make kernels` (g++, Debian's libdnnl-dev, jax.ffi.include_dir()) into
// _dnnl_conv.so next to this file; `dnnl.py` loads it when present. The source compiles
// against oneDNN 2.x (Debian bookworm's 2.6.3) and 3.x (checked with PyPI's
// onednn-devel-cpu-gomp 3.2), whose primitive-descriptor constructors differ. Three handlers,
// float32, NHWC activations and the JAX model's HWIO kernel, (k, k, 1, C) for a
// depthwise conv and (k, k, Cin, Cout) otherwise (the groups follow from the shapes):
//   DnnlConvFwd         y  = conv(x, w)
//   DnnlConvBwdData     dx = d conv / dx applied to dy
//   DnnlConvBwdWeights  dw = d conv / dw applied to dy
// In oneDNN's logical (g, o, i, h, w) order a depthwise kernel's memory (h, w, 1, C) is
// the `hwigo` layout, and an ordinary kernel (o, i, h, w) is `hwio`. oneDNN picks its
// own weights layout (`any`: with `hwigo` itself it falls back to im2col + GEMM), so the
// small kernel is reordered on the way in and its gradient on the way out; activations
// stay NHWC. Primitives are created once per shape and cached (creating one costs far
// more than running it).

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
  int64_t n, h, w, c, co, k, oh, ow, stride, pt, pb, pl, pr;
  int64_t groups_;
  std::string Key(int kind) const {
    std::string key = std::to_string(kind);
    for (int64_t v : {n, h, w, c, co, k, stride, pt, pb, pl, pr, groups_}) {
      key += "," + std::to_string(v);
    }
    return key;
  }
  memory::desc Src() const { return {{n, c, h, w}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Dst() const { return {{n, co, oh, ow}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Wei(Tag tag = Tag::undef) const {
    if (groups_ > 1) {
      return {{groups_, co / groups_, c / groups_, k, k}, memory::data_type::f32,
              tag == Tag::undef ? Tag::hwigo : tag};
    }
    return {{co, c, k, k}, memory::data_type::f32, tag == Tag::undef ? Tag::hwio : tag};
  }
  memory::dims Strides() const { return {stride, stride}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN 3 builds primitive descriptors directly; oneDNN 2 goes through an op descriptor.
dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.Src(), g.Wei(Tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR());
#else
  dnnl::convolution_forward::desc desc(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.Wei(Tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR());
  return dnnl::convolution_forward::primitive_desc(desc, Engine());
#endif
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
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Wei(Tag::any), g.Dst(),
        g.Strides(), g.PadL(), g.PadR(), fwd);
#else
    dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, g.Src(),
                                               g.Wei(Tag::any), g.Dst(), g.Strides(),
                                               g.PadL(), g.PadR());
    dnnl::convolution_backward_data::primitive_desc pd(desc, Engine(), fwd);
#endif
    return {std::make_unique<dnnl::convolution_backward_data>(pd), pd.weights_desc(),
            pd.impl_info_str()};
  }
#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_backward_weights::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Wei(Tag::any), g.Dst(),
      g.Strides(), g.PadL(), g.PadR(), fwd);
#else
  dnnl::convolution_backward_weights::desc desc(dnnl::algorithm::convolution_direct, g.Src(),
                                                g.Wei(Tag::any), g.Dst(), g.Strides(),
                                                g.PadL(), g.PadR());
  dnnl::convolution_backward_weights::primitive_desc pd(desc, Engine(), fwd);
#endif
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

// x: (n, h, w, c), y: (n, oh, ow, co) and the (k, k, c / groups, co) kernel.
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
                      ffi::Span<const int64_t> kernel, int64_t stride, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], y[3], kernel[0], y[1], y[2], stride,
                  pt,   pb,   pl,   pr,   x[3] / kernel[2]};
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
  Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), w.dimensions(), stride, pt, pb,
                            pl, pr);
  return Run(g, 0, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error BwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), w.dimensions(), stride, pt,
                            pb, pl, pr);
  return Run(g, 1, dy.typed_data(), w.typed_data(), dx->typed_data());
}

ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), dw->dimensions(), stride, pt,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvFwd, Fwd, Bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvBwdData, BwdData, Bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvBwdWeights, BwdWeights, Bind());

// Which oneDNN implementation serves a shape (e.g. "jit_dw:avx512_core"), for tests and
// benchmarks: a reference ("ref:any") implementation would be orders of magnitude slower.
// groups is 1 or c (depthwise, co = c).
extern "C" const char* DnnlConvImplInfo(int64_t n, int64_t h, int64_t w, int64_t c, int64_t co,
                                        int64_t k, int64_t stride, int64_t pt, int64_t pb,
                                        int64_t pl, int64_t pr, int64_t groups, int kind) {
  static thread_local std::string info;
  const int64_t oh = (h + pt + pb - k) / stride + 1, ow = (w + pl + pr - k) / stride + 1;
  try {
    info = Cached(Geometry{n, h, w, c, co, k, oh, ow, stride, pt, pb, pl, pr, groups}, kind).impl;
  } catch (const dnnl::error& e) {
    info = std::string("error: ") + e.what();
  }
  return info.c_str();
}
