// cdft's CPU convolutions: oneDNN primitives behind XLA FFI handlers.
//
// 2-D convolutions of NHWC float32 activations with HWIO float32 kernels (any
// stride and explicit padding, no dilation, one group), the three passes a
// train step needs: forward, the input gradient and the kernel gradient. XLA
// calls them as custom calls (cdft/kernels/conv.py registers them and defines
// the JAX op). Activations stay NHWC, as XLA holds them; kernels are reordered
// into the layout the chosen oneDNN implementation wants on every call (a few
// hundred KB at most).
//
// Plans (primitive descriptors and primitives) are made once per shape and
// kept for the process. Each pass takes oneDNN's first choice of implementation
// for the shape: a choice by timing would differ between processes, and with
// it the rounding, so a resumed run would no longer end on the bits of an
// uninterrupted one.
#include <xmmintrin.h>

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
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// N, H, W, C, KH, KW, O, stride h, stride w, pad top, bottom, left, right.
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t>;

// 64-byte aligned memory, not zero-filled; kept per thread and grown as needed,
// so a step does not page in fresh scratch memory on every call.
class Scratch {
 public:
  Scratch(size_t bytes, int slot) {
    thread_local std::unique_ptr<char[]> buffers[2];  // 0: a reordered kernel, 1: scratchpad
    thread_local size_t sizes[2] = {0, 0};
    size_t need = bytes + 64;
    if (sizes[slot] < need) {
      buffers[slot].reset(new char[need]);
      sizes[slot] = need;
    }
    base_ = buffers[slot].get();
  }
  void* ptr() const {
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(base_) + 63) & ~uintptr_t(63));
  }

 private:
  char* base_;
};

struct Plans {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
  memory::desc src, dst, wei_hwio;
};

std::unique_ptr<Plans> MakePlans(const Key& k) {
  auto [n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr] = k;
  int64_t ho = (h + pt + pb - kh) / sh + 1, wo = (w + pl + pr - kw) / sw + 1;
  auto& eng = Engine();
  auto p = std::make_unique<Plans>();
  p->src = memory::desc({n, c, h, w}, memory::data_type::f32, tag::nhwc);
  p->dst = memory::desc({n, o, ho, wo}, memory::data_type::f32, tag::nhwc);
  p->wei_hwio = memory::desc({o, c, kh, kw}, memory::data_type::f32, tag::hwio);
  memory::desc wei_any({o, c, kh, kw}, memory::data_type::f32, tag::any);
  memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, p->src,
      wei_any, p->dst, strides, pad_l, pad_r, attr);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->src, wei_any, p->dst, strides, pad_l, pad_r,
      p->fwd_pd, attr);
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->src, wei_any, p->dst, strides, pad_l, pad_r,
      p->fwd_pd, attr);
  p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
  return p;
}

const Plans& GetPlans(const Key& k) {
  static std::mutex mu;
  static auto* cache = new std::map<Key, std::unique_ptr<Plans>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(k);
  if (it == cache->end()) it = cache->emplace(k, MakePlans(k)).first;
  return *it->second;
}

// The kernel in the layout `want`: the HWIO `data` itself, or reordered into scratch.
memory Weights(const Plans& p, const memory::desc& want, float* data, dnnl::stream& s) {
  memory user(p.wei_hwio, Engine(), data);
  if (want == p.wei_hwio) return user;
  Scratch packed(want.get_size(), 0);
  memory out(want, Engine(), packed.ptr());
  dnnl::reorder(user, out).execute(s, user, out);
  return out;
}

Key MakeKey(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w, int64_t sh, int64_t sw,
            int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Key(x[0], x[1], x[2], x[3], w[0], w[1], w[3], sh, sw, pt, pb, pl, pr);
}

// x: NHWC (the input or its gradient), w: HWIO (the kernel or its gradient).
ffi::Error Check(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w) {
  if (x.size() != 4 || w.size() != 4)
    return ffi::Error::InvalidArgument("cdft oneDNN convolution: NHWC and HWIO operands expected");
  if (x[3] != w[2])
    return ffi::Error::InvalidArgument("cdft oneDNN convolution: input and kernel channels differ");
  return ffi::Error::Success();
}

