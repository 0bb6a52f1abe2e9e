// fastgpt::flat_adamw_step_: gradient clipping, AdamW and the bf16 working-copy refresh in one
// op, for CPU training with fp32 master weights (fastgpt/optim.py); without a working copy (an
// empty `working`: float32 training) the same step reads the masters' own grads.
//
// Why: the unfused step makes five passes over every parameter element (bf16 grads to an fp32
// buffer, their norm, the clip multiply, AdamW, the fp32 -> bf16 copy), each an op over ~30
// small tensors, plus torch.optim's Python around them. Here the grads are read once for the
// norm and once more for the update, which writes the master, both moments and the bf16 copy in
// the same pass; both passes run at::parallel_for over blocks of 4096 elements.
// Algorithm: tensor i owns [offsets[i], offsets[i+1]) of the flat fp32 buffers (master,
//   exp_avg, exp_avg_sq) and of the flat bf16 working copy; grads[i] is its gradient (bf16 or
//   fp32, None = no gradient: the tensor is skipped, as torch.optim skips it, and counts 0 in
//   the norm). Pass 1: total = ||all grads||_2 (squares summed in double per block, blocks added
//   in order, so the result does not depend on the thread count). Pass 2, per element:
//     g *= min(1, max_norm / (total + 1e-6))                  (only when max_norm > 0)
//     p *= 1 - lr * wd;  m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g^2
//     p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps);  work = bf16(p)
//   with t = ++steps[i]; lr and wd come from the tensor's group.
// Precision: the fp32 arithmetic is torch's CPU fused AdamW's, operation for operation and with
//   the FMAs its build has (16-lane body; per tensor a tail whose first multiple of 8 lanes
//   fuses exp_avg_sq's update like the body, the rest the other way), so the master, exp_avg
//   and exp_avg_sq are bitwise torch.optim.AdamW(fused=True)'s given the same clipped grads
//   (tested against torch 2.13's AVX-512 kernels; other builds may differ by an ulp). The clip
//   factor is computed as clip_grad_norm_ does (reciprocal, times max_norm, clamped, in fp32);
//   the norm, summed in double, is at least as accurate as clip_grad_norm_'s and may differ from
//   it in the last bits. bf16 rounding is round to nearest even, as .to(torch.bfloat16).
// Limits: CPU; contiguous buffers; no amsgrad, maximize or grad scaling (Python checks). The
//   AVX-512 and AVX2 copies (cpu_isa.h) are the fast ones; the baseline copy calls fmaf.

// torch's kernel rounds every product and sum except its explicit FMAs: keep GCC from fusing
// others (-ffp-contract=fast is its default for C++). setup.py's -fno-math-errno lets GCC
// vectorise sqrt (exact either way).
#pragma GCC optimize("fp-contract=off")

