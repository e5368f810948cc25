// Exact per-image FLOP model of a timm VisionTransformer classifier and of the MAE path,
// in torch.utils.flop_counter.FlopCounterMode conventions with attention as plain matmuls
// (timm fused attention off): matmul 2*M*N*K, conv 2*N*Cout*Hout*Wout*Cin*k*k, everything
// else 0; backward = 2x forward for every counted op except the patch-embed conv (its input
// needs no gradient: 1x).  *_flash variants count the two attention matmuls' backward at
// 2.5x forward (as FlopCounterMode counts scaled_dot_product_flash_attention).
#pragma once
#include <cstdint>

namespace dietcl {

struct ViTSpec {
    int64_t img_size = 224;
    int64_t patch = 16;
    int64_t in_chans = 3;
    int64_t embed_dim = 768;
    int64_t depth = 12;
    int64_t heads = 12;
    double mlp_ratio = 4.0;
    int64_t num_classes = 1000;
    bool class_token = true;
    int64_t decoder_dim = 512;
    int64_t decoder_depth = 8;
    int64_t decoder_heads = 16;
    double mask_ratio = 0.75;
};

struct FlopsPerImage {
    int64_t classify_fwd = 0;
    int64_t classify_fwd_bwd = 0;
    int64_t mae_fwd = 0;
    int64_t mae_fwd_bwd = 0;
    int64_t classify_fwd_bwd_flash = 0;
    int64_t mae_fwd_bwd_flash = 0;
};

// Throws std::invalid_argument naming the offending field and value.
void validate(const ViTSpec& spec);
FlopsPerImage flops_per_image(const ViTSpec& spec);

}  // namespace dietcl