// Runs `prim` on `args` with its scratchpad (per-thread memory of `pd`'s size) and waits.
template <class PD, class Prim>
void Execute(const PD& pd, const Prim& prim, std::unordered_map<int, memory> args,
             dnnl::stream& s) {
  Scratch pad(pd.scratchpad_desc().get_size(), 1);
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), Engine(), pad.ptr()));
  prim.execute(s, args);
  s.wait();
}

// Denormals flushed to zero (FTZ) and read as zero (DAZ) in every thread that runs
// oneDNN's kernels, as XLA:CPU runs its own: without it, the OpenMP worker
// threads take x86's slow path on the tiny values a training step produces.
void FlushDenormals() {
  thread_local bool flushed = false;
  if (flushed) return;
#pragma omp parallel
  _mm_setcsr(_mm_getcsr() | 0x8040);
  flushed = true;
}

template <class F>
ffi::Error Guard(F f) {
  FlushDenormals();
  try {
    f();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = Check(x.dimensions(), w.dimensions()); e.failure()) return e;
  return Guard([&] {
    const Plans& p = GetPlans(MakeKey(x.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr));
    dnnl::stream s(Engine());
    Execute(p.fwd_pd, p.fwd,
            {{DNNL_ARG_SRC, memory(p.src, Engine(), x.typed_data())},
             {DNNL_ARG_WEIGHTS, Weights(p, p.fwd_pd.weights_desc(), w.typed_data(), s)},
             {DNNL_ARG_DST, memory(p.dst, Engine(), y->typed_data())}},
            s);
  });
}

// dx (the shape of the result) from dy and the kernel.
ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                            int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = Check(dx->dimensions(), w.dimensions()); e.failure()) return e;
  return Guard([&] {
    const Plans& p = GetPlans(MakeKey(dx->dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr));
    dnnl::stream s(Engine());
    Execute(p.bwd_data_pd, p.bwd_data,
            {{DNNL_ARG_DIFF_DST, memory(p.dst, Engine(), dy.typed_data())},
             {DNNL_ARG_WEIGHTS, Weights(p, p.bwd_data_pd.weights_desc(), w.typed_data(), s)},
             {DNNL_ARG_DIFF_SRC, memory(p.src, Engine(), dx->typed_data())}},
            s);
  });
}

// dw (HWIO, the shape of the result) from x and dy.
ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                               int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = Check(x.dimensions(), dw->dimensions()); e.failure()) return e;
  return Guard([&] {
    const Plans& p = GetPlans(MakeKey(x.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr));
    dnnl::stream s(Engine());
    memory out(p.wei_hwio, Engine(), dw->typed_data());
    auto want = p.bwd_weights_pd.diff_weights_desc();
    bool packed = !(want == p.wei_hwio);  // oneDNN's layout, reordered into `out` after
    Scratch bytes(packed ? want.get_size() : 0, 0);
    memory result = packed ? memory(want, Engine(), bytes.ptr()) : out;
    Execute(p.bwd_weights_pd, p.bwd_weights,
            {{DNNL_ARG_SRC, memory(p.src, Engine(), x.typed_data())},
             {DNNL_ARG_DIFF_DST, memory(p.dst, Engine(), dy.typed_data())},
             {DNNL_ARG_DIFF_WEIGHTS, result}},
            s);
    if (packed) {
      dnnl::reorder(result, out).execute(s, result, out);
      s.wait();
    }
  });
}

}  // namespace

#define CDFT_CONV_BINDING                                                                  \
  ffi::Ffi::Bind()                                                                         \
      .Arg<ffi::Buffer<ffi::F32>>()                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                        \
      .Ret<ffi::Buffer<ffi::F32>>()                                                        \
      .Attr<int64_t>("sh")                                                                 \
      .Attr<int64_t>("sw")                                                                 \
      .Attr<int64_t>("pt")                                                                 \
      .Attr<int64_t>("pb")                                                                 \
      .Attr<int64_t>("pl")                                                                 \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CdftConvForward, ConvForward, CDFT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CdftConvBackwardData, ConvBackwardData, CDFT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CdftConvBackwardWeights, ConvBackwardWeights, CDFT_CONV_BINDING);
