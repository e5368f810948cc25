// BalancedBuffer: task-balanced replay index (docs/algorithm.md, "Buffer"). Keeps every
// labeled sample (id, label) of every task; never truncates. Sampling is a pure function of
// (seed, mode, step, n, contents): any step, any order, any thread -> identical draws.
//
// Draw of n items at `step` (global, before sharding), T = number of non-empty tasks,
// tasks ordered by task index:
//  * share: base = n / T each; the r = n % T remainder items go to a window of r tasks that
//    rotates round-robin with the step: task j (0-based rank among the T tasks) gets an
//    extra item at step s iff (j - s*r) mod T < r.  Over consecutive steps every task gets
//    exactly the same count up to +-1.
//  * per-task position stream: task j's draws at step s are positions
//    [c_j(s), c_j(s) + share_j(s)) of an infinite stream, c_j(s) = s*base + #extras of j in
//    steps < s (closed form).  Consecutive steps with the same (n, T) therefore walk the
//    stream contiguously.
//  * without replacement (default): position p -> epoch e = p / size, offset p % size,
//    index = FeistelPermutation(size, key(seed, task, e, size))(offset): each epoch visits
//    every sample of the task exactly once, then a fresh permutation begins.  Appending to
//    a task changes its size and hence the permutation of every epoch (the stream is
//    re-keyed; draws stay a pure function of contents).  Changing n or T between steps
//    moves c_j, so epochs are only exact while (n, T) stay fixed.
//  * replacement=true: index = uniform(hash(seed, task, p)) (i.i.d. within the task).
//  * class_balanced=true: within a task, position p goes to class p mod C (classes sorted by
//    label) and to within-class position p / C, which is then mapped as above (permutation
//    epochs per class, or i.i.d. with replacement).
//  * layout + shards: the global draw is the concatenation of the per-task blocks (task
//    order); rank r of world_size W gets global positions r, r+W, r+2W, ... (strided, so
//    each rank's shard is itself task-balanced).  Shards are disjoint, their union is the
//    global draw.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <vector>

namespace dietcl {

namespace detail {
// Allocation of per-task entry storage.  Sampling reads one random entry per draw, so with
// 4 KiB pages a multi-MB buffer costs a TLB miss (page walk) on top of the cache miss.
// Arrays of >= kHugeMin bytes are therefore 2 MiB-aligned, rounded up to whole 2 MiB pages
// and madvise(MADV_HUGEPAGE)d (Linux; transparent huge pages in "madvise" or "always" mode):
// at most 2 MiB - 1 extra bytes per task; smaller arrays use operator new.
void* entries_alloc(size_t bytes);
void entries_free(void* p, size_t bytes) noexcept;
constexpr size_t kHugeMin = size_t(512) << 10;

template <class T>
struct EntryAllocator {
    using value_type = T;
    EntryAllocator() = default;
    template <class U>
    EntryAllocator(const EntryAllocator<U>&) noexcept {}
    T* allocate(size_t n) { return static_cast<T*>(entries_alloc(n * sizeof(T))); }
    void deallocate(T* p, size_t n) noexcept { entries_free(p, n * sizeof(T)); }
    template <class U>
    bool operator==(const EntryAllocator<U>&) const noexcept { return true; }
    template <class U>
    bool operator!=(const EntryAllocator<U>&) const noexcept { return false; }
};
}  // namespace detail

struct SampleResult {
    std::vector<int64_t> ids;
    std::vector<int64_t> labels;
    std::vector<int32_t> tasks;
};

class BalancedBuffer {
public:
    explicit BalancedBuffer(uint64_t seed = 0, bool replacement = false, bool class_balanced = false);
    BalancedBuffer(const BalancedBuffer& other);
    BalancedBuffer& operator=(const BalancedBuffer& other);

    // Append n samples to `task` (>= 0). ids must be >= 0. Throws std::invalid_argument.
    void add(int64_t task, const int64_t* ids, const int64_t* labels, int64_t n);
    void add(int64_t task, const std::vector<int64_t>& ids, const std::vector<int64_t>& labels);

    // This rank's shard of the global draw of n items at `step`. Thread-safe.
    SampleResult sample(int64_t n, int64_t step, int64_t rank = 0, int64_t world_size = 1) const;
    // Same, writing into caller-provided arrays of length shard_size(n, rank, world_size).
    void sample_into(int64_t n, int64_t step, int64_t rank, int64_t world_size, int64_t* ids,
                     int64_t* labels, int32_t* tasks) const;
    // Items of the global draw of n that rank `rank` of `world_size` gets: ceil((n - rank) / W)
    // for n > rank, else 0 (exact up to n = INT64_MAX). Preconditions: n >= 0, world_size >= 1,
    // 0 <= rank < world_size; otherwise throws std::invalid_argument.
    static int64_t shard_size(int64_t n, int64_t rank, int64_t world_size);

    int64_t size() const;             // total samples
    int64_t num_tasks() const;        // non-empty tasks
    std::map<int32_t, int64_t> task_sizes() const;
    uint64_t seed() const { return seed_; }
    bool replacement() const { return replacement_; }
    bool class_balanced() const { return class_balanced_; }

    // Serialized state: magic "DCLBUF01" | u32 version | u64 len | payload | fnv1a64.
    // Payload: u64 seed, u32 flags, u64 #tasks, per task: i32 task, u64 size,
    // size x (i64 id, i64 label).  16 bytes per sample + 12 per task + 48 fixed.
    std::vector<uint8_t> state_bytes() const;
    static BalancedBuffer from_state_bytes(const uint8_t* data, size_t n);
    static BalancedBuffer from_state_bytes(const std::vector<uint8_t>& b) {
        return from_state_bytes(b.data(), b.size());
    }

    // In-memory bytes per sample (entries only; plus vector slack and, for tasks of >= 512 KiB,
    // rounding up to whole 2 MiB huge pages -- see detail::entries_alloc).
    static constexpr int kBytesPerSample = 16;

    struct Entry {
        int64_t id;
        int64_t label;
    };
    struct TaskData {
        std::vector<Entry, detail::EntryAllocator<Entry>> entries;  // class_balanced: sorted by label
        std::vector<int64_t> class_labels;     // class_balanced only
        std::vector<uint64_t> class_offsets;   // class_balanced only, size C + 1
    };

private:
    void rebuild_classes(TaskData& td) const;
    void check_sample_args(int64_t n, int64_t step, int64_t rank, int64_t world_size) const;

    uint64_t seed_;
    bool replacement_;
    bool class_balanced_;
    std::map<int32_t, TaskData> tasks_;
    int64_t total_ = 0;
    mutable std::shared_mutex mu_;
};

}  // namespace dietcl
