// Shared helpers for fastvit's CUDA kernels: dtype codes, host-side checks with readable messages,
// and block-wide reductions. Nothing here depends on torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "codes.h"

namespace fastvit {

// A CUDA version number (cudaDriverGetVersion, CUDART_VERSION: 1000 * major + 10 * minor) as "major.minor".
inline std::string cuda_version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

// Why the CUDA runtime cannot use a GPU on this machine, with the fix; "" when it can. Never throws.
// The runtime is linked statically (CMakeLists.txt), so it needs a driver at least as new as the toolkit
// fastvit._C was built with, even where torch (with its own runtime) runs on the GPU fine.
inline std::string cuda_device_problem() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count > 0) return "";
  cudaGetLastError();  // clear the sticky error so later calls start clean
  int driver = 0;
  if (err == cudaErrorInsufficientDriver && cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) {
    // A driver is installed but older than this runtime (no driver at all reports version 0: below).
    return "the NVIDIA driver supports CUDA up to " + cuda_version_text(driver) + ", older than the CUDA " +
           cuda_version_text(CUDART_VERSION) + " runtime fastvit._C was built with (cudaGetDeviceCount: " +
           cudaGetErrorString(err) + "). Update the NVIDIA driver" +
           (CUDART_VERSION >= 13000 && CUDART_VERSION < 14000 ? std::string(" (CUDA 13 needs r580 or newer)") : "") +
           ", or rebuild fastvit with the CUDA toolkit matching the driver (`pip install -e .` with that nvcc on "
           "PATH), or use backend='triton' / 'torch'.";
  }
  return std::string("no usable CUDA device (cudaGetDeviceCount: ") +
         (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
         (err == cudaErrorInsufficientDriver ? "; no NVIDIA driver is installed" : "") + "). The 'cuda' backend needs an NVIDIA GPU and driver; on this machine use backend='torch', "
         "or backend='triton' with TRITON_INTERPRET=1.";
}

// Throws unless a CUDA device is usable, so a call on a machine without a GPU (or with a driver too old
// for the runtime) is an exception with a hint, never a crash.
inline void require_cuda_device(const char* op) {
  const std::string problem = cuda_device_problem();
  if (!problem.empty()) throw std::runtime_error(std::string("fastvit._C.") + op + ": " + problem);
}

inline void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastvit._C.") + op + ": kernel launch failed: " + cudaGetErrorString(err) +
                             ". Rerun with CUDA_LAUNCH_BLOCKING=1 and report the shapes and dtypes.");
  }
}

inline void require(bool cond, const char* op, const std::string& msg) {
  if (!cond) throw std::invalid_argument(std::string("fastvit._C.") + op + ": " + msg);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
// `scratch` holds 33 floats of shared memory; the trailing __syncthreads makes it reusable.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < num_warps ? scratch[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  float total = scratch[32];
  __syncthreads();
  return total;
}

}  // namespace fastvit
