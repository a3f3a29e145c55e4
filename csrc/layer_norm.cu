// LayerNorm with an optional fused residual add, forward and backward.
//
//   z = x + residual (rounded to x's dtype, and written out: the transformer's residual stream)
//   y = (z - mean(z)) * rstd * weight + bias,   rstd = 1 / sqrt(var(z) + eps)
//
// One thread block per row. Rows up to 8192 wide (4096 in the backward) are held in registers (VPT values
// per thread), so each element is read once and written once; wider rows loop over global memory. Statistics and all
// arithmetic are fp32; x / residual / y share a dtype; weight and bias are that dtype or fp32.
//
// The backward gives dz = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)) (+ d residual_out),
// which is both dx and dresidual, and per-block fp32 partial sums of dweight = sum(dy * xhat) and
// dbias = sum(dy); the caller reduces the (num_partials, cols) partials.
#include "common.h"
#include "layer_norm.h"

namespace fastvit {
namespace {

constexpr int kMaxThreads = 1024;
// The backward's register path keeps three VPT-float arrays and two VPT accumulators live: at VPT=8 it
// took 94-98 registers per thread on sm_80/sm_90 (nvcc -Xptxas -v), so blocks above ~608 threads exceed
// the 64K-register file and fail with cudaErrorLaunchOutOfResources. So its register path stops at 512
// threads (rows <= 4096) and wider rows take the looping kernel; __launch_bounds__ makes ptxas plan for
// that block size (79-84 registers at VPT=8, no spills), so a launch can never run out of registers.
constexpr int kMaxBwdThreads = 512;

template <typename T, typename W, int VPT>
__global__ void layer_norm_fwd_kernel(LayerNormFwdArgs a) {
  __shared__ float scratch[33];
  const std::int64_t row = blockIdx.x;
  const int cols = static_cast<int>(a.cols);
  const T* x = reinterpret_cast<const T*>(a.x) + row * a.x_stride;
  const T* res = a.residual ? reinterpret_cast<const T*>(a.residual) + row * a.residual_stride : nullptr;
  T* res_out = a.residual_out ? reinterpret_cast<T*>(a.residual_out) + row * a.residual_out_stride : nullptr;
  T* y = reinterpret_cast<T*>(a.y) + row * a.y_stride;
  const W* w = reinterpret_cast<const W*>(a.weight);
  const W* b = reinterpret_cast<const W*>(a.bias);

  // Loads x (+ residual, rounded to T as the stored residual stream is) and writes residual_out.
  auto load = [&](int col) {
    float v = to_float(x[col]);
    if (res) {
      v = to_float(from_float<T>(v + to_float(res[col])));
      if (res_out) res_out[col] = from_float<T>(v);
    }
    return v;
  };
  float mean, rstd;
  if constexpr (VPT > 0) {
    float v[VPT];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = threadIdx.x + k * blockDim.x;
      v[k] = col < cols ? load(col) : 0.f;
      sum += v[k];
    }
    mean = block_sum(sum, scratch) / cols;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = threadIdx.x + k * blockDim.x;
      const float d = col < cols ? v[k] - mean : 0.f;
      sq += d * d;
    }
    rstd = rsqrtf(block_sum(sq, scratch) / cols + static_cast<float>(a.eps));
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = threadIdx.x + k * blockDim.x;
      if (col < cols) {
        float out = (v[k] - mean) * rstd * to_float(w[col]);
        if (b) out += to_float(b[col]);
        y[col] = from_float<T>(out);
      }
    }
  } else {
    // Wide rows: three passes; after the first, z is re-read from residual_out (or x).
    const T* z = res ? res_out : x;
    float sum = 0.f;
    for (int col = threadIdx.x; col < cols; col += blockDim.x) sum += load(col);
    mean = block_sum(sum, scratch) / cols;
    float sq = 0.f;
    for (int col = threadIdx.x; col < cols; col += blockDim.x) {
      const float d = to_float(z[col]) - mean;
      sq += d * d;
    }
    rstd = rsqrtf(block_sum(sq, scratch) / cols + static_cast<float>(a.eps));
    for (int col = threadIdx.x; col < cols; col += blockDim.x) {
      float out = (to_float(z[col]) - mean) * rstd * to_float(w[col]);
      if (b) out += to_float(b[col]);
      y[col] = from_float<T>(out);
    }
  }
  if (threadIdx.x == 0) {
    reinterpret_cast<float*>(a.mean)[row] = mean;
    reinterpret_cast<float*>(a.rstd)[row] = rstd;
  }
}

