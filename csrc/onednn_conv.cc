// 3D convolution forward, backward-data and backward-weights on the CPU with oneDNN, as XLA FFI handlers.
//
// Buffers are JAX's layouts: activations NDHWC, kernels DHWIO (k_d, k_h, k_w, C_in, C_out). Padding is `padding`
// voxels before every spatial axis; the padding after follows from the output size, as XLA's
// conv_general_dilated with [(p, p)] * 3 gives it. Attributes: `stride`, `padding`, `layout` (0: activations stay
// channels-last and only the kernel is reordered; 1: oneDNN picks the activation layout too and every operand is
// reordered in and out) and `threads` (0: OpenMP's default, OMP_NUM_THREADS or the core count; n: n threads).
// Primitives are cached by shape. XLA may run a cached primitive on any of its threads, and two at once, so each
// call brings its own scratchpad (scratchpad_mode::user): oneDNN's library-managed scratchpad is per thread and
// sized when the primitive is created, which breaks (out-of-bounds writes) when a primitive runs on another thread.
// Float32 and bfloat16 (where the CPU has the instructions; otherwise the primitive descriptor cannot be created and
// the call returns an error).
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" void omp_set_num_threads(int);

namespace {

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

enum Op { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One cached primitive and the reorders between the user's layouts and the ones it asked for.
struct Entry {
  dnnl::primitive prim;
  int arg_a, arg_b, arg_out;             // DNNL_ARG_* of the two inputs and the output
  memory::desc user_a, user_b, user_out;  // JAX's layouts
  memory::desc prim_a, prim_b, prim_out;  // the primitive's layouts
  memory::desc scratchpad;
  std::string impl;                       // oneDNN's implementation, e.g. "brg_conv_fwd:avx512_core"
};

// NDHWC dims -> oneDNN's logical {N, C, D, H, W}; DHWIO dims -> {O, I, D, H, W}.
memory::dims DataDims(ffi::Span<const int64_t> d) { return {d[0], d[4], d[1], d[2], d[3]}; }
memory::dims WeightDims(ffi::Span<const int64_t> d) { return {d[4], d[3], d[0], d[1], d[2]}; }

// The primitive of `pd`, its two inputs and its output: their DNNL_ARG_* names, JAX's layouts, the primitive's.
template <typename Prim, typename PrimitiveDesc>
void Fill(Entry* e, const PrimitiveDesc& pd, std::array<int, 3> args, std::array<memory::desc, 3> user,
          std::array<memory::desc, 3> prim) {
  e->prim = Prim(pd);
  e->arg_a = args[0], e->arg_b = args[1], e->arg_out = args[2];
  e->user_a = user[0], e->user_b = user[1], e->user_out = user[2];
  e->prim_a = prim[0], e->prim_b = prim[1], e->prim_out = prim[2];
  e->impl = pd.impl_info_str(), e->scratchpad = pd.scratchpad_desc();
}

std::unique_ptr<Entry> Build(Op op, memory::data_type type, const memory::dims& src, const memory::dims& wei,
                             const memory::dims& dst, int64_t stride, int64_t pad, int64_t layout) {
  memory::dims strides(3, stride), pad_l(3, pad), pad_r(3);
  for (int i = 0; i < 3; ++i) pad_r[i] = (dst[2 + i] - 1) * stride + wei[2 + i] - src[2 + i] - pad;
  const tag data_tag = layout == 0 ? tag::ndhwc : tag::any;
  memory::desc src_md(src, type, data_tag), dst_md(dst, type, data_tag), wei_md(wei, type, tag::any);
  memory::desc user_src(src, type, tag::ndhwc), user_dst(dst, type, tag::ndhwc), user_wei(wei, type, tag::dhwio);
  auto alg = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training, alg, src_md, wei_md,
                                                dst_md, strides, pad_l, pad_r, attr);
  auto e = std::make_unique<Entry>();
  if (op == kForward) {
    Fill<dnnl::convolution_forward>(e.get(), fwd, {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},
                                    {user_src, user_wei, user_dst},
                                    {fwd.src_desc(), fwd.weights_desc(), fwd.dst_desc()});
  } else if (op == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc bwd(Engine(), alg, src_md, wei_md, dst_md, strides, pad_l,
                                                        pad_r, fwd, attr);
    Fill<dnnl::convolution_backward_data>(e.get(), bwd, {DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC},
                                          {user_dst, user_wei, user_src},
                                          {bwd.diff_dst_desc(), bwd.weights_desc(), bwd.diff_src_desc()});
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(Engine(), alg, src_md, wei_md, dst_md, strides, pad_l,
                                                           pad_r, fwd, attr);
    Fill<dnnl::convolution_backward_weights>(e.get(), bwd, {DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS},
                                             {user_src, user_dst, user_wei},
                                             {bwd.src_desc(), bwd.diff_dst_desc(), bwd.diff_weights_desc()});
  }
  return e;
}

const Entry& Lookup(Op op, memory::data_type type, const memory::dims& src, const memory::dims& wei,
                    const memory::dims& dst, int64_t stride, int64_t pad, int64_t layout) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  std::ostringstream key;
  key << op << ' ' << static_cast<int>(type) << ' ' << stride << ' ' << pad << ' ' << layout;
  for (const auto* dims : {&src, &wei, &dst})
    for (auto v : *dims) key << ' ' << v;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key.str()];
  if (!slot) slot = Build(op, type, src, wei, dst, stride, pad, layout);
  return *slot;
}

