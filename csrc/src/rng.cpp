#include "dietcl/rng.hpp"

namespace dietcl {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define DIETCL_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define DIETCL_MULTIVERSION
#endif

namespace {
// Rounds outside, lanes inside: the lane loop vectorises (same result on every ISA).
DIETCL_MULTIVERSION
void feistel32_rounds(uint32_t* __restrict x, int m, const uint32_t* k, const uint32_t* k2, const int* ls,
                      const int* hs, int rounds) {
    for (int i = 0; i < rounds; ++i) {
        const int l = ls[i], h = hs[i];
        const uint32_t ki = k[i], k2i = k2[i], ml = (uint32_t(1) << l) - 1;
        const int sh = 32 - h;
        for (int j = 0; j < m; ++j) {
            const uint32_t v = x[j];
            const uint32_t L = v >> l;
            const uint32_t R = v & ml;
            uint32_t z = (R ^ ki) * 0x9e3779b9u + k2i;  // == FeistelPermutation::round32
            z ^= z >> 15;
            z *= 0x85ebca6bu;
            z ^= z >> 13;
            x[j] = (R << h) | (L ^ (z >> sh));
        }
    }
}
}  // namespace

void FeistelPermutation::encrypt32_array(uint32_t* x, int m) const {
    uint32_t k[kMaxRounds], k2[kMaxRounds];
    int ls[kMaxRounds], hs[kMaxRounds];
    for (int i = 0; i < rounds_; ++i) {
        k[i] = static_cast<uint32_t>(keys_[i]);
        k2[i] = static_cast<uint32_t>(keys_[i] >> 32);
        ls[i] = (i & 1) ? hi_ : lo_;
        hs[i] = (i & 1) ? lo_ : hi_;
    }
    feistel32_rounds(x, m, k, k2, ls, hs, rounds_);
}

void FeistelPermutation::map_batch(const uint64_t* in, uint64_t* out, int m) const {
    if (n_ <= kTableMax) {
        for (int i = 0; i < m; ++i) out[i] = n_ <= 1 ? 0 : table_[in[i]];
        return;
    }
    if (bits_ <= 32) {
        const uint32_t n = static_cast<uint32_t>(n_ - 1);  // compare with <= n-1 (n may be 2^32)
        uint32_t x[kMaxBatch], y[kMaxBatch];
        int pend[kMaxBatch];
        for (int i = 0; i < m; ++i) x[i] = static_cast<uint32_t>(in[i]);
        encrypt32_array(x, m);
        int np = 0;
        for (int i = 0; i < m; ++i) {
            pend[np] = i;
            np += x[i] > n ? 1 : 0;
        }
        while (np > 0) {  // cycle-walk the stragglers, compacted
            for (int j = 0; j < np; ++j) y[j] = x[pend[j]];
            encrypt32_array(y, np);
            int k = 0;
            for (int j = 0; j < np; ++j) {
                x[pend[j]] = y[j];
                pend[k] = pend[j];
                k += y[j] > n ? 1 : 0;
            }
            np = k;
        }
        for (int i = 0; i < m; ++i) out[i] = x[i];
        return;
    }
    for (int i = 0; i < m; ++i) {
        uint64_t v = in[i];
        do {
            v = encrypt64(v);
        } while (v >= n_);
        out[i] = v;
    }
}

}  // namespace dietcl