template <typename T, typename W, int VPT>
__global__ void __launch_bounds__(kMaxBwdThreads) layer_norm_bwd_kernel(LayerNormBwdArgs a) {
  __shared__ float scratch[33];
  const int cols = static_cast<int>(a.cols);
  const W* w = reinterpret_cast<const W*>(a.weight);
  float* dw_part = reinterpret_cast<float*>(a.dweight_partial) + static_cast<std::int64_t>(blockIdx.x) * cols;
  float* db_part = a.dbias_partial ? reinterpret_cast<float*>(a.dbias_partial) + static_cast<std::int64_t>(blockIdx.x) * cols
                                   : nullptr;
  constexpr int kRegs = VPT > 0 ? VPT : 1;
  float acc_dw[kRegs], acc_db[kRegs];
#pragma unroll
  for (int k = 0; k < kRegs; ++k) acc_dw[k] = acc_db[k] = 0.f;
  if constexpr (VPT == 0) {
    for (int col = threadIdx.x; col < cols; col += blockDim.x) {
      dw_part[col] = 0.f;
      if (db_part) db_part[col] = 0.f;
    }
  }

  for (std::int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* z = reinterpret_cast<const T*>(a.z) + row * a.z_stride;
    const T* dy = reinterpret_cast<const T*>(a.dy) + row * a.dy_stride;
    const T* dres = a.dresidual_out ? reinterpret_cast<const T*>(a.dresidual_out) + row * a.dresidual_out_stride : nullptr;
    T* dz = reinterpret_cast<T*>(a.dz) + row * a.dz_stride;
    const float mean = reinterpret_cast<const float*>(a.mean)[row];
    const float rstd = reinterpret_cast<const float*>(a.rstd)[row];
    if constexpr (VPT > 0) {
      float xhat[VPT], g[VPT], wdy[VPT];
      float s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int col = threadIdx.x + k * blockDim.x;
        if (col < cols) {
          xhat[k] = (to_float(z[col]) - mean) * rstd;
          g[k] = to_float(dy[col]);
          wdy[k] = g[k] * to_float(w[col]);
        } else {
          xhat[k] = g[k] = wdy[k] = 0.f;
        }
        s1 += xhat[k] * wdy[k];
        s2 += wdy[k];
      }
      const float c1 = block_sum(s1, scratch) / cols;
      const float c2 = block_sum(s2, scratch) / cols;
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int col = threadIdx.x + k * blockDim.x;
        if (col < cols) {
          float d = (wdy[k] - xhat[k] * c1 - c2) * rstd;
          if (dres) d += to_float(dres[col]);
          dz[col] = from_float<T>(d);
          acc_dw[k] += g[k] * xhat[k];
          acc_db[k] += g[k];
        }
      }
    } else {
      float s1 = 0.f, s2 = 0.f;
      for (int col = threadIdx.x; col < cols; col += blockDim.x) {
        const float xh = (to_float(z[col]) - mean) * rstd;
        const float wd = to_float(dy[col]) * to_float(w[col]);
        s1 += xh * wd;
        s2 += wd;
      }
      const float c1 = block_sum(s1, scratch) / cols;
      const float c2 = block_sum(s2, scratch) / cols;
      for (int col = threadIdx.x; col < cols; col += blockDim.x) {
        const float xh = (to_float(z[col]) - mean) * rstd;
        const float gy = to_float(dy[col]);
        float d = (gy * to_float(w[col]) - xh * c1 - c2) * rstd;
        if (dres) d += to_float(dres[col]);
        dz[col] = from_float<T>(d);
        dw_part[col] += gy * xh;  // each column belongs to one thread of this block: no race
        if (db_part) db_part[col] += gy;
      }
    }
  }
  if constexpr (VPT > 0) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = threadIdx.x + k * blockDim.x;
      if (col < cols) {
        dw_part[col] = acc_dw[k];
        if (db_part) db_part[col] = acc_db[k];
      }
    }
  }
}

// Smallest values-per-thread in {2, 4, 8} that fits the row in <= 256 threads, else 8 with up to
// max_threads (kMaxThreads forward, kMaxBwdThreads backward), else 0 (the looping kernel with 256 threads).
struct LaunchShape {
  int vpt, threads;
};

LaunchShape launch_shape(std::int64_t cols, int max_threads) {
  auto threads_for = [&](int vpt) { return static_cast<int>(((cols + vpt - 1) / vpt + 31) / 32 * 32); };
  for (int vpt : {2, 4, 8}) {
    if (threads_for(vpt) <= 256) return {vpt, threads_for(vpt)};
  }
  if (threads_for(8) <= max_threads) return {8, threads_for(8)};
  return {0, 256};
}

void check_dtypes(const char* op, int x_dtype, int w_dtype) {
  require(x_dtype == kFloat32 || x_dtype == kFloat16 || x_dtype == kBFloat16, op,
          "unsupported dtype code " + std::to_string(x_dtype) + " (expected float32, float16 or bfloat16)");
  require(w_dtype == x_dtype || w_dtype == kFloat32, op,
          std::string("weight dtype ") + dtype_name(w_dtype) + " must be the input dtype (" + dtype_name(x_dtype) +
              ") or float32");
}

