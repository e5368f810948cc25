#include "dietcl/balanced_buffer.hpp"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "dietcl/errors.hpp"
#include "dietcl/rng.hpp"
#include "dietcl/serialize.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dietcl {

namespace detail {
namespace {
constexpr size_t kHugePage = size_t(2) << 20;
inline size_t huge_round(size_t bytes) { return (bytes + kHugePage - 1) & ~(kHugePage - 1); }
}  // namespace

#if defined(__linux__) && defined(MADV_HUGEPAGE)
constexpr bool kUseHuge = true;
#else
constexpr bool kUseHuge = false;  // elsewhere: plain operator new (std::aligned_alloc may be absent)
#endif

void* entries_alloc(size_t bytes) {
    if (!kUseHuge || bytes < kHugeMin) return ::operator new(bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    void* p = std::aligned_alloc(kHugePage, huge_round(bytes));
    if (p == nullptr) throw std::bad_alloc();
    (void)madvise(p, huge_round(bytes), MADV_HUGEPAGE);  // advisory: failure only costs speed
    return p;
#else
    return nullptr;  // unreachable
#endif
}

void entries_free(void* p, size_t bytes) noexcept {
    if (p == nullptr) return;
    if (!kUseHuge || bytes < kHugeMin)
        ::operator delete(p);
    else
        std::free(p);
}
}  // namespace detail

namespace {
constexpr char kMagic[8] = {'D', 'C', 'L', 'B', 'U', 'F', '0', '1'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kTagPerm = 0x7065726d;     // "perm"
constexpr uint64_t kTagRepl = 0x7265706c;     // "repl"
constexpr uint64_t kTagClassPerm = 0x63706572; // "cper"
constexpr uint64_t kTagClassRepl = 0x6372706c; // "crpl"

inline uint64_t mul_u64(uint64_t a, uint64_t b) { return a * b; }  // wraps mod 2^64 (documented)

std::string arg_err(const std::string& what) { return "BalancedBuffer: " + what; }
}  // namespace

BalancedBuffer::BalancedBuffer(uint64_t seed, bool replacement, bool class_balanced)
    : seed_(seed), replacement_(replacement), class_balanced_(class_balanced) {}

BalancedBuffer::BalancedBuffer(const BalancedBuffer& o) {
    std::shared_lock<std::shared_mutex> lk(o.mu_);
    seed_ = o.seed_;
    replacement_ = o.replacement_;
    class_balanced_ = o.class_balanced_;
    tasks_ = o.tasks_;
    total_ = o.total_;
}

BalancedBuffer& BalancedBuffer::operator=(const BalancedBuffer& o) {
    if (this == &o) return *this;
    BalancedBuffer tmp(o);
    std::unique_lock<std::shared_mutex> lk(mu_);
    seed_ = tmp.seed_;
    replacement_ = tmp.replacement_;
    class_balanced_ = tmp.class_balanced_;
    tasks_ = std::move(tmp.tasks_);
    total_ = tmp.total_;
    return *this;
}

void BalancedBuffer::rebuild_classes(TaskData& td) const {
    td.class_labels.clear();
    td.class_offsets.clear();
    const auto& e = td.entries;
    for (size_t i = 0; i < e.size(); ++i) {
        if (i == 0 || e[i].label != e[i - 1].label) {
            td.class_labels.push_back(e[i].label);
            td.class_offsets.push_back(i);
        }
    }
    td.class_offsets.push_back(e.size());
}

void BalancedBuffer::add(int64_t task, const std::vector<int64_t>& ids, const std::vector<int64_t>& labels) {
    if (ids.size() != labels.size())
        throw std::invalid_argument(arg_err("add: ids and labels must have the same length (got " +
                                            std::to_string(ids.size()) + " ids and " +
                                            std::to_string(labels.size()) + " labels)"));
    add(task, ids.data(), labels.data(), static_cast<int64_t>(ids.size()));
}

void BalancedBuffer::add(int64_t task, const int64_t* ids, const int64_t* labels, int64_t n) {
    if (task < 0 || task > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument(arg_err("add: task must be in [0, 2^31) (got " + std::to_string(task) + ")"));
    if (n < 0) throw std::invalid_argument(arg_err("add: n must be >= 0 (got " + std::to_string(n) + ")"));
    if (n == 0) return;
    if (ids == nullptr || labels == nullptr)
        throw std::invalid_argument(arg_err("add: null ids/labels pointer with n > 0"));
    for (int64_t i = 0; i < n; ++i) {
        if (ids[i] < 0)
            throw std::invalid_argument(arg_err("add: ids must be >= 0 (ids[" + std::to_string(i) +
                                                "] = " + std::to_string(ids[i]) + ")"));
    }
    std::unique_lock<std::shared_mutex> lk(mu_);
    TaskData& td = tasks_[static_cast<int32_t>(task)];
    const size_t old = td.entries.size();
    if (td.entries.capacity() < old + static_cast<size_t>(n))  // geometric growth: amortised O(1)
        td.entries.reserve(std::max(old + static_cast<size_t>(n), 2 * td.entries.capacity()));
    for (int64_t i = 0; i < n; ++i) td.entries.push_back(Entry{ids[i], labels[i]});
    if (class_balanced_) {
        auto by_label = [](const Entry& a, const Entry& b) { return a.label < b.label; };
        std::stable_sort(td.entries.begin() + old, td.entries.end(), by_label);
        std::inplace_merge(td.entries.begin(), td.entries.begin() + old, td.entries.end(), by_label);
        rebuild_classes(td);
    }
    total_ += n;
}

int64_t BalancedBuffer::size() const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    return total_;
}

int64_t BalancedBuffer::num_tasks() const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    return static_cast<int64_t>(tasks_.size());
}

std::map<int32_t, int64_t> BalancedBuffer::task_sizes() const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    std::map<int32_t, int64_t> r;
    for (const auto& kv : tasks_) r[kv.first] = static_cast<int64_t>(kv.second.entries.size());
    return r;
}