#include "cpu_isa.h"
#include "vec_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastgpt {
namespace {

using namespace vec;

#define OP_NAME "fastgpt::flat_adamw_step_"

// elements per unit of parallel work: a multiple of the 16 lanes, so blocks inside a tensor
// keep torch's vector/tail split (which starts at each tensor's first element)
constexpr int64_t kBlock = 4096;

// one tensor's gradient and its constants for this step, as torch's kernel computes them
struct Segment {
  const void* grad;        // nullptr: no gradient, skipped
  bool grad_bf16;
  int64_t offset, numel;
  float decay;             // 1 - lr * wd (1 when wd == 0: torch skips the multiply)
  bool decays;
  float lerp_coeff;        // w = 1 - beta1 for m + w (g - m) when |w| < 0.5, else w - 1 for
  bool lerp_from_m;        // g + (w - 1)(g - m): torch's lerp, exact at both ends
  float beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
};

struct Block {
  int32_t segment;
  int64_t begin, end;      // relative to the segment's first element
};

// a * b + c rounded once, lane by lane, on one register of instruction set I (NativeVec). GCC
// does not vectorise a lane loop of fmaf over computed vectors (it issued one scalar FMA per
// lane), so the AVX2 and AVX-512 copies use the instructions. Those two are not always_inline:
// a function with a target attribute cannot be forced into update_body (which has none); GCC
// inlines them once update_body sits inside the copy of the same target.
template <Isa I>
__attribute__((always_inline)) inline typename NativeVec<I>::f fmav(typename NativeVec<I>::f a,
                                                                   typename NativeVec<I>::f b,
                                                                   typename NativeVec<I>::f c) {
  typename NativeVec<I>::f r;
  for (int k = 0; k < NativeVec<I>::lanes; ++k) r[k] = __builtin_fmaf(a[k], b[k], c[k]);
  return r;
}
template <>
FASTGPT_TARGET_AVX2 inline NativeVec<Isa::kAvx2>::f fmav<Isa::kAvx2>(NativeVec<Isa::kAvx2>::f a,
                                                                    NativeVec<Isa::kAvx2>::f b,
                                                                    NativeVec<Isa::kAvx2>::f c) {
  return _mm256_fmadd_ps(a, b, c);
}
template <>
FASTGPT_TARGET_AVX512 inline NativeVec<Isa::kAvx512>::f fmav<Isa::kAvx512>(
    NativeVec<Isa::kAvx512>::f a, NativeVec<Isa::kAvx512>::f b, NativeVec<Isa::kAvx512>::f c) {
  return _mm512_fmadd_ps(a, b, c);
}

// sum of g^2 over [begin, end), in double: 8-lane halves (a 16-lane double vector would live on
// the stack), four pairs of accumulators to hide the adds' latency
template <typename raw_t>
__attribute__((always_inline)) inline double sum_squares_body(const raw_t* g, int64_t begin,
                                                              int64_t end) {
  typedef double vdouble8 __attribute__((vector_size(64)));
  vdouble8 a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{};
  auto add = [](vdouble8& lo_acc, vdouble8& hi_acc, vfloat x) __attribute__((always_inline)) {
    const vdouble8 lo = __builtin_convertvector(
        __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), vdouble8);
    const vdouble8 hi = __builtin_convertvector(
        __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15), vdouble8);
    lo_acc += lo * lo;
    hi_acc += hi * hi;
  };
  int64_t i = begin;
  for (; i + 4 * kLanes <= end; i += 4 * kLanes) {
    add(a0, a1, load16(g + i));
    add(a2, a3, load16(g + i + kLanes));
    add(a4, a5, load16(g + i + 2 * kLanes));
    add(a6, a7, load16(g + i + 3 * kLanes));
  }
  for (; i + kLanes <= end; i += kLanes) add(a0, a1, load16(g + i));
  const vdouble8 sum = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
  double total = 0;
  for (int k = 0; k < 8; ++k) total += sum[k];
  for (; i < end; ++i) {
    const double x = load(g, i);
    total += x * x;
  }
  return total;
}

// AdamW on [begin, end) of one segment; torch's vector body (blocks of 16 from the tensor's
// start) up to vec_end, its tail loop after
template <Isa I, typename raw_t>
__attribute__((always_inline)) inline void update_body(const Segment& s, const raw_t* grad,
                                                       float clip, bool clips, float* param,
                                                       float* exp_avg, float* exp_avg_sq,
                                                       uint16_t* work, int64_t begin,
                                                       int64_t end) {
  // torch's body covers blocks of 16 from the tensor's start; they are computed here in
  // registers of the instruction set's width (the arithmetic is per lane, so the same), since
  // GCC moves 16-lane vectors through the stack on AVX2
  using V = NativeVec<I>;
  using F = typename V::f;
  const int64_t vec_end = std::min(end, s.numel - s.numel % kLanes);
  const int64_t tail8_end = s.numel - s.numel % 8;
  int64_t i = begin;
  for (; i < vec_end; i += V::lanes) {
    F g = loadv<V>(grad + i);
    if (clips) g = g * clip;
    F p = loadv<V>(param + i);
    if (s.decays) p = p * s.decay;
    F m = loadv<V>(exp_avg + i);
    m = fmav<I>(F{} + s.lerp_coeff, g - m, s.lerp_from_m ? m : g);
    F v = loadv<V>(exp_avg_sq + i);
    v = fmav<I>(s.one_minus_beta2 * g, g, v * s.beta2);
    F sq;
    for (int k = 0; k < V::lanes; ++k) sq[k] = __builtin_sqrtf(v[k]);
    const F denom = sq / s.bias_correction2_sqrt + s.eps;
    p = p + s.neg_step_size * m / denom;
    storev<V>(exp_avg + i, m);
    storev<V>(exp_avg_sq + i, v);
    storev<V>(param + i, p);
    if (work != nullptr) storev<V>(work + i, p);
  }
  for (; i < end; ++i) {
    float g = load(grad, i);
    if (clips) g = g * clip;
    float p = param[i];
    if (s.decays) p = p * s.decay;
    float m = exp_avg[i];
    m = __builtin_fmaf(s.lerp_coeff, g - m, s.lerp_from_m ? m : g);
    // torch's tail loop is vectorised 8 wide by its compiler, which fuses this line the
    // other way round than in the scalar remainder
    const float c2g = s.one_minus_beta2 * g;
    const float v = i < tail8_end ? __builtin_fmaf(c2g, g, exp_avg_sq[i] * s.beta2)
                                  : __builtin_fmaf(exp_avg_sq[i], s.beta2, c2g * g);
    const float denom = __builtin_sqrtf(v) / s.bias_correction2_sqrt + s.eps;
    p = p + s.neg_step_size * m / denom;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p;
    if (work != nullptr) store(work, i, p);
  }
}

