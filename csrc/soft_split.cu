// T2T-ViT soft split: nn.Unfold(k, s, p)(x).transpose(1, 2), optionally fused with the LayerNorm that
// follows it, forward and backward.
//
//   Ho = (H + 2 ph - kh) / sh + 1, Wo likewise, L = Ho * Wo, F = C * kh * kw
//   u[b * L + oh * Wo + ow, c * kh * kw + ki * kw + kj] = x[b, c, oh * sh - ph + ki, ow * sw - pw + kj]  (0 outside)
//   y = u, or LayerNorm(u) over its F features (zero padding counts in the statistics, as in unfold + LN)
//
// Forward: one block per output row gathers the row into shared memory (F fp32 values, in the order that
// reads x's memory most contiguously: channels innermost for token / channels_last input, the window
// innermost for NCHW), normalises it there, and writes it coalesced. x is read through its strides, so
// T2T's (B, L, C) tokens are an image without the transpose + reshape copy.
//
// Backward, a deterministic gather (no atomics):
//   * with LayerNorm, ln_bwd_stats_kernel recomputes each row (the same gather) and stores its two
//     coefficients c1 = mean(w * dy * xhat), c2 = mean(w * dy), plus per-block fp32 partials of
//     dweight = sum(dy * xhat) and dbias = sum(dy);
//   * fold_kernel gives each input pixel the sum over the <= ceil(kh/sh) * ceil(kw/sw) output rows that
//     read it. The LayerNorm gradient of an element is rstd * (w * dy - xhat * c1 - c2), and the unfolded
//     element is the pixel itself, so xhat = (x - mean) * rstd needs only the pixel and the row's mean:
//     the LayerNorm backward is folded into the gather without a (B * L, F) intermediate.
#include "common.h"
#include "dtype_dispatch.h"
#include "soft_split.h"

namespace fastvit {
namespace {

// Rows are staged in shared memory under the 48 KB a block gets without opting in (with block_sum's
// 132 static bytes): no cudaFuncSetAttribute, on any sm_80+ GPU.
constexpr std::int64_t kMaxFeatures = 12000;
constexpr int kFoldThreads = 256;

struct Derived {
  std::int64_t ho, wo, tokens, features, window;
  bool channels_inner;  // c has the smallest stride: gather with c innermost
};

Derived derive(const SoftSplitGeometry& g) {
  Derived d;
  d.ho = (g.height + 2 * g.ph - g.kh) / g.sh + 1;
  d.wo = (g.width + 2 * g.pw - g.kw) / g.sw + 1;
  d.tokens = d.ho * d.wo;
  d.window = g.kh * g.kw;
  d.features = g.channels * d.window;
  const auto mag = [](std::int64_t v) { return v < 0 ? -v : v; };
  d.channels_inner = mag(g.stride_c) < mag(g.stride_w);
  return d;
}

// Where fold_kernel writes dx, and the order it walks pixels in (channels innermost when they are).
struct PixelStrides {
  std::int64_t b, c, h, w;
  bool channels_inner;
};

// Gathers output row `row` of u into u_row[F] (fp32). Ends with a barrier: the row is visible to the block.
template <typename T>
__device__ void gather_row(const T* __restrict__ x, const SoftSplitGeometry& g, const Derived& d, std::int64_t row,
                           float* u_row) {
  const std::int64_t b = row / d.tokens, l = row - b * d.tokens;
  const std::int64_t oh = l / d.wo, ow = l - oh * d.wo;
  const T* xb = x + b * g.stride_b;
  // Within a row every index fits 32 bits (F <= kMaxFeatures): no 64-bit divisions per element.
  const int channels = static_cast<int>(g.channels), window = static_cast<int>(d.window), kw = static_cast<int>(g.kw);
  const int h0 = static_cast<int>(oh * g.sh - g.ph), w0 = static_cast<int>(ow * g.sw - g.pw);
  for (int i = threadIdx.x; i < static_cast<int>(d.features); i += blockDim.x) {
    int c, win;
    if (d.channels_inner) {
      win = i / channels;
      c = i - win * channels;
    } else {
      c = i / window;
      win = i - c * window;
    }
    const int ki = win / kw, kj = win - ki * kw;
    const int ih = h0 + ki, iw = w0 + kj;
    float v = 0.f;
    if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) {
      v = to_float(xb[c * g.stride_c + ih * g.stride_h + iw * g.stride_w]);
    }
    u_row[c * d.window + win] = v;
  }
  __syncthreads();
}

template <typename T, typename W, bool kNorm>
__global__ void soft_split_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                                      T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                      SoftSplitGeometry g, Derived d, float eps) {
  extern __shared__ float u_row[];
  __shared__ float scratch[33];
  const std::int64_t rows = g.batch * d.tokens;
  const int F = static_cast<int>(d.features);
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    gather_row(x, g, d, row, u_row);
    T* y_row = y + row * F;
    if constexpr (kNorm) {
      float sum = 0.f;
      for (int f = threadIdx.x; f < F; f += blockDim.x) sum += u_row[f];
      const float mean = block_sum(sum, scratch) / F;
      float sq = 0.f;
      for (int f = threadIdx.x; f < F; f += blockDim.x) {
        const float dv = u_row[f] - mean;
        sq += dv * dv;
      }
      const float rstd = rsqrtf(block_sum(sq, scratch) / F + eps);
      for (int f = threadIdx.x; f < F; f += blockDim.x) {
        float out = (u_row[f] - mean) * rstd * to_float(weight[f]);
        if (bias) out += to_float(bias[f]);
        y_row[f] = from_float<T>(out);
      }
      if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
      }
    } else {
      for (int f = threadIdx.x; f < F; f += blockDim.x) y_row[f] = from_float<T>(u_row[f]);
    }
    __syncthreads();  // the next row's gather overwrites u_row
  }
}

