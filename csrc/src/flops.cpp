#include "dietcl/flops.hpp"

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace dietcl {

namespace {
[[noreturn]] void bad(const std::string& field, const std::string& value, const std::string& why) {
    throw std::invalid_argument("ViTSpec: " + field + " = " + value + " is invalid: " + why);
}
std::string s(int64_t v) { return std::to_string(v); }
std::string s(double v) { return std::to_string(v); }

// timm Mlp hidden width: int(dim * mlp_ratio).
int64_t hidden(int64_t dim, double ratio) {
    const double h = static_cast<double>(dim) * ratio;
    if (!(h < 9.2e18))  // the cast of a larger (or NaN) double is undefined
        throw std::overflow_error("ViTSpec: embed_dim x mlp_ratio = " + std::to_string(h) +
                                  " overflows 64-bit integers");
    return static_cast<int64_t>(h);
}

// Checked int64 arithmetic: a spec whose FLOP count does not fit 64 bits is an error naming it,
// never a wrapped (negative) count.
[[noreturn]] void overflow() {
    throw std::overflow_error("ViTSpec: the FLOP count of this spec overflows 64-bit integers "
                              "(img_size / patch / embed_dim / depth too large)");
}
int64_t mul(int64_t a, int64_t b) {
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r)) overflow();
    return r;
}
template <typename... T>
int64_t mul(int64_t a, int64_t b, T... rest) { return mul(mul(a, b), rest...); }
int64_t add(int64_t a, int64_t b) {
    int64_t r;
    if (__builtin_add_overflow(a, b, &r)) overflow();
    return r;
}
template <typename... T>
int64_t add(int64_t a, int64_t b, T... rest) { return add(add(a, b), rest...); }
int64_t sub(int64_t a, int64_t b) {
    int64_t r;
    if (__builtin_sub_overflow(a, b, &r)) overflow();
    return r;
}

struct BlockFlops {
    int64_t dense = 0;  // qkv, proj, mlp
    int64_t attn = 0;   // q@k^T and attn@v
};

// One transformer block on N tokens (timm Block: qkv, attention, proj, 2-layer MLP).
BlockFlops block(int64_t N, int64_t D, int64_t H, double ratio) {
    BlockFlops f;
    const int64_t hd = D / H;
    const int64_t Dh = hidden(D, ratio);
    f.dense = add(mul(2, N, D, mul(3, D)), mul(2, N, D, D), mul(2, N, D, Dh, 2));
    f.attn = mul(2, 2, H, N, N, hd);
    return f;
}
}  // namespace

void validate(const ViTSpec& v) {
    auto pos = [](const char* name, int64_t x) {
        if (x <= 0) bad(name, s(x), "must be > 0");
    };
    pos("img_size", v.img_size);
    pos("patch", v.patch);
    pos("in_chans", v.in_chans);
    pos("embed_dim", v.embed_dim);
    pos("depth", v.depth);
    pos("heads", v.heads);
    if (v.img_size % v.patch != 0) bad("img_size", s(v.img_size), "must be divisible by patch = " + s(v.patch));
    if (v.embed_dim % v.heads != 0)
        bad("embed_dim", s(v.embed_dim), "must be divisible by heads = " + s(v.heads));
    if (!(v.mlp_ratio > 0) || !std::isfinite(v.mlp_ratio)) bad("mlp_ratio", s(v.mlp_ratio), "must be finite and > 0");
    if (hidden(v.embed_dim, v.mlp_ratio) <= 0) bad("mlp_ratio", s(v.mlp_ratio), "gives an empty MLP");
    if (v.num_classes < 0) bad("num_classes", s(v.num_classes), "must be >= 0 (0 = no head)");
    if (v.decoder_dim < 0) bad("decoder_dim", s(v.decoder_dim), "must be >= 0");
    if (v.decoder_depth < 0) bad("decoder_depth", s(v.decoder_depth), "must be >= 0");
    if (v.decoder_dim > 0 || v.decoder_depth > 0) {
        pos("decoder_dim", v.decoder_dim);
        pos("decoder_heads", v.decoder_heads);
        if (v.decoder_dim % v.decoder_heads != 0)
            bad("decoder_dim", s(v.decoder_dim), "must be divisible by decoder_heads = " + s(v.decoder_heads));
        if (hidden(v.decoder_dim, v.mlp_ratio) <= 0) bad("mlp_ratio", s(v.mlp_ratio), "gives an empty decoder MLP");
    }
    if (!(v.mask_ratio >= 0.0 && v.mask_ratio < 1.0))
        bad("mask_ratio", s(v.mask_ratio), "must satisfy 0 <= mask_ratio < 1");
    const int64_t L = mul(v.img_size / v.patch, v.img_size / v.patch);
    if (static_cast<int64_t>(static_cast<double>(L) * (1.0 - v.mask_ratio)) < 1)
        bad("mask_ratio", s(v.mask_ratio), "keeps no patch of the " + s(L) + " patches");
}

FlopsPerImage flops_per_image(const ViTSpec& v) {
    validate(v);
    const int64_t g = v.img_size / v.patch;
    const int64_t L = mul(g, g);
    const int64_t D = v.embed_dim;
    const int64_t cls = v.class_token ? 1 : 0;
    const int64_t patch_embed = mul(2, L, D, mul(v.patch, v.patch, v.in_chans));  // conv, 1x backward
    const int64_t head = v.num_classes > 0 ? mul(2, D, v.num_classes) : 0;

    FlopsPerImage r;
    // Classifier: encoder on all L (+cls) tokens.
    {
        const int64_t N = add(L, cls);
        const BlockFlops b = block(N, D, v.heads, v.mlp_ratio);
        const int64_t blocks = mul(v.depth, add(b.dense, b.attn));
        const int64_t attn = mul(v.depth, b.attn);
        r.classify_fwd = add(patch_embed, blocks, head);
        r.classify_fwd_bwd = sub(mul(3, r.classify_fwd), patch_embed);  // fwd + 2x bwd, patch embed 1x
        r.classify_fwd_bwd_flash = add(r.classify_fwd_bwd, attn / 2);  // attention bwd 2.5x fwd
    }
    // MAE (facebookresearch/mae): encoder on kept patches + cls; decoder on all L + cls.
    {
        const int64_t Lk = static_cast<int64_t>(static_cast<double>(L) * (1.0 - v.mask_ratio));
        const int64_t Ne = add(Lk, 1);
        const int64_t Nd = add(L, 1);
        const BlockFlops be = block(Ne, D, v.heads, v.mlp_ratio);
        int64_t fwd = add(patch_embed, mul(v.depth, add(be.dense, be.attn)));
        int64_t attn = mul(v.depth, be.attn);
        if (v.decoder_dim > 0) {
            const int64_t Dd = v.decoder_dim;
            const BlockFlops bd = block(Nd, Dd, v.decoder_heads, v.mlp_ratio);
            fwd = add(fwd, mul(2, Ne, D, Dd));                                      // decoder_embed
            fwd = add(fwd, mul(v.decoder_depth, add(bd.dense, bd.attn)));           // decoder blocks
            fwd = add(fwd, mul(2, Nd, Dd, mul(v.patch, v.patch, v.in_chans)));      // decoder_pred
            attn = add(attn, mul(v.decoder_depth, bd.attn));
        }
        r.mae_fwd = fwd;
        r.mae_fwd_bwd = sub(mul(3, fwd), patch_embed);
        r.mae_fwd_bwd_flash = add(r.mae_fwd_bwd, attn / 2);
    }
    return r;
}

}  // namespace dietcl
