#include "dietcl/rng.hpp"

#include <algorithm>

namespace dietcl {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define DIETCL_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define DIETCL_MULTIVERSION
#endif

namespace {
constexpr int kLanes = 8;
static_assert(FeistelPermutation::kMaxBatch % kLanes == 0, "batch must hold whole vectors");

// Rounds outside, lanes inside: the lane loops vectorise (same result on every ISA).
// Rounds alternate: L <- (L + F(R)) mod a (even i), R <- (R + F(L)) mod b (odd i).
DIETCL_MULTIVERSION
void feistel_rounds(uint32_t* __restrict L, uint32_t* __restrict R, int m, const uint32_t* k1,
                    const uint32_t* k2, int rounds, uint32_t a, uint32_t b) {
    for (int i = 0; i < rounds; i += 2) {
        const uint32_t ka = k1[i], ka2 = k2[i];
        for (int j = 0; j < m; ++j) {
            uint32_t z = (R[j] ^ ka) * 0x9e3779b9u + ka2;  // == FeistelPermutation::round32
            z ^= z >> 15;
            z *= 0x85ebca6bu;
            z ^= z >> 13;
            const uint32_t s = L[j] + static_cast<uint32_t>((static_cast<uint64_t>(z) * a) >> 32);
            L[j] = std::min(s, s - a);  // == s mod a (s < 2a; s - a wraps above s when s < a)
        }
        if (i + 1 >= rounds) break;
        const uint32_t kb = k1[i + 1], kb2 = k2[i + 1];
        for (int j = 0; j < m; ++j) {
            uint32_t z = (L[j] ^ kb) * 0x9e3779b9u + kb2;
            z ^= z >> 15;
            z *= 0x85ebca6bu;
            z ^= z >> 13;
            const uint32_t s = R[j] + static_cast<uint32_t>((static_cast<uint64_t>(z) * b) >> 32);
            R[j] = std::min(s, s - b);
        }
    }
}

// x / d for x < 2^32 via a precomputed magic = floor((2^64 - 1) / d) + 1 (Lemire et al.).
inline uint64_t fastdiv32(uint64_t x, uint64_t magic) {
#if defined(__SIZEOF_INT128__)
    return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * magic) >> 64);
#else
    const uint64_t xl = x & 0xffffffffULL, ml = magic & 0xffffffffULL, mh = magic >> 32;
    return (((xl * ml) >> 32) + xl * mh) >> 32;  // x < 2^32: exact high word of x * magic
#endif
}
}  // namespace

void FeistelPermutation::encrypt_split(uint32_t* L, uint32_t* R, int m) const {
    // Whole vectors only: pad the lanes up to a multiple of kLanes (arrays hold kMaxBatch,
    // a multiple of kLanes) with zeros, encrypt them too and ignore them; no scalar tail.
    const int mp = (m + kLanes - 1) / kLanes * kLanes;
    for (int j = m; j < mp; ++j) L[j] = R[j] = 0;
    feistel_rounds(L, R, mp, k1_, k2_, rounds_, a_, b_);
}

void FeistelPermutation::finish(const uint32_t* L, const uint32_t* R, uint64_t* out, int m) const {
    const uint64_t b = b_;
    uint64_t mx = 0;
    for (int i = 0; i < m; ++i) {  // vectorises
        const uint64_t v = static_cast<uint64_t>(L[i]) * b + R[i];
        out[i] = v;
        mx = v > mx ? v : mx;
    }
    if (mx < n_) return;
    for (int i = 0; i < m; ++i) {  // cycle-walk the rare values in [n, a*b) (probability < 1/sqrt(n))
        uint64_t v = out[i];
        while (v >= n_) v = encrypt(v);
        out[i] = v;
    }
}

void FeistelPermutation::map_batch(const uint64_t* in, uint64_t* out, int m) const {
    if (n_ <= kTableMax) {
        for (int i = 0; i < m; ++i) out[i] = n_ <= 1 ? 0 : table_[in[i]];
        return;
    }
    uint32_t L[kMaxBatch], R[kMaxBatch];
    const bool fast = n_ <= (uint64_t(1) << 32);  // then x < 2^32, b < 2^32: fastdiv32 is exact
    for (int i = 0; i < m; ++i) {
        const uint64_t x = in[i];
        const uint64_t q = fast ? fastdiv32(x, bmagic_) : x / b_;
        L[i] = static_cast<uint32_t>(q);
        R[i] = static_cast<uint32_t>(x - q * b_);
    }
    encrypt_split(L, R, m);
    finish(L, R, out, m);
}

void FeistelPermutation::map_stride(uint64_t off, uint64_t stride, uint64_t* out, int m) const {
    if (n_ <= kTableMax) {
        for (int i = 0; i < m; ++i) out[i] = n_ <= 1 ? 0 : table_[off + static_cast<uint64_t>(i) * stride];
        return;
    }
    // (L, R) = divmod(off + i*stride, b), stepped incrementally: no division per item.
    uint32_t L[kMaxBatch], R[kMaxBatch];
    uint64_t l = off / b_;
    uint32_t r = static_cast<uint32_t>(off - l * b_);
    const uint32_t b = b_;
    if (stride == 1) {
        // runs of constant L with R = r, r+1, ..., b-1 (vectorisable fills)
        int i = 0;
        while (i < m) {
            const int len = static_cast<int>(std::min<uint64_t>(b - r, static_cast<uint64_t>(m - i)));
            const uint32_t lv = static_cast<uint32_t>(l);
            for (int j = 0; j < len; ++j) {
                L[i + j] = lv;
                R[i + j] = r + static_cast<uint32_t>(j);
            }
            i += len;
            ++l;
            r = 0;
        }
    } else {
        const uint64_t ds = stride / b_;
        const uint32_t rs = static_cast<uint32_t>(stride - ds * b_);
        for (int i = 0; i < m; ++i) {
            L[i] = static_cast<uint32_t>(l);
            R[i] = r;
            const uint32_t t = r + rs;  // r, rs < b <= 2^31: no overflow
            const bool carry = t >= b;
            r = carry ? t - b : t;
            l += ds + (carry ? 1 : 0);
        }
    }
    encrypt_split(L, R, m);
    finish(L, R, out, m);
}

}  // namespace dietcl