// x_dtype / w_dtype were validated by check_dtypes.
template <template <typename, typename, int> class Launcher, typename... Args>
void dispatch_types(int x_dtype, int w_dtype, Args&&... args) {
  switch (x_dtype) {
    case kFloat32: Launcher<float, float, 0>::run(args...); break;
    case kFloat16:
      if (w_dtype == kFloat32) Launcher<__half, float, 0>::run(args...);
      else Launcher<__half, __half, 0>::run(args...);
      break;
    case kBFloat16:
      if (w_dtype == kFloat32) Launcher<__nv_bfloat16, float, 0>::run(args...);
      else Launcher<__nv_bfloat16, __nv_bfloat16, 0>::run(args...);
      break;
  }
}

template <typename T, typename W, int Unused>
struct FwdLauncher {
  static void run(const LayerNormFwdArgs& a) {
    const LaunchShape s = launch_shape(a.cols, kMaxThreads);
    auto stream = reinterpret_cast<cudaStream_t>(a.stream);
    const dim3 grid(static_cast<unsigned>(a.rows));
    switch (s.vpt) {
      case 2: layer_norm_fwd_kernel<T, W, 2><<<grid, s.threads, 0, stream>>>(a); break;
      case 4: layer_norm_fwd_kernel<T, W, 4><<<grid, s.threads, 0, stream>>>(a); break;
      case 8: layer_norm_fwd_kernel<T, W, 8><<<grid, s.threads, 0, stream>>>(a); break;
      default: layer_norm_fwd_kernel<T, W, 0><<<grid, s.threads, 0, stream>>>(a); break;
    }
  }
};

template <typename T, typename W, int Unused>
struct BwdLauncher {
  static void run(const LayerNormBwdArgs& a) {
    const LaunchShape s = launch_shape(a.cols, kMaxBwdThreads);
    auto stream = reinterpret_cast<cudaStream_t>(a.stream);
    const dim3 grid(static_cast<unsigned>(a.num_partials));
    switch (s.vpt) {
      case 2: layer_norm_bwd_kernel<T, W, 2><<<grid, s.threads, 0, stream>>>(a); break;
      case 4: layer_norm_bwd_kernel<T, W, 4><<<grid, s.threads, 0, stream>>>(a); break;
      case 8: layer_norm_bwd_kernel<T, W, 8><<<grid, s.threads, 0, stream>>>(a); break;
      default: layer_norm_bwd_kernel<T, W, 0><<<grid, s.threads, 0, stream>>>(a); break;
    }
  }
};

void check_common(const char* op, std::int64_t rows, std::int64_t cols) {
  require(rows >= 0, op, "rows must be >= 0, got " + std::to_string(rows));
  require(cols > 0, op, "the normalised dimension must be > 0, got " + std::to_string(cols));
  require(cols <= (std::int64_t{1} << 30), op, "the normalised dimension is too large: " + std::to_string(cols));
  require(rows < (std::int64_t{1} << 31), op, "too many rows for one launch: " + std::to_string(rows));
}

}  // namespace

void layer_norm_fwd(const LayerNormFwdArgs& a) {
  const char* op = "layer_norm_fwd";
  check_common(op, a.rows, a.cols);
  require(a.x && a.weight && a.y && a.mean && a.rstd, op, "x, weight, y, mean and rstd must be non-null device pointers");
  require(!a.residual || a.residual_out, op, "a residual needs a residual_out buffer");
  require(a.x_stride >= a.cols && a.y_stride >= a.cols, op, "row strides must be >= the row width");
  check_dtypes(op, a.x_dtype, a.w_dtype);
  require_cuda_device(op);
  if (a.rows == 0) return;
  dispatch_types<FwdLauncher>(a.x_dtype, a.w_dtype, a);
  check_launch(op);
}

void layer_norm_bwd(const LayerNormBwdArgs& a) {
  const char* op = "layer_norm_bwd";
  check_common(op, a.rows, a.cols);
  require(a.dy && a.z && a.weight && a.mean && a.rstd && a.dz && a.dweight_partial, op,
          "dy, z, weight, mean, rstd, dz and dweight_partial must be non-null device pointers");
  require(a.num_partials > 0, op, "num_partials must be > 0");
  check_dtypes(op, a.x_dtype, a.w_dtype);
  require_cuda_device(op);
  if (a.rows == 0) return;
  dispatch_types<BwdLauncher>(a.x_dtype, a.w_dtype, a);
  check_launch(op);
}

}  // namespace fastvit