template <typename T, typename W>
__global__ void ln_bwd_stats_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                                    const float* __restrict__ mean, const float* __restrict__ rstd,
                                    float* __restrict__ coefs, float* __restrict__ dw_part, float* __restrict__ db_part,
                                    SoftSplitGeometry g, Derived d) {
  extern __shared__ float u_row[];
  __shared__ float scratch[33];
  const std::int64_t rows = g.batch * d.tokens;
  const int F = static_cast<int>(d.features);
  float* dw = dw_part ? dw_part + static_cast<std::int64_t>(blockIdx.x) * F : nullptr;
  float* db = db_part ? db_part + static_cast<std::int64_t>(blockIdx.x) * F : nullptr;
  for (int f = threadIdx.x; f < F; f += blockDim.x) {  // each column belongs to one thread: no races below
    if (dw) dw[f] = 0.f;
    if (db) db[f] = 0.f;
  }
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    gather_row(x, g, d, row, u_row);
    const float m = mean[row], r = rstd[row];
    const T* dy_row = dy + row * F;
    float s1 = 0.f, s2 = 0.f;
    for (int f = threadIdx.x; f < F; f += blockDim.x) {
      const float xhat = (u_row[f] - m) * r;
      const float g_out = to_float(dy_row[f]);
      const float wdy = g_out * to_float(weight[f]);
      s1 += xhat * wdy;
      s2 += wdy;
      if (dw) dw[f] += g_out * xhat;
      if (db) db[f] += g_out;
    }
    const float c1 = block_sum(s1, scratch) / F;  // block_sum's barriers also protect u_row
    const float c2 = block_sum(s2, scratch) / F;
    if (threadIdx.x == 0) {
      coefs[2 * row] = c1;
      coefs[2 * row + 1] = c2;
    }
  }
}

