// Host-side runtime queries (csrc/runtime.cu).
#pragma once

#include <string>

namespace fastvit {

std::string cudart_version();  // the CUDA runtime fastvit._C was built with (static cudart)
std::string device_status();   // what cudaGetDeviceCount says, never throws
std::string device_problem();  // why the kernels cannot use a GPU here (and the fix), "" if they can; never throws

}  // namespace fastvit