int64_t BalancedBuffer::shard_size(int64_t n, int64_t rank, int64_t world_size) {
    if (n < 0)
        throw std::invalid_argument(arg_err("shard_size: n must be >= 0 (got " + std::to_string(n) + ")"));
    if (world_size < 1)  // (a division by zero: SIGFPE, not an error, without this check)
        throw std::invalid_argument(
            arg_err("shard_size: world_size must be >= 1 (got " + std::to_string(world_size) + ")"));
    if (rank < 0 || rank >= world_size)
        throw std::invalid_argument(arg_err("shard_size: rank must be in [0, world_size) (got rank " +
                                            std::to_string(rank) + ", world_size " +
                                            std::to_string(world_size) + ")"));
    return n > rank ? (n - rank - 1) / world_size + 1 : 0;  // no overflow near INT64_MAX
}

void BalancedBuffer::check_sample_args(int64_t n, int64_t step, int64_t rank, int64_t world_size) const {
    if (n < 0) throw std::invalid_argument(arg_err("sample: n must be >= 0 (got " + std::to_string(n) + ")"));
    if (step < 0)
        throw std::invalid_argument(arg_err("sample: step must be >= 0 (got " + std::to_string(step) + ")"));
    if (world_size < 1)
        throw std::invalid_argument(
            arg_err("sample: world_size must be >= 1 (got " + std::to_string(world_size) + ")"));
    if (rank < 0 || rank >= world_size)
        throw std::invalid_argument(arg_err("sample: rank must be in [0, world_size) (got rank " +
                                            std::to_string(rank) + ", world_size " +
                                            std::to_string(world_size) + ")"));
}

SampleResult BalancedBuffer::sample(int64_t n, int64_t step, int64_t rank, int64_t world_size) const {
    check_sample_args(n, step, rank, world_size);
    SampleResult r;
    const int64_t m = shard_size(n, rank, world_size);
    r.ids.resize(m);
    r.labels.resize(m);
    r.tasks.resize(m);
    sample_into(n, step, rank, world_size, r.ids.data(), r.labels.data(), r.tasks.data());
    return r;
}

