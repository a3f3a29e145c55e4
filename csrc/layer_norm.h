// Host entry points of csrc/layer_norm.cu. Pointers are device addresses passed as integers; strides
// are in elements; the last dimension of every 2-D operand is contiguous.
#pragma once

#include <cstdint>

namespace fastvit {

struct LayerNormFwdArgs {
  std::uintptr_t x, residual, weight, bias;          // (rows, cols) x / residual; (cols,) weight / bias
  std::uintptr_t y, residual_out, mean, rstd;        // (rows, cols) y / x+residual; (rows,) fp32 stats
  std::int64_t rows, cols;
  std::int64_t x_stride, residual_stride, y_stride, residual_out_stride;
  double eps;
  int x_dtype, w_dtype;                               // DTypeCode; residual/y use x_dtype
  std::uintptr_t stream;
};

struct LayerNormBwdArgs {
  std::uintptr_t dy, dresidual_out, z, weight, mean, rstd;  // z = the normalised input (x + residual)
  std::uintptr_t dz, dweight_partial, dbias_partial;        // (rows, cols) dz; (num_partials, cols) fp32
  std::int64_t rows, cols;
  std::int64_t dy_stride, dresidual_out_stride, z_stride, dz_stride;
  int num_partials;
  int x_dtype, w_dtype;
  std::uintptr_t stream;
};

void layer_norm_fwd(const LayerNormFwdArgs& a);
void layer_norm_bwd(const LayerNormBwdArgs& a);

}  // namespace fastvit
