// Ledger: the single source of truth for compute (docs/algorithm.md, "The setting and the
// budget").  One unit = one forward+backward pass of `global_batch` images, whatever paths they
// take.  A fwd+bwd charge of k images costs
// k / global_batch units; a forward-only charge costs k / global_batch * fwd / fwd_bwd of its
// path.  fwd+bwd units are kept as exact integer image counts; forward-only units as a
// compensated (Neumaier) double sum.  FLOPs are exact 128-bit integers.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace dietcl {

struct U128 {
    uint64_t hi = 0, lo = 0;
    void add(uint64_t v) {
        const uint64_t o = lo;
        lo += v;
        hi += (lo < o) ? 1 : 0;
    }
    void add(const U128& o) {
        add(o.lo);
        hi += o.hi;
    }
    void add_product(uint64_t a, uint64_t b);  // += a * b exactly
    double to_double() const { return static_cast<double>(hi) * 18446744073709551616.0 + static_cast<double>(lo); }
    std::string to_string() const;
    bool operator==(const U128& o) const { return hi == o.hi && lo == o.lo; }
};

// Compensated sum (Neumaier).
struct KahanSum {
    double sum = 0.0, comp = 0.0;
    void add(double x);
    double value() const { return sum + comp; }
};

struct PathCost {
    int64_t fwd = 0;      // FLOPs per image, forward only
    int64_t fwd_bwd = 0;  // FLOPs per image, forward + backward
};

struct StepTotals {
    int64_t t = 0;
    double budget = 0.0;
    int64_t images_fwd_bwd = 0;  // exact
    KahanSum fwd_only_units;
    U128 flops;
    int64_t charges = 0;
    double units(int64_t global_batch) const {
        return static_cast<double>(images_fwd_bwd) / static_cast<double>(global_batch) + fwd_only_units.value();
    }
};

// Charges aggregated per (step, path, backward).
struct ChargeRecord {
    int64_t t = 0;
    std::string path;
    bool backward = true;
    int64_t charges = 0;  // raw charge calls folded into this record
    int64_t images = 0;
    U128 flops;
    KahanSum units;
};

class Ledger {
public:
    explicit Ledger(int64_t global_batch = 1024);
    Ledger(const Ledger& o);
    Ledger& operator=(const Ledger& o);

    int64_t global_batch() const { return global_batch_; }

    // Register (or update: the classifier head grows) a path's per-image costs.
    void register_path(const std::string& name, int64_t fwd_flops_per_image, int64_t fwd_bwd_flops_per_image);
    bool has_path(const std::string& name) const;
    PathCost path_cost(const std::string& name) const;
    std::map<std::string, PathCost> paths() const;

    // Start (or, for a step already seen, e.g. after resume, continue with a new budget) step t.
    void begin_step(int64_t t, double budget_units);
    bool in_step() const;
    int64_t current_step() const;  // -1 if none

    // Units a charge would cost (validates the path and images).
    double units_for(const std::string& path, int64_t images, bool backward = true) const;
    bool can_charge(const std::string& path, int64_t images, bool backward = true) const;
    // Charge; returns units charged.  Throws BudgetExceeded if the step's spent units would exceed
    // the budget by more than 1e-9 relative; std::invalid_argument on bad input.
    double charge(const std::string& path, int64_t images, bool backward = true);

    double budget_units() const;     // current step
    double spent_units() const;      // current step
    double remaining_units() const;  // current step, >= 0

    std::vector<StepTotals> steps() const;  // ordered by t
    std::vector<ChargeRecord> records() const;  // ordered by (t, path, backward)
    U128 flops_total() const;
    int64_t num_charges() const;

    // magic "DCLLDG01" | u32 version | u64 len | payload | fnv1a64(payload)
    std::vector<uint8_t> state_bytes() const;
    static Ledger from_state_bytes(const uint8_t* data, size_t n);
    static Ledger from_state_bytes(const std::vector<uint8_t>& b) { return from_state_bytes(b.data(), b.size()); }

private:
    double units_locked(const PathCost& c, int64_t images, bool backward) const;
    const PathCost& cost_locked(const std::string& path) const;
    const StepTotals& cur_locked() const;

    int64_t global_batch_;
    int64_t current_ = -1;
    std::map<std::string, PathCost> paths_;
    std::map<int64_t, StepTotals> steps_;
    std::map<std::tuple<int64_t, std::string, bool>, ChargeRecord> records_;
    U128 flops_total_;
    int64_t num_charges_ = 0;
    mutable std::mutex mu_;
};

}  // namespace dietcl
