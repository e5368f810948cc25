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

// Keyed pseudo-random bijection of [0, n): a 4-round (unbalanced) Feistel network on
// [0, 2^bits) with 2^(bits-1) < n <= 2^bits (bits >= 2), restricted to [0, n) by
// cycle-walking (expected < 2 encryptions per query).  O(1) per query, no memory
// proportional to n, pure function of (n, key).  Domains of <= 32 bits use 32-bit
// arithmetic (vectorisable batches); larger ones 64-bit.
class FeistelPermutation {
public:
    static constexpr int kMaxRounds = 8;
    static constexpr int kMaxBatch = 256;
    static constexpr uint64_t kTableMax = 64;  // n <= 64: exact Fisher-Yates table

    FeistelPermutation() = default;
    FeistelPermutation(uint64_t n, uint64_t key) : n_(n) {
        bits_ = 2;  // >= 2 so that both halves are non-empty
        while (bits_ < 64 && (uint64_t(1) << bits_) < n) ++bits_;
        hi_ = bits_ / 2 + (bits_ & 1);
        lo_ = bits_ / 2;
        // Small domains need more rounds for a well-mixed permutation.
        rounds_ = bits_ <= 12 ? 8 : 4;
        for (int i = 0; i < rounds_; ++i) keys_[i] = mix64(key + 0x9e3779b97f4a7c15ULL * (i + 1));
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
        }
    }

    uint64_t size() const { return n_; }

    uint64_t operator()(uint64_t x) const {
        if (n_ <= kTableMax) return n_ <= 1 ? 0 : table_[x];
        if (bits_ <= 32) {
            uint32_t y = static_cast<uint32_t>(x);
            do {
                y = encrypt32(y);
            } while (y >= n_);
            return y;
        }
        do {
            x = encrypt64(x);
        } while (x >= n_);
        return x;
    }

    // Batched mapping of m <= kMaxBatch offsets (each < n) -> permuted indices.
    void map_batch(const uint64_t* in, uint64_t* out, int m) const;

public:
    // Keyed round functions (multiply / xorshift / multiply; callers take the top h bits).
    static uint32_t round32(uint32_t r, uint32_t k, uint32_t k2) {
        uint32_t z = (r ^ k) * 0x9e3779b9u + k2;
        z ^= z >> 15;
        z *= 0x85ebca6bu;
        return z ^ (z >> 13);
    }
    static uint64_t round64(uint64_t r, uint64_t k, uint64_t k2) {
        uint64_t z = (r ^ k) * 0x9e3779b97f4a7c15ULL + k2;
        z ^= z >> 31;
        z *= 0xbf58476d1ce4e5b9ULL;
        return z ^ (z >> 29);
    }

private:
    uint32_t encrypt32(uint32_t x) const {
        for (int i = 0; i < rounds_; ++i) {
            const int l = (i & 1) ? hi_ : lo_;
            const int h = (i & 1) ? lo_ : hi_;
            const uint32_t k = static_cast<uint32_t>(keys_[i]), k2 = static_cast<uint32_t>(keys_[i] >> 32);
            const uint32_t L = x >> l;
            const uint32_t R = x & ((uint32_t(1) << l) - 1);
            x = (R << h) | (L ^ (round32(R, k, k2) >> (32 - h)));
        }
        return x;
    }
    uint64_t encrypt64(uint64_t x) const {
        for (int i = 0; i < rounds_; ++i) {
            const int l = (i & 1) ? hi_ : lo_;
            const int h = (i & 1) ? lo_ : hi_;
            const uint64_t k = keys_[i], k2 = mix64(keys_[i]);
            const uint64_t L = x >> l;
            const uint64_t R = x & ((uint64_t(1) << l) - 1);
            x = (R << h) | (L ^ (round64(R, k, k2) >> (64 - h)));
        }
        return x;
    }
    void encrypt32_array(uint32_t* x, int m) const;

    uint64_t n_ = 0;
    int bits_ = 0, hi_ = 0, lo_ = 0, rounds_ = 0;
    uint64_t keys_[kMaxRounds] = {};
    uint8_t table_[kTableMax] = {};
};

}  // namespace dietcl