// One copy per instruction set (cpu_isa.h) inlines the bodies above: FMA and sqrt on 16 lanes
// with AVX-512, on 8 with AVX2 + FMA; the baseline copy calls fmaf (SSE2 has no FMA).
template <typename grad_t>
double sum_squares(const grad_t* g, int64_t begin, int64_t end) {
  double total = 0.0;
  dispatch([&]<Isa>() __attribute__((always_inline)) { total = sum_squares_body(g, begin, end); });
  return total;
}
template <typename grad_t>
void update(const Segment& s, const grad_t* grad, float clip, bool clips, float* param,
            float* exp_avg, float* exp_avg_sq, uint16_t* work, int64_t begin, int64_t end) {
  dispatch([&]<Isa I>() __attribute__((always_inline)) {
    update_body<I>(s, grad, clip, clips, param, exp_avg, exp_avg_sq, work, begin, end);
  });
}

void check_flat(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), OP_NAME ": ", name, " must be on the CPU; got ",
                    t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, OP_NAME ": ", name, " must be ", dtype, "; got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.numel() == numel, OP_NAME ": ", name,
                    " must be contiguous with ", numel, " elements; got shape ", t.sizes(),
                    " and strides ", t.strides());
}

// the op's per-group hyperparameters, and the group of each tensor
struct Groups {
  at::IntArrayRef group;
  at::ArrayRef<double> lr, weight_decay, beta1, beta2, eps;
  int64_t count() const { return static_cast<int64_t>(lr.size()); }
};

// The lists' lengths and the flat buffers, checked before anything is written, so that a bad
// call leaves the optimizer's state as it was.
void check_inputs(const at::Tensor& master, const at::Tensor& exp_avg,
                  const at::Tensor& exp_avg_sq, const at::Tensor& working,
                  const at::Tensor& steps, int64_t n, at::IntArrayRef offsets, const Groups& h) {
  const int64_t groups = h.count();
  TORCH_CHECK_VALUE(static_cast<int64_t>(offsets.size()) == n + 1 && offsets[0] == 0, OP_NAME
                    ": offsets must hold 0 and the end of each of the ", n, " tensors; got ",
                    offsets);
  TORCH_CHECK_VALUE(static_cast<int64_t>(h.group.size()) == n, OP_NAME ": group must name the "
                    "group of each of the ", n, " tensors; got ", h.group.size(), " entries");
  TORCH_CHECK_VALUE(static_cast<int64_t>(h.weight_decay.size()) == groups &&
                        static_cast<int64_t>(h.beta1.size()) == groups &&
                        static_cast<int64_t>(h.beta2.size()) == groups &&
                        static_cast<int64_t>(h.eps.size()) == groups,
                    OP_NAME ": lr, weight_decay, beta1, beta2 and eps need one value per group; "
                    "got ", h.lr.size(), ", ", h.weight_decay.size(), ", ", h.beta1.size(), ", ",
                    h.beta2.size(), " and ", h.eps.size());
  const int64_t total = offsets[n];
  check_flat(master, "master", at::kFloat, total);
  check_flat(exp_avg, "exp_avg", at::kFloat, total);
  check_flat(exp_avg_sq, "exp_avg_sq", at::kFloat, total);
  // an empty working copy: float32 training, nothing to refresh
  check_flat(working, "working", at::kBFloat16, working.numel() == 0 ? 0 : total);
  check_flat(steps, "steps", at::kFloat, n);
}