namespace {

struct Block {
    int32_t task;
    const BalancedBuffer::TaskData* td;
    uint64_t c;      // stream position of the block's first global item
    uint64_t i0;     // first in-block index that belongs to this rank
    int64_t count;   // items of this rank in the block
    int64_t out_off; // where they go in the rank's output
};

struct Out {
    int64_t* ids;
    int64_t* labels;
    int32_t* tasks;
};

constexpr int kBatch = FeistelPermutation::kMaxBatch;
constexpr int kChunk = 4 * kBatch;                   // sources gathered per flush
constexpr int kPrefetch = 32;                        // gather prefetch distance (items)
constexpr int64_t kParallelMin = int64_t(1) << 17;  // items per call before threads are used
constexpr int64_t kPerThreadMin = int64_t(1) << 16;

using Entry = BalancedBuffer::Entry;

// Two-pass output: pass 1 (pure arithmetic) resolves up to kChunk source entries, pass 2
// gathers them with software prefetch a few items ahead (random reads into a large buffer
// are the dominant cost; this keeps many cache misses in flight).
class Gatherer {
public:
    Gatherer(const Out& o, int64_t pos) : o_(o), pos_(pos) {}
    ~Gatherer() { flush(); }
    // Room for at least `want` (<= kBatch) more sources, flushing if needed.
    const Entry** reserve(int want) {
        if (n_ + want > kChunk) flush();
        return src_ + n_;
    }
    void commit(int m) { n_ += m; }
    void flush() {
        const int n = n_;
        if (n == 0) return;
        int64_t* __restrict oi = o_.ids + pos_;
        int64_t* __restrict ol = o_.labels + pos_;
        const int pre = n < kPrefetch ? n : kPrefetch;
        for (int q = 0; q < pre; ++q) __builtin_prefetch(src_[q]);
        int q = 0;
        for (; q + kPrefetch < n; ++q) {
            __builtin_prefetch(src_[q + kPrefetch]);
            oi[q] = src_[q]->id;
            ol[q] = src_[q]->label;
        }
        for (; q < n; ++q) {
            oi[q] = src_[q]->id;
            ol[q] = src_[q]->label;
        }
        pos_ += n;
        n_ = 0;
    }
    Gatherer(const Gatherer&) = delete;
    Gatherer& operator=(const Gatherer&) = delete;

private:
    Out o_;
    int64_t pos_;
    int n_ = 0;
    const Entry* src_[kChunk];
};

// Fill this rank's items [kb, ke) of block b (outputs are written in order via g).
void run_block(const Block& b, int64_t kb, int64_t ke, uint64_t W, uint64_t seed, bool replacement,
               bool class_balanced, const Out& o, Gatherer& g) {
    const Entry* E = b.td->entries.data();
    const uint64_t size = b.td->entries.size();
    const uint64_t task = static_cast<uint64_t>(b.task);
    std::fill(o.tasks + b.out_off + kb, o.tasks + b.out_off + ke, b.task);
    if (!class_balanced && replacement) {
        const uint64_t h0 = hash_words(seed, kTagRepl, task);  // hash_words(seed, tag, task, p) prefix
        int64_t k = kb;
        while (k < ke) {
            const int m = static_cast<int>(std::min<int64_t>(ke - k, kBatch));
            const Entry** dst = g.reserve(m);
            const uint64_t p0 = b.c + b.i0 + static_cast<uint64_t>(k) * W;
            for (int q = 0; q < m; ++q) dst[q] = E + bounded(hash_combine(h0, p0 + static_cast<uint64_t>(q) * W), size);
            g.commit(m);
            k += m;
        }
        return;
    }
    if (!class_balanced) {
        const uint64_t tkey = hash_words(seed, kTagPerm, task, size);
        auto key = [&](uint64_t ep) { return mix64(tkey ^ mix64(ep)); };
        uint64_t p = b.c + b.i0 + static_cast<uint64_t>(kb) * W;
        uint64_t e = p / size, off = p - e * size;
        FeistelPermutation perm(size, key(e));
        uint64_t idx[kBatch];
        int64_t k = kb;
        while (k < ke) {
            // items left in this epoch at stride W, capped by the batch and the range
            const uint64_t left = size - off;
            uint64_t run = W == 1 ? left : (W >= size ? 1 : (left + W - 1) / W);
            run = std::min<uint64_t>({run, static_cast<uint64_t>(ke - k), static_cast<uint64_t>(kBatch)});
            const int m = static_cast<int>(run);
            perm.map_stride(off, W, idx, m);
            const Entry** dst = g.reserve(m);
            for (int q = 0; q < m; ++q) dst[q] = E + idx[q];
            g.commit(m);
            k += m;
            if (k < ke) {
                p += run * W;
                if (run * W < left) {
                    off += run * W;  // same epoch
                } else {
                    e = p / size;
                    off = p - e * size;
                    perm = FeistelPermutation(size, key(e));
                }
            }
        }
        return;
    }
    // class-balanced: position p -> class p mod C, within-class position p / C.
    const uint64_t C = b.td->class_labels.size();
    const auto& offs = b.td->class_offsets;
    std::vector<uint64_t> cache_epoch(replacement ? 0 : C, std::numeric_limits<uint64_t>::max());
    std::vector<FeistelPermutation> cache(replacement ? 0 : C);
    for (int64_t k = kb; k < ke; ++k) {
        const uint64_t p = b.c + b.i0 + static_cast<uint64_t>(k) * W;
        const uint64_t cls = p % C, q = p / C;
        const uint64_t lo = offs[cls], cnt = offs[cls + 1] - lo;
        uint64_t idx;
        if (replacement) {
            idx = lo + bounded(hash_words(seed, kTagClassRepl, task, cls, q), cnt);
        } else {
            const uint64_t e = q / cnt;
            if (cache_epoch[cls] != e) {
                cache_epoch[cls] = e;
                cache[cls] = FeistelPermutation(cnt, hash_words(hash_words(seed, kTagClassPerm, task, cls), e, cnt));
            }
            idx = lo + cache[cls](q % cnt);
        }
        *g.reserve(1) = E + idx;
        g.commit(1);
    }
}

}  // namespace

