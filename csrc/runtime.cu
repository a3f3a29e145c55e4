// Runtime facts the Python side reports in `python -m fastvit.info`.
#include "common.h"
#include "runtime.h"

namespace fastvit {

std::string cudart_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

std::string device_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  }
  return std::to_string(count) + " CUDA device(s) visible";
}

}  // namespace fastvit