// Each tensor's place in the flat buffers and its gradient, checked tensor by tensor (still
// before any write); keep[i] holds grad i's contiguous copy when it was strided. The step
// constants are left for count_step, which may only run once every tensor has passed.
std::vector<Segment> segments(const c10::List<std::optional<at::Tensor>>& grads,
                              at::IntArrayRef offsets, const Groups& h,
                              std::vector<at::Tensor>& keep) {
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<Segment> segs(n);
  for (int64_t i = 0; i < n; ++i) {
    Segment& s = segs[i];
    s.offset = offsets[i];
    s.numel = offsets[i + 1] - offsets[i];
    TORCH_CHECK_VALUE(s.numel >= 0, OP_NAME ": offsets must not decrease; got ", offsets);
    TORCH_CHECK_VALUE(h.group[i] >= 0 && h.group[i] < h.count(), OP_NAME ": tensor ", i,
                      " names group ", h.group[i], "; there are ", h.count(), " groups");
    const std::optional<at::Tensor> grad = grads.get(i);
    s.grad = nullptr;
    if (!grad.has_value() || !grad->defined()) continue;
    TORCH_CHECK_VALUE(grad->device().is_cpu() && grad->layout() == at::kStrided, OP_NAME
                      ": grads must be dense CPU tensors; grad ", i, " is ", grad->device(),
                      " ", grad->layout());
    TORCH_CHECK_VALUE(grad->scalar_type() == at::kBFloat16 || grad->scalar_type() == at::kFloat,
                      OP_NAME ": grads must be bfloat16 or float32; grad ", i, " is ",
                      grad->scalar_type());
    TORCH_CHECK_VALUE(grad->numel() == s.numel, OP_NAME ": grad ", i, " has ", grad->numel(),
                      " elements but its tensor has ", s.numel, " (offsets ", offsets, ")");
    keep[i] = grad->contiguous();
    s.grad = keep[i].const_data_ptr();
    s.grad_bf16 = grad->scalar_type() == at::kBFloat16;
  }
  return segs;
}

// Counts the step of every tensor with a gradient and fills in the constants torch's kernel
// computes from it: torch.optim increments each tensor's fp32 step, then its kernel works in
// double from it, rounding each constant to fp32 once.
void count_step(at::Tensor& steps, const Groups& h, std::vector<Segment>& segs) {
  float* step_data = steps.mutable_data_ptr<float>();
  for (size_t i = 0; i < segs.size(); ++i) {
    Segment& s = segs[i];
    if (s.grad == nullptr) continue;
    const int64_t g = h.group[i];
    step_data[i] += 1.0f;
    const double step = step_data[i];
    const double bias_correction1 = 1 - std::pow(h.beta1[g], step);
    const double bias_correction2 = 1 - std::pow(h.beta2[g], step);
    s.decays = h.weight_decay[g] != 0;
    s.decay = static_cast<float>(1 - h.lr[g] * h.weight_decay[g]);
    const float lerp_weight = static_cast<float>(1 - h.beta1[g]);
    s.lerp_from_m = std::abs(lerp_weight) < 0.5f;
    s.lerp_coeff = s.lerp_from_m ? lerp_weight : lerp_weight - 1.0f;
    s.beta2 = static_cast<float>(h.beta2[g]);
    s.one_minus_beta2 = static_cast<float>(1 - h.beta2[g]);
    s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
    s.eps = static_cast<float>(h.eps[g]);
    s.neg_step_size = static_cast<float>(-(h.lr[g] / bias_correction1));
  }
}

// The units of parallel work: each tensor with a gradient cut into kBlock pieces from its
// first element, in tensor order (the norm adds the blocks' sums in this order).
std::vector<Block> blocks_of(const std::vector<Segment>& segs) {
  std::vector<Block> blocks;
  for (size_t i = 0; i < segs.size(); ++i) {
    if (segs[i].grad == nullptr) continue;
    for (int64_t b = 0; b < segs[i].numel; b += kBlock)
      blocks.push_back({static_cast<int32_t>(i), b, std::min(b + kBlock, segs[i].numel)});
  }
  return blocks;
}