void BalancedBuffer::sample_into(int64_t n, int64_t step, int64_t rank, int64_t world_size, int64_t* out_ids,
                                 int64_t* out_labels, int32_t* out_tasks) const {
    check_sample_args(n, step, rank, world_size);
    std::shared_lock<std::shared_mutex> lk(mu_);
    if (n == 0) return;
    if (total_ == 0)
        throw std::invalid_argument(arg_err("sample: cannot sample from an empty buffer (add labeled samples first)"));

    const uint64_t T = tasks_.size();
    const uint64_t un = static_cast<uint64_t>(n);
    const uint64_t base = un / T;
    const uint64_t rem = un % T;
    const uint64_t s = static_cast<uint64_t>(step);
    const uint64_t rot = ((s % T) * rem) % T;  // first task of this step's remainder window
    const uint64_t sr = mul_u64(s, rem);       // remainder items handed out before this step
    const uint64_t sbase = mul_u64(s, base);
    const uint64_t W = static_cast<uint64_t>(world_size);
    const uint64_t rk = static_cast<uint64_t>(rank);

    std::vector<Block> blocks;
    blocks.reserve(T);
    uint64_t block_start = 0;
    int64_t total = 0;
    uint64_t j = 0;
    for (const auto& kv : tasks_) {
        const uint64_t extra = ((j + T - rot) % T) < rem ? 1 : 0;
        const uint64_t share = base + extra;
        Block b;
        b.task = kv.first;
        b.td = &kv.second;
        b.c = sbase + (sr > j ? (sr - j - 1) / T + 1 : 0);
        b.i0 = (rk + W - block_start % W) % W;
        b.count = b.i0 < share ? static_cast<int64_t>((share - b.i0 + W - 1) / W) : 0;
        b.out_off = total;
        total += b.count;
        block_start += share;
        ++j;
        if (b.count > 0) blocks.push_back(b);
    }
    const Out o{out_ids, out_labels, out_tasks};

    // Process output range [lo, hi) of this rank's items (blocks are contiguous in the output).
    auto run_range = [&](int64_t lo, int64_t hi) {
        Gatherer g(o, lo);
        for (const Block& b : blocks) {
            const int64_t kb = std::max<int64_t>(lo - b.out_off, 0);
            const int64_t ke = std::min<int64_t>(hi - b.out_off, b.count);
            if (kb < ke) run_block(b, kb, ke, W, seed_, replacement_, class_balanced_, o, g);
        }
    };

    int64_t nthreads = 1;
    if (total >= kParallelMin) {
        // hardware_concurrency() reads /sys on glibc (~4 us): query once, and only for big draws.
        static const unsigned hw = std::thread::hardware_concurrency();
        if (hw > 1) nthreads = std::min<int64_t>({static_cast<int64_t>(hw), 16, total / kPerThreadMin});
    }
    if (nthreads <= 1) {
        run_range(0, total);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t chunk = (total + nthreads - 1) / nthreads;
    for (int64_t t = 1; t < nthreads; ++t) {
        const int64_t lo = t * chunk, hi = std::min(total, lo + chunk);
        if (lo < hi) pool.emplace_back(run_range, lo, hi);
    }
    run_range(0, std::min(total, chunk));
    for (auto& th : pool) th.join();
}

std::vector<uint8_t> BalancedBuffer::state_bytes() const {
    std::shared_lock<std::shared_mutex> lk(mu_);
    ser::Writer w;
    w.put<uint64_t>(seed_);
    w.put<uint32_t>((replacement_ ? 1u : 0u) | (class_balanced_ ? 2u : 0u));
    w.put<uint64_t>(tasks_.size());
    for (const auto& kv : tasks_) {
        w.put<int32_t>(kv.first);
        w.put<uint64_t>(kv.second.entries.size());
        if (ser::host_is_little_endian()) {
            w.put_bytes(kv.second.entries.data(), kv.second.entries.size() * sizeof(Entry));
        } else {
            for (const Entry& e : kv.second.entries) {
                w.put<int64_t>(e.id);
                w.put<int64_t>(e.label);
            }
        }
    }
    return ser::seal(kMagic, kVersion, w.bytes());
}

BalancedBuffer BalancedBuffer::from_state_bytes(const uint8_t* data, size_t nbytes) {
    static_assert(sizeof(Entry) == 16, "Entry must be packed as two int64");
    auto pl = ser::unseal(kMagic, kVersion, data, nbytes, "BalancedBuffer");
    ser::Reader r(pl.first, pl.second, "BalancedBuffer");
    const uint64_t seed = r.get<uint64_t>();
    const uint32_t flags = r.get<uint32_t>();
    if (flags & ~3u) throw StateError("BalancedBuffer state: unknown mode flags " + std::to_string(flags));
    BalancedBuffer b(seed, (flags & 1u) != 0, (flags & 2u) != 0);
    const uint64_t ntasks = r.get<uint64_t>();
    if (ntasks > r.remaining() / 12) throw StateError("BalancedBuffer state: task count exceeds payload");
    int64_t prev = -1;
    for (uint64_t t = 0; t < ntasks; ++t) {
        const int32_t task = r.get<int32_t>();
        const uint64_t size = r.get<uint64_t>();
        if (task <= prev) throw StateError("BalancedBuffer state: tasks not strictly increasing / negative");
        if (size == 0) throw StateError("BalancedBuffer state: empty task stored");
        if (size > r.remaining() / 16) throw StateError("BalancedBuffer state: task size exceeds payload");
        prev = task;
        TaskData& td = b.tasks_[task];
        td.entries.resize(size);
        for (uint64_t i = 0; i < size; ++i) {
            td.entries[i].id = r.get<int64_t>();
            td.entries[i].label = r.get<int64_t>();
            if (td.entries[i].id < 0) throw StateError("BalancedBuffer state: negative id stored");
            if (b.class_balanced_ && i > 0 && td.entries[i].label < td.entries[i - 1].label)
                throw StateError("BalancedBuffer state: class-balanced task not sorted by label");
        }
        if (b.class_balanced_) b.rebuild_classes(td);
        b.total_ += static_cast<int64_t>(size);
    }
    if (r.remaining() != 0) throw StateError("BalancedBuffer state: trailing bytes in payload");
    return b;
}

}  // namespace dietcl
