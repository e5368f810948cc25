#include <array>
#include <cstdint>
#include <algorithm>
#include <set>
#include <thread>
#include <vector>

#include "check.hpp"
#include "dietcl/balanced_buffer.hpp"
#include "dietcl/errors.hpp"
#include "dietcl/rng.hpp"

using dietcl::BalancedBuffer;

static BalancedBuffer make(const std::vector<int64_t>& sizes, uint64_t seed = 0, bool repl = false, bool cb = false) {
    BalancedBuffer b(seed, repl, cb);
    int64_t start = 0;
    for (size_t t = 0; t < sizes.size(); ++t) {
        std::vector<int64_t> ids(sizes[t]), labels(sizes[t]);
        for (int64_t i = 0; i < sizes[t]; ++i) {
            ids[i] = start + i;
            labels[i] = (start + i) % 3;
        }
        b.add(static_cast<int64_t>(t), ids, labels);
        start += sizes[t];
    }
    return b;
}

static void test_permutation_is_bijection() {
    for (uint64_t n : {1ull, 2ull, 3ull, 64ull, 65ull, 1000ull, 4097ull, 70000ull}) {
        dietcl::FeistelPermutation p(n, 12345 + n);
        std::vector<char> seen(n, 0);
        std::vector<uint64_t> in(n), out(n);
        for (uint64_t i = 0; i < n; ++i) in[i] = i;
        for (uint64_t i = 0; i < n; i += dietcl::FeistelPermutation::kMaxBatch) {
            const int m = static_cast<int>(std::min<uint64_t>(dietcl::FeistelPermutation::kMaxBatch, n - i));
            p.map_batch(in.data() + i, out.data() + i, m);
        }
        for (uint64_t i = 0; i < n; ++i) {
            CHECK(out[i] < n);
            CHECK(out[i] == p(i));  // batched == scalar
            if (out[i] < n) seen[out[i]] = 1;
        }
        CHECK(std::count(seen.begin(), seen.end(), 1) == static_cast<long>(n));
    }
}

static void test_balance_shards_determinism() {
    BalancedBuffer b = make({3, 50, 1000}, 7);
    for (int64_t step = 0; step < 30; ++step) {
        auto g = b.sample(101, step);
        int64_t counts[3] = {0, 0, 0};
        for (auto t : g.tasks) counts[t]++;
        CHECK(*std::max_element(counts, counts + 3) - *std::min_element(counts, counts + 3) <= 1);
        for (int64_t W : {1, 2, 4}) {
            size_t total = 0;
            for (int64_t r = 0; r < W; ++r) {
                auto s = b.sample(101, step, r, W);
                total += s.ids.size();
                for (size_t k = 0; k < s.ids.size(); ++k) CHECK(s.ids[k] == g.ids[r + k * W]);
            }
            CHECK(total == 101);
        }
        auto again = b.sample(101, step);
        CHECK(again.ids == g.ids && again.labels == g.labels && again.tasks == g.tasks);
    }
    // every sample reachable (no truncation)
    std::set<int64_t> seen;
    for (int64_t step = 0; step < 100; ++step)
        for (auto id : b.sample(60, step).ids) seen.insert(id);
    CHECK(seen.size() == 1053);
}

static void test_epoch_without_replacement() {
    BalancedBuffer b = make({97}, 3);
    std::vector<int64_t> stream;
    for (int64_t step = 0; step < 97; ++step)
        for (auto id : b.sample(1, step).ids) stream.push_back(id);
    std::set<int64_t> u(stream.begin(), stream.end());
    CHECK(u.size() == 97);
}

static void test_state_and_errors() {
    BalancedBuffer b = make({10, 20}, 5, false, true);
    auto bytes = b.state_bytes();
    CHECK(bytes.size() == 48 + 12 * 2 + 16 * 30);
    BalancedBuffer r = BalancedBuffer::from_state_bytes(bytes);
    CHECK(r.sample(33, 4).ids == b.sample(33, 4).ids);
    auto bad = bytes;
    bad[30] ^= 1;
    CHECK_THROWS(BalancedBuffer::from_state_bytes(bad), dietcl::StateError, "checksum mismatch");
    auto cut = bytes;
    cut.resize(cut.size() - 3);
    CHECK_THROWS(BalancedBuffer::from_state_bytes(cut), dietcl::StateError, "truncated");
    auto mag = bytes;
    mag[0] = 'X';
    CHECK_THROWS(BalancedBuffer::from_state_bytes(mag), dietcl::StateError, "bad magic");

    BalancedBuffer e;
    CHECK_THROWS(e.sample(1, 0), std::invalid_argument, "empty buffer");
    CHECK_THROWS(e.add(-1, {1}, {1}), std::invalid_argument, "task must be");
    CHECK_THROWS(e.add(0, {1, 2}, {1}), std::invalid_argument, "same length");
    CHECK_THROWS(e.add(0, {-1}, {1}), std::invalid_argument, "ids must be >= 0");
    CHECK_THROWS(b.sample(-1, 0), std::invalid_argument, "n must be >= 0");
    CHECK_THROWS(b.sample(1, 0, 2, 2), std::invalid_argument, "rank must be in");
    CHECK_THROWS(b.sample(1, 0, 0, 0), std::invalid_argument, "world_size must be >= 1");
}

static void test_threads() {
    BalancedBuffer b = make({5000, 7000, 9000}, 1);
    std::vector<std::vector<int64_t>> expect(16), got(16);
    for (int s = 0; s < 16; ++s) expect[s] = b.sample(2000, s).ids;
    std::vector<std::thread> th;
    for (int k = 0; k < 4; ++k)
        th.emplace_back([&, k] {
            for (int s = k; s < 16; s += 4) got[s] = b.sample(2000, s).ids;
        });
    for (auto& t : th) t.join();
    CHECK(got == expect);
    auto big = b.sample(300000, 2);  // parallel path
    auto shard = b.sample(300000, 2, 1, 3);
    for (size_t k = 0; k < shard.ids.size(); ++k) CHECK(shard.ids[k] == big.ids[1 + 3 * k]);
}

int main() {
    test_permutation_is_bijection();
    test_balance_shards_determinism();
    test_epoch_without_replacement();
    test_state_and_errors();
    test_threads();
    // shard sizes near INT64_MAX do not wrap
    CHECK(dietcl::BalancedBuffer::shard_size(INT64_MAX, 0, 2) == INT64_MAX / 2 + 1);
    CHECK(dietcl::BalancedBuffer::shard_size(INT64_MAX, 1, 2) == INT64_MAX / 2);
    CHECK(dietcl::BalancedBuffer::shard_size(3, 5, 8) == 0);
    // preconditions: a world of 0 was a division by zero (SIGFPE), a negative rank a negative size
    for (auto args : {std::array<int64_t, 3>{10, 0, 0}, {10, 5, -1}, {10, -1, 2}, {10, 2, 2}, {-1, 0, 1}}) {
        bool threw = false;
        try {
            dietcl::BalancedBuffer::shard_size(args[0], args[1], args[2]);
        } catch (const std::invalid_argument&) {
            threw = true;
        }
        CHECK(threw);
    }
    TEST_MAIN_END();
}
