// Host entry points of csrc/patch_embed.cu. Pointers are device addresses as integers (0: absent);
// strides in elements. The image is read through its (b, c, h, w) strides: NCHW or channels_last.
#pragma once

#include <cstdint>

namespace fastvit {

struct PatchEmbedFwdArgs {
  std::uintptr_t x;          // (B, C, H, W) image, any strides
  std::uintptr_t weight;     // (D, C * p * p) contiguous (the conv weight (D, C, p, p) flattened)
  std::uintptr_t bias;       // (D,) or 0
  std::uintptr_t pos_embed;  // (pos_rows, D) contiguous or 0; pos_rows is N (patch rows only) or P + N
  std::uintptr_t prefix;     // (P, D) contiguous or 0 when P == 0
  std::uintptr_t cols;       // workspace (B * N, C * p * p) in x's dtype: the GEMM's gathered operand
  std::uintptr_t out;        // (B, P + N, D) contiguous
  std::int64_t batch, channels, height, width;
  std::int64_t x_stride_b, x_stride_c, x_stride_h, x_stride_w;
  std::int64_t patch, embed_dim, num_prefix, pos_rows;
  int dtype;                 // DTypeCode of every tensor
  bool allow_tf32;
  std::uintptr_t workspace;  // cuBLASLt workspace
  std::int64_t workspace_bytes;
  std::uintptr_t stream;
};

struct PatchEmbedBwdArgs {
  std::uintptr_t dout;     // (B * N, D) patch-row gradients with row stride dout_stride (prefix rows removed)
  std::uintptr_t x, weight;
  std::uintptr_t cols;     // workspace (B * N, C * p * p)
  std::uintptr_t dx;       // (B, C, H, W) through dx strides, or 0 (not needed)
  std::uintptr_t dweight;  // (D, C * p * p) contiguous, or 0 (not needed)
  std::int64_t batch, channels, height, width;
  std::int64_t x_stride_b, x_stride_c, x_stride_h, x_stride_w;
  std::int64_t dx_stride_b, dx_stride_c, dx_stride_h, dx_stride_w;
  std::int64_t patch, embed_dim, dout_stride;
  int dtype;
  bool allow_tf32;
  std::uintptr_t workspace;
  std::int64_t workspace_bytes;
  std::uintptr_t stream;
};

void patch_embed_fwd(const PatchEmbedFwdArgs& a);
void patch_embed_bwd(const PatchEmbedBwdArgs& a);

}  // namespace fastvit