// `user` wrapped as memory of the primitive's layout, reordered when the two differ.
memory In(const memory::desc& user_md, const memory::desc& prim_md, void* data, dnnl::stream& s) {
  memory user(user_md, Engine(), data);
  if (user_md == prim_md) return user;
  memory m(prim_md, Engine());
  dnnl::reorder(user, m).execute(s, user, m);
  return m;
}

ffi::Error Run(Op op, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t stride,
               int64_t pad, int64_t layout, int64_t threads) {
  memory::data_type type;
  switch (a.element_type()) {
    case ffi::DataType::F32: type = memory::data_type::f32; break;
    case ffi::DataType::BF16: type = memory::data_type::bf16; break;
    default: return ffi::Error::InvalidArgument("onednn_conv: float32 or bfloat16 only");
  }
  if (a.dimensions().size() != 5 || b.dimensions().size() != 5 || out->dimensions().size() != 5)
    return ffi::Error::InvalidArgument("onednn_conv: rank-5 operands only");
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  memory::dims src, wei, dst;
  if (op == kForward) {
    src = DataDims(a.dimensions()), wei = WeightDims(b.dimensions()), dst = DataDims(out->dimensions());
  } else if (op == kBackwardData) {
    dst = DataDims(a.dimensions()), wei = WeightDims(b.dimensions()), src = DataDims(out->dimensions());
  } else {
    src = DataDims(a.dimensions()), dst = DataDims(b.dimensions()), wei = WeightDims(out->dimensions());
  }
  try {
    const Entry& e = Lookup(op, type, src, wei, dst, stride, pad, layout);
    thread_local dnnl::stream s(Engine());
    memory ma = In(e.user_a, e.prim_a, a.untyped_data(), s);
    memory mb = In(e.user_b, e.prim_b, b.untyped_data(), s);
    memory user_out(e.user_out, Engine(), out->untyped_data());
    memory mo = e.user_out == e.prim_out ? user_out : memory(e.prim_out, Engine());
    memory scratchpad(e.scratchpad, Engine());  // this call's own
    e.prim.execute(s, {{e.arg_a, ma}, {e.arg_b, mb}, {e.arg_out, mo}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (!(e.user_out == e.prim_out)) dnnl::reorder(mo, user_out).execute(s, mo, user_out);
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + err.what());
  }
  return ffi::Error::Success();
}

template <Op op>
ffi::Error Handler(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t stride,
                   int64_t pad, int64_t layout, int64_t threads) {
  return Run(op, a, b, out, stride, pad, layout, threads);
}

}  // namespace

// 1 when this CPU runs oneDNN's bfloat16 convolutions (forward and both gradients) with optimized kernels, else 0
// (no bfloat16 support, or only oneDNN's slow reference code); the Python side asks once and sends bfloat16
// convolutions here only then.
extern "C" int CmflOnednnSupportsBf16() {
  try {
    const memory::dims src = {1, 16, 8, 8, 8}, wei = {16, 16, 3, 3, 3}, dst = {1, 16, 8, 8, 8};
    for (Op op : {kForward, kBackwardData, kBackwardWeights})
      if (Build(op, memory::data_type::bf16, src, wei, dst, 1, 1, 0)->impl.rfind("ref", 0) == 0) return 0;
  } catch (const dnnl::error&) {
    return 0;
  }
  return 1;
}

#define CMFL_BIND                           \
  ffi::Ffi::Bind()                          \
      .Arg<ffi::AnyBuffer>()                \
      .Arg<ffi::AnyBuffer>()                \
      .Ret<ffi::AnyBuffer>()                \
      .Attr<int64_t>("stride")              \
      .Attr<int64_t>("padding")             \
      .Attr<int64_t>("layout")              \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CmflOnednnConvForward, Handler<kForward>, CMFL_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CmflOnednnConvBackwardData, Handler<kBackwardData>, CMFL_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CmflOnednnConvBackwardWeights, Handler<kBackwardWeights>, CMFL_BIND);
