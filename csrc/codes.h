// The integer codes the entry points take for dtypes and activations. Plain C++ (no CUDA, no torch), so
// csrc/bindings.cpp exports them as fastvit._C.DTYPE_CODES / ACTIVATION_CODES, the only tables
// fastvit/_ext.py and fastvit/ops/_cuda_backends.py read.
#pragma once

namespace fastvit {

enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

enum ActivationCode : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActQuickGelu = 3 };

inline const char* activation_name(int code) {
  switch (code) {
    case kActNone: return "none";
    case kActGelu: return "gelu";
    case kActGeluTanh: return "gelu_tanh";
    case kActQuickGelu: return "quick_gelu";
    default: return "unknown";
  }
}

}  // namespace fastvit