// One thread per input pixel, in dx's memory order (channels innermost when dx is channels-inner). The
// image index is split once in 64 bits; everything inside an image (< 2^31 elements, checked) is 32-bit,
// and the window loops start at the first offset congruent to the pixel, so no modulo runs per step.
template <typename T, typename W, bool kNorm>
__global__ void fold_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                            const float* __restrict__ mean, const float* __restrict__ rstd,
                            const float* __restrict__ coefs, T* __restrict__ dx, SoftSplitGeometry g, Derived d,
                            PixelStrides ds) {
  const int C = static_cast<int>(g.channels), H = static_cast<int>(g.height), W_ = static_cast<int>(g.width);
  const int kh = static_cast<int>(g.kh), kw = static_cast<int>(g.kw), sh = static_cast<int>(g.sh);
  const int sw = static_cast<int>(g.sw), ph = static_cast<int>(g.ph), pw = static_cast<int>(g.pw);
  const int ho = static_cast<int>(d.ho), wo = static_cast<int>(d.wo), window = static_cast<int>(d.window);
  const std::int64_t per_image = static_cast<std::int64_t>(C) * H * W_;
  const std::int64_t total = g.batch * per_image;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t b = i / per_image;
    int rest = static_cast<int>(i - b * per_image), c, h, w;
    if (ds.channels_inner) {
      c = rest % C;
      rest /= C;
      w = rest % W_;
      h = rest / W_;
    } else {
      w = rest % W_;
      rest /= W_;
      h = rest % H;
      c = rest / H;
    }
    float xv = 0.f;
    if constexpr (kNorm) xv = to_float(x[b * g.stride_b + c * g.stride_c + h * g.stride_h + w * g.stride_w]);
    const T* dy_b = dy + b * d.tokens * d.features;
    const std::int64_t row_b = b * d.tokens;
    float acc = 0.f;
    // Output row oh reads pixel h at window offset ki = h + ph - oh * sh: offsets congruent to h + ph mod sh.
    for (int ki = (h + ph) % sh; ki < kh; ki += sh) {
      const int oh = (h + ph - ki) / sh;
      if (oh < 0) break;  // larger ki only lowers oh
      if (oh >= ho) continue;
      for (int kj = (w + pw) % sw; kj < kw; kj += sw) {
        const int ow = (w + pw - kj) / sw;
        if (ow < 0) break;
        if (ow >= wo) continue;
        const int l = oh * wo + ow;
        const int f = c * window + ki * kw + kj;
        float grad = to_float(dy_b[static_cast<std::int64_t>(l) * d.features + f]);
        if constexpr (kNorm) {
          const std::int64_t row = row_b + l;
          const float r = rstd[row];
          grad = r * (to_float(weight[f]) * grad - (xv - mean[row]) * r * coefs[2 * row] - coefs[2 * row + 1]);
        }
        acc += grad;
      }
    }
    dx[b * ds.b + c * ds.c + h * ds.h + w * ds.w] = from_float<T>(acc);
  }
}

int row_threads(std::int64_t features) {
  const std::int64_t t = (features + 31) / 32 * 32;
  return static_cast<int>(t < 256 ? t : 256);
}

void check_geometry(const char* op, const SoftSplitGeometry& g, int x_dtype, int w_dtype) {
  require(g.batch >= 0 && g.channels > 0 && g.height > 0 && g.width > 0, op,
          "the input must have B >= 0 and C, H, W > 0, got (" + std::to_string(g.batch) + ", " +
              std::to_string(g.channels) + ", " + std::to_string(g.height) + ", " + std::to_string(g.width) + ")");
  require(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.ph >= 0 && g.pw >= 0, op,
          "kernel and stride must be > 0 and padding >= 0");
  require(g.height + 2 * g.ph >= g.kh && g.width + 2 * g.pw >= g.kw, op,
          "the kernel is larger than the padded input; no output position fits");
  const Derived d = derive(g);
  require(d.features <= kMaxFeatures, op,
          "a row of C * kh * kw = " + std::to_string(d.features) + " features exceeds the kernel's " +
              std::to_string(kMaxFeatures) + " (one row is staged in 48 KB of shared memory)");
  require(g.channels * g.height * g.width < (std::int64_t{1} << 31) && d.tokens < (std::int64_t{1} << 31), op,
          "one image of C * H * W = " + std::to_string(g.channels * g.height * g.width) +
              " elements (or its output rows) reaches 2^31; the kernels index within an image in 32 bits");
  check_float_dtype(op, "x dtype", x_dtype);
  require(w_dtype == x_dtype || w_dtype == kFloat32, op,
          std::string("norm weight dtype ") + dtype_name(w_dtype) + " must be the input dtype (" +
              dtype_name(x_dtype) + ") or float32");
}

int grid_rows(std::int64_t rows) { return static_cast<int>(rows < (1 << 20) ? (rows > 0 ? rows : 1) : (1 << 20)); }

}  // namespace

