// Counter-based randomness: splitmix64 mixing and a keyed Feistel permutation on [0, n).
// Everything here is a pure function of its arguments (no state, thread-safe).
#pragma once
#include <cstdint>

namespace dietcl {

inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// Order-dependent hash of a sequence of 64-bit words.
inline uint64_t hash_combine(uint64_t h, uint64_t v) {
    return mix64(h + 0x9e3779b97f4a7c15ULL + mix64(v ^ 0x632be59bd9b4e019ULL));
}
inline uint64_t hash_words(uint64_t a, uint64_t b) { return hash_combine(mix64(a), b); }
inline uint64_t hash_words(uint64_t a, uint64_t b, uint64_t c) { return hash_combine(hash_words(a, b), c); }
inline uint64_t hash_words(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    return hash_combine(hash_words(a, b, c), d);
}
inline uint64_t hash_words(uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e) {
    return hash_combine(hash_words(a, b, c, d), e);
}

// Uniform integer in [0, n) from a 64-bit hash (Lemire multiply-shift; bias < n / 2^64).
inline uint64_t bounded(uint64_t h, uint64_t n) {
#if defined(__SIZEOF_INT128__)
    return static_cast<uint64_t>((static_cast<unsigned __int128>(h) * n) >> 64);
#else
    return h % n;
#endif
}

// Keyed pseudo-random bijection of [0, n): a generalised (mixed-radix) Feistel network on
// [0, a) x [0, b) with a = ceil(sqrt(n)), b = ceil(n / a) (so n <= a*b < n + a): x is split
// as (L, R) = (x / b, x % b) and the rounds alternate L <- (L + F_i(R)) mod a and
// R <- (R + F_{i+1}(L)) mod b (keyed 32-bit round function, multiply-high range reduction);
// the result L*b + R is restricted to [0, n) by cycle-walking (walk probability < 1/sqrt(n),
// so batches are practically straggler-free).  3 rounds, 6 for n <= 4096; n <= 64: an exact
// Fisher-Yates table.  O(1) per query, no memory proportional to n, pure function of (n, key).
// Requires n <= 2^62.
class FeistelPermutation {
public:
    static constexpr int kMaxRounds = 8;
    static constexpr int kMaxBatch = 256;
    static constexpr uint64_t kTableMax = 64;  // n <= 64: exact Fisher-Yates table

    FeistelPermutation() = default;
    FeistelPermutation(uint64_t n, uint64_t key) : n_(n) {
        if (n_ <= kTableMax) {
            for (uint64_t i = 0; i < n_; ++i) table_[i] = static_cast<uint8_t>(i);
            uint64_t st = key;
            for (uint64_t i = n_; i > 1; --i) {
                st += 0x9e3779b97f4a7c15ULL;
                const uint64_t j = bounded(mix64(st), i);
                const uint8_t t = table_[i - 1];
                table_[i - 1] = table_[j];
                table_[j] = t;
            }
            return;
        }
        uint64_t a = isqrt_ceil(n_);
        uint64_t b = (n_ + a - 1) / a;
        a_ = static_cast<uint32_t>(a);
        b_ = static_cast<uint32_t>(b);
        bmagic_ = ~uint64_t(0) / b + 1;  // x / b == mulhi(x, bmagic_) for x < 2^32
        // 3 rounds (Luby-Rackoff: a pseudo-random permutation given pseudo-random round
        // functions); small domains (short halves) get 6 for a well-mixed permutation.
        rounds_ = n_ <= 4096 ? 6 : 3;
        for (int i = 0; i < rounds_; ++i) {
            const uint64_t k = mix64(key + 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(i + 1));
            k1_[i] = static_cast<uint32_t>(k);
            k2_[i] = static_cast<uint32_t>(k >> 32);
        }
    }

    uint64_t size() const { return n_; }

    uint64_t operator()(uint64_t x) const {
        if (n_ <= kTableMax) return n_ <= 1 ? 0 : table_[x];
        do {
            x = encrypt(x);
        } while (x >= n_);
        return x;
    }

    // Batched mapping of m <= kMaxBatch offsets (each < n) -> permuted indices.
    void map_batch(const uint64_t* in, uint64_t* out, int m) const;
    // Same for the arithmetic progression off, off + stride, ..., off + (m-1)*stride (all < n).
    void map_stride(uint64_t off, uint64_t stride, uint64_t* out, int m) const;

    // Keyed 32-bit round function (multiply / xorshift / multiply).
    static uint32_t round32(uint32_t r, uint32_t k, uint32_t k2) {
        uint32_t z = (r ^ k) * 0x9e3779b9u + k2;
        z ^= z >> 15;
        z *= 0x85ebca6bu;
        return z ^ (z >> 13);
    }
    // (v + F(r)) mod m for v < m, F(r) = mulhi32(round32(r), m) in [0, m).
    static uint32_t round_add(uint32_t v, uint32_t r, uint32_t k, uint32_t k2, uint32_t m) {
        const uint32_t f = static_cast<uint32_t>((static_cast<uint64_t>(round32(r, k, k2)) * m) >> 32);
        const uint32_t s = v + f;  // <= 2m - 2 < 2^32 (m <= 2^31 since n <= 2^62)
        return s >= m ? s - m : s;
    }

private:
    static uint64_t isqrt_ceil(uint64_t n) {
        uint64_t r = 1;
        while (r * r < n) r <<= 1;  // r >= ceil(sqrt(n)) (n <= 2^62)
        uint64_t lo = r >> 1, hi = r;  // lo^2 < n <= hi^2
        while (hi - lo > 1) {
            const uint64_t mid = lo + (hi - lo) / 2;
            if (mid * mid < n) lo = mid; else hi = mid;
        }
        return hi;
    }
    // One encryption of x in [0, a*b).
    uint64_t encrypt(uint64_t x) const {
        uint32_t L = static_cast<uint32_t>(x / b_), R = static_cast<uint32_t>(x % b_);
        for (int i = 0; i < rounds_; ++i) {
            if (i & 1)
                R = round_add(R, L, k1_[i], k2_[i], b_);
            else
                L = round_add(L, R, k1_[i], k2_[i], a_);
        }
        return static_cast<uint64_t>(L) * b_ + R;
    }
    void encrypt_split(uint32_t* L, uint32_t* R, int m) const;  // in place, vectorised
    void finish(const uint32_t* L, const uint32_t* R, uint64_t* out, int m) const;

    uint64_t n_ = 0;
    uint64_t bmagic_ = 0;
    uint32_t a_ = 0, b_ = 0;
    int rounds_ = 0;
    uint32_t k1_[kMaxRounds] = {};
    uint32_t k2_[kMaxRounds] = {};
    uint8_t table_[kTableMax] = {};
};

}  // namespace dietcl
