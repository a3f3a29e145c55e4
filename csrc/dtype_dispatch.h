// Turns run-time dtype codes (common.h) into the template arguments of fastvit's kernels. Callers pass a
// generic lambda taking Tag<T> arguments; the codes must have been validated (check_float_dtype).
#pragma once

#include <string>

#include "common.h"

namespace fastvit {

template <typename T>
struct Tag {
  using type = T;
};

inline bool is_float_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }

inline void check_float_dtype(const char* op, const char* name, int code) {
  require(is_float_dtype(code), op,
          std::string(name) + ": unsupported dtype code " + std::to_string(code) +
              " (expected float32, float16 or bfloat16)");
}

template <typename F>
void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat16: f(Tag<__half>{}); break;
    case kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: f(Tag<float>{}); break;
  }
}

// An activation dtype with a parameter dtype that is either the same or float32 (AMP's fp32 weights).
template <typename F>
void dispatch_dtype_with_param(int code, int param_code, F&& f) {
  dispatch_dtype(code, [&](auto t) {
    using T = typename decltype(t)::type;
    if (param_code == kFloat32) f(t, Tag<float>{});
    else f(t, Tag<T>{});
  });
}

}  // namespace fastvit