void soft_split_fwd(const SoftSplitFwdArgs& a) {
  const char* op = "soft_split_fwd";
  check_geometry(op, a.geometry, a.x_dtype, a.w_dtype);
  require(a.x && a.y, op, "x and y must be non-null device pointers");
  require(!a.norm_bias || a.norm_weight, op, "norm_bias needs norm_weight");
  require(!a.norm_weight || (a.mean && a.rstd), op, "a LayerNorm needs mean and rstd buffers");
  require(!a.norm_weight || a.eps > 0, op, "eps must be > 0");
  require_cuda_device(op);
  const Derived d = derive(a.geometry);
  const std::int64_t rows = a.geometry.batch * d.tokens;
  if (rows == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int threads = row_threads(d.features);
  const size_t smem = sizeof(float) * static_cast<size_t>(d.features);
  dispatch_dtype_with_param(a.x_dtype, a.w_dtype, [&](auto t, auto w) {
    using T = typename decltype(t)::type;
    using W = typename decltype(w)::type;
    auto kernel = a.norm_weight ? soft_split_fwd_kernel<T, W, true> : soft_split_fwd_kernel<T, W, false>;
    kernel<<<grid_rows(rows), threads, smem, stream>>>(
        reinterpret_cast<const T*>(a.x), reinterpret_cast<const W*>(a.norm_weight),
        reinterpret_cast<const W*>(a.norm_bias), reinterpret_cast<T*>(a.y), reinterpret_cast<float*>(a.mean),
        reinterpret_cast<float*>(a.rstd), a.geometry, d, static_cast<float>(a.eps));
  });
  check_launch(op);
}

void soft_split_bwd(const SoftSplitBwdArgs& a) {
  const char* op = "soft_split_bwd";
  check_geometry(op, a.geometry, a.x_dtype, a.w_dtype);
  require(a.dy && a.x, op, "dy and x must be non-null device pointers");
  const bool norm = a.norm_weight != 0;
  require(!norm || (a.mean && a.rstd && a.row_coefs), op, "a LayerNorm needs mean, rstd and row_coefs");
  require(norm || (!a.dweight_partial && !a.dbias_partial), op, "dweight/dbias partials need a LayerNorm");
  require(!(a.dweight_partial || a.dbias_partial) || a.num_partials > 0, op, "num_partials must be > 0");
  require_cuda_device(op);
  const Derived d = derive(a.geometry);
  const std::int64_t rows = a.geometry.batch * d.tokens;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int threads = row_threads(d.features);
  const size_t smem = sizeof(float) * static_cast<size_t>(d.features);
  if (rows == 0) {
    for (std::uintptr_t p : {a.dweight_partial, a.dbias_partial}) {
      if (p) cudaMemsetAsync(reinterpret_cast<void*>(p), 0, smem * a.num_partials, stream);
    }
    check_launch(op);
    return;
  }
  dispatch_dtype_with_param(a.x_dtype, a.w_dtype, [&](auto t, auto w) {
    using T = typename decltype(t)::type;
    using W = typename decltype(w)::type;
    if (norm) {
      const int blocks = a.num_partials > 0 ? a.num_partials : grid_rows(rows);
      ln_bwd_stats_kernel<T, W><<<blocks, threads, smem, stream>>>(
          reinterpret_cast<const T*>(a.dy), reinterpret_cast<const T*>(a.x), reinterpret_cast<const W*>(a.norm_weight),
          reinterpret_cast<const float*>(a.mean), reinterpret_cast<const float*>(a.rstd),
          reinterpret_cast<float*>(a.row_coefs), reinterpret_cast<float*>(a.dweight_partial),
          reinterpret_cast<float*>(a.dbias_partial), a.geometry, d);
    }
    if (a.dx) {
      const PixelStrides ds{a.dx_stride_b, a.dx_stride_c, a.dx_stride_h, a.dx_stride_w,
                            (a.dx_stride_c < 0 ? -a.dx_stride_c : a.dx_stride_c) <
                                (a.dx_stride_w < 0 ? -a.dx_stride_w : a.dx_stride_w)};
      const std::int64_t total = a.geometry.batch * a.geometry.channels * a.geometry.height * a.geometry.width;
      const std::int64_t blocks = (total + kFoldThreads - 1) / kFoldThreads;
      const int grid = static_cast<int>(blocks < (1 << 24) ? blocks : (1 << 24));
      auto kernel = norm ? fold_kernel<T, W, true> : fold_kernel<T, W, false>;
      kernel<<<grid, kFoldThreads, 0, stream>>>(
          reinterpret_cast<const T*>(a.dy), reinterpret_cast<const T*>(a.x), reinterpret_cast<const W*>(a.norm_weight),
          reinterpret_cast<const float*>(a.mean), reinterpret_cast<const float*>(a.rstd),
          reinterpret_cast<const float*>(a.row_coefs), reinterpret_cast<T*>(a.dx), a.geometry, d, ds);
    }
  });
  check_launch(op);
}

}  // namespace fastvit
