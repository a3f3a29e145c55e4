// Host entry points of csrc/soft_split.cu. Pointers are device addresses as integers (0: absent);
// strides in elements. The input is read as an image (B, C, H, W) through its (b, c, h, w) strides:
// NCHW, channels_last, or T2T's (B, L, C) tokens with strides (L * C, 1, W * C, C).
#pragma once

#include <cstdint>

namespace fastvit {

struct SoftSplitGeometry {
  std::int64_t batch, channels, height, width;
  std::int64_t stride_b, stride_c, stride_h, stride_w;  // of the input x
  std::int64_t kh, kw, sh, sw, ph, pw;                  // kernel, stride, zero padding
};

struct SoftSplitFwdArgs {
  std::uintptr_t x, norm_weight, norm_bias;  // norm_*: (F,) or 0 (no LayerNorm), F = C * kh * kw
  std::uintptr_t y;                          // (B * L, F) contiguous, L = Ho * Wo
  std::uintptr_t mean, rstd;                 // (B * L,) fp32, with a LayerNorm only
  SoftSplitGeometry geometry;
  double eps;
  int x_dtype, w_dtype;  // DTypeCode; y in x_dtype; norm_* in w_dtype (x_dtype or float32)
  std::uintptr_t stream;
};

struct SoftSplitBwdArgs {
  std::uintptr_t dy;                         // (B * L, F) contiguous
  std::uintptr_t x, norm_weight, mean, rstd; // the forward's input and LayerNorm state (norm_weight 0: none)
  std::uintptr_t row_coefs;                  // workspace (B * L, 2) fp32, with a LayerNorm
  std::uintptr_t dx;                         // x's shape through dx_stride_*, or 0 (not needed)
  std::uintptr_t dweight_partial, dbias_partial;  // (num_partials, F) fp32, or 0 (not needed)
  SoftSplitGeometry geometry;
  std::int64_t dx_stride_b, dx_stride_c, dx_stride_h, dx_stride_w;
  int num_partials;
  int x_dtype, w_dtype;
  std::uintptr_t stream;
};

void soft_split_fwd(const SoftSplitFwdArgs& a);
void soft_split_bwd(const SoftSplitBwdArgs& a);

}  // namespace fastvit
