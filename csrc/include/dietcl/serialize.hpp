// Little helpers for the versioned, checksummed state format shared by BalancedBuffer and
// Ledger:  magic[8] | version u32 | payload_len u64 | payload | fnv1a64(payload) u64
// All integers little-endian.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "dietcl/errors.hpp"

namespace dietcl {
namespace ser {

inline uint64_t fnv1a64(const uint8_t* p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

inline bool host_is_little_endian() {
    const uint16_t x = 1;
    uint8_t b;
    std::memcpy(&b, &x, 1);
    return b == 1;
}

class Writer {
public:
    template <class T>
    void put(T v) {
        uint8_t b[sizeof(T)];
        std::memcpy(b, &v, sizeof(T));
        if (!host_is_little_endian()) std::reverse(b, b + sizeof(T));
        buf_.insert(buf_.end(), b, b + sizeof(T));
    }
    void put_bytes(const void* p, size_t n) {
        const uint8_t* c = static_cast<const uint8_t*>(p);
        buf_.insert(buf_.end(), c, c + n);
    }
    void put_string(const std::string& s) {
        put<uint64_t>(s.size());
        put_bytes(s.data(), s.size());
    }
    std::vector<uint8_t>& bytes() { return buf_; }

private:
    std::vector<uint8_t> buf_;
};

class Reader {
public:
    Reader(const uint8_t* p, size_t n, const char* what) : p_(p), n_(n), what_(what) {}
    template <class T>
    T get() {
        need(sizeof(T));
        uint8_t b[sizeof(T)];
        std::memcpy(b, p_ + pos_, sizeof(T));
        if (!host_is_little_endian()) std::reverse(b, b + sizeof(T));
        pos_ += sizeof(T);
        T v;
        std::memcpy(&v, b, sizeof(T));
        return v;
    }
    const uint8_t* take(size_t n) {
        need(n);
        const uint8_t* r = p_ + pos_;
        pos_ += n;
        return r;
    }
    std::string get_string() {
        const uint64_t len = get<uint64_t>();
        const uint8_t* s = take(len);
        return std::string(reinterpret_cast<const char*>(s), len);
    }
    size_t remaining() const { return n_ - pos_; }
    void need(size_t k) const {
        if (k > n_ - pos_)
            throw StateError(std::string(what_) + " state: payload truncated or malformed (need " +
                             std::to_string(k) + " more bytes, have " + std::to_string(n_ - pos_) + ")");
    }

private:
    const uint8_t* p_;
    size_t n_;
    size_t pos_ = 0;
    const char* what_;
};

// Wrap a payload with magic, version and checksum.
inline std::vector<uint8_t> seal(const char magic[8], uint32_t version, const std::vector<uint8_t>& payload) {
    Writer w;
    w.put_bytes(magic, 8);
    w.put<uint32_t>(version);
    w.put<uint64_t>(payload.size());
    w.put_bytes(payload.data(), payload.size());
    w.put<uint64_t>(fnv1a64(payload.data(), payload.size()));
    return std::move(w.bytes());
}

// Check magic, version, length and checksum; return (pointer, length) of the payload.
inline std::pair<const uint8_t*, size_t> unseal(const char magic[8], uint32_t version, const uint8_t* p,
                                                size_t n, const char* what) {
    const std::string w(what);
    if (n < 8 + 4 + 8 + 8)
        throw StateError(w + " state: truncated (" + std::to_string(n) + " bytes is shorter than the header)");
    if (std::memcmp(p, magic, 8) != 0) throw StateError(w + " state: bad magic (not a " + w + " state)");
    Reader r(p + 8, n - 8, what);
    const uint32_t ver = r.get<uint32_t>();
    if (ver != version)
        throw StateError(w + " state: unsupported version " + std::to_string(ver) + " (expected " +
                         std::to_string(version) + ")");
    const uint64_t len = r.get<uint64_t>();
    if (len != n - 8 - 4 - 8 - 8)
        throw StateError(w + " state: truncated or extended (payload length " + std::to_string(len) +
                         " does not match " + std::to_string(n) + " total bytes)");
    const uint8_t* payload = p + 20;
    Reader tail(p + 20 + len, 8, what);
    const uint64_t sum = tail.get<uint64_t>();
    if (sum != fnv1a64(payload, len)) throw StateError(w + " state: checksum mismatch (bytes corrupted)");
    return {payload, static_cast<size_t>(len)};
}

}  // namespace ser
}  // namespace dietcl