// blocks per parallel_for task: about at::internal::GRAIN_SIZE elements
constexpr int64_t kGrain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / kBlock);

// Pass 1: ||all grads||_2. Each block's squares are summed in double on some thread, the
// blocks' sums added in block order on this one, so the norm does not depend on the thread
// count.
float grad_norm(const std::vector<Segment>& segs, const std::vector<Block>& blocks) {
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  std::vector<double> partial(nblocks);
  at::parallel_for(0, nblocks, kGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Block& k = blocks[b];
      const Segment& s = segs[k.segment];
      partial[b] = s.grad_bf16
                       ? sum_squares(static_cast<const uint16_t*>(s.grad), k.begin, k.end)
                       : sum_squares(static_cast<const float*>(s.grad), k.begin, k.end);
    }
  });
  double sum = 0;
  for (double x : partial) sum += x;
  return static_cast<float>(std::sqrt(sum));
}

// The factor the grads are multiplied by, as clip_grad_norm_ computes it:
// clamp(max_norm / (norm + 1e-6), max=1) in fp32, where a / t is t.reciprocal() * a; a NaN
// norm stays NaN.
float clip_factor(float norm, double max_norm) {
  const float coeff = (1.0f / (norm + 1e-6f)) * static_cast<float>(max_norm);
  return coeff > 1.0f ? 1.0f : coeff;
}

// Pass 2: AdamW on every block, writing the master, both moments and the bf16 working copy (if
// any); a block's update reads no other block's data, so the blocks run in any order.
void update_pass(const std::vector<Segment>& segs, const std::vector<Block>& blocks,
                 float clip, bool clips, at::Tensor& master, at::Tensor& exp_avg,
                 at::Tensor& exp_avg_sq, at::Tensor& working) {
  float* param = master.mutable_data_ptr<float>();
  float* m = exp_avg.mutable_data_ptr<float>();
  float* v = exp_avg_sq.mutable_data_ptr<float>();
  uint16_t* work = working.numel() == 0
                       ? nullptr
                       : reinterpret_cast<uint16_t*>(working.mutable_data_ptr<at::BFloat16>());
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), kGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Block& k = blocks[b];
      const Segment& s = segs[k.segment];
      const int64_t o = s.offset;
      uint16_t* w = work ? work + o : nullptr;
      if (s.grad_bf16) {
        update(s, static_cast<const uint16_t*>(s.grad), clip, clips, param + o, m + o, v + o, w,
               k.begin, k.end);
      } else {
        update(s, static_cast<const float*>(s.grad), clip, clips, param + o, m + o, v + o, w,
               k.begin, k.end);
      }
    }
  });
}

at::Tensor flat_adamw_step_cpu(at::Tensor& master, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                               at::Tensor& working, at::Tensor& steps,
                               const c10::List<std::optional<at::Tensor>>& grads,
                               at::IntArrayRef offsets, at::IntArrayRef group,
                               at::ArrayRef<double> lr, at::ArrayRef<double> weight_decay,
                               at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                               at::ArrayRef<double> eps, double max_norm) {
  const Groups h{group, lr, weight_decay, beta1, beta2, eps};
  const int64_t n = static_cast<int64_t>(grads.size());
  check_inputs(master, exp_avg, exp_avg_sq, working, steps, n, offsets, h);
  std::vector<at::Tensor> keep(n);   // contiguous copies of strided grads, if any
  std::vector<Segment> segs = segments(grads, offsets, h, keep);
  count_step(steps, h, segs);        // every input checked: the first write
  const std::vector<Block> blocks = blocks_of(segs);
  const bool clips = max_norm > 0;
  const float norm = clips ? grad_norm(segs, blocks) : std::nanf("");
  const float clip = clips ? clip_factor(norm, max_norm) : 1.0f;
  update_pass(segs, blocks, clip, clips, master, exp_avg, exp_avg_sq, working);
  return at::scalar_tensor(norm, master.options());
}

#undef OP_NAME

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("flat_adamw_step_", &flat_adamw_step_cpu);
}

}  // namespace fastgpt
