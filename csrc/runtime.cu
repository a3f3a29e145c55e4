// Runtime facts the Python side reports in `python -m fastvit.info`.
#include "common.h"
#include "runtime.h"

namespace fastvit {

std::string cudart_version() { return cuda_version_text(CUDART_VERSION); }

std::string device_problem() { return cuda_device_problem(); }

std::string device_status() {
  const std::string problem = cuda_device_problem();
  if (!problem.empty()) return problem;
  int count = 0;
  cudaGetDeviceCount(&count);
  return std::to_string(count) + " CUDA device(s) visible";
}

}  // namespace fastvit
