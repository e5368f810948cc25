#include "dietcl/ledger.hpp"

#include <cstdint>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "dietcl/errors.hpp"
#include "dietcl/serialize.hpp"

namespace dietcl {

namespace {
constexpr char kMagic[8] = {'D', 'C', 'L', 'L', 'D', 'G', '0', '1'};
constexpr uint32_t kVersion = 1;

std::string fmt(double x) {
    char b[64];
    std::snprintf(b, sizeof b, "%.9g", x);
    return b;
}
}  // namespace

void U128::add_product(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
    const unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
    U128 q;
    q.lo = static_cast<uint64_t>(p);
    q.hi = static_cast<uint64_t>(p >> 64);
    add(q);
#else
    const uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
    const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
    U128 q;
    q.lo = (mid << 32) | (p00 & 0xffffffffu);
    q.hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
    add(q);
#endif
}

std::string U128::to_string() const {
    if (hi == 0) return std::to_string(lo);
    // repeated division by 10 on (hi, lo)
    std::string s;
    uint64_t h = hi, l = lo;
    while (h != 0 || l != 0) {
        // divide 128-bit (h, l) by 10
        const uint64_t qh = h / 10, rh = h % 10;
        // (rh * 2^64 + l) / 10, computed in two 32-bit halves
        const uint64_t t1 = (rh << 32) | (l >> 32);
        const uint64_t q1 = t1 / 10, r1 = t1 % 10;
        const uint64_t t2 = (r1 << 32) | (l & 0xffffffffu);
        const uint64_t q2 = t2 / 10, r2 = t2 % 10;
        s.push_back(static_cast<char>('0' + r2));
        h = qh;
        l = (q1 << 32) | q2;
    }
    std::reverse(s.begin(), s.end());
    return s;
}

void KahanSum::add(double x) {
    const double t = sum + x;
    if (std::fabs(sum) >= std::fabs(x))
        comp += (sum - t) + x;
    else
        comp += (x - t) + sum;
    sum = t;
}

Ledger::Ledger(int64_t global_batch) : global_batch_(global_batch) {
    if (global_batch < 1)
        throw std::invalid_argument("Ledger: global_batch must be >= 1 (got " + std::to_string(global_batch) + ")");
}

Ledger::Ledger(const Ledger& o) {
    std::lock_guard<std::mutex> lk(o.mu_);
    global_batch_ = o.global_batch_;
    current_ = o.current_;
    paths_ = o.paths_;
    steps_ = o.steps_;
    records_ = o.records_;
    flops_total_ = o.flops_total_;
    num_charges_ = o.num_charges_;
}

Ledger& Ledger::operator=(const Ledger& o) {
    if (this == &o) return *this;
    Ledger tmp(o);
    std::lock_guard<std::mutex> lk(mu_);
    global_batch_ = tmp.global_batch_;
    current_ = tmp.current_;
    paths_ = std::move(tmp.paths_);
    steps_ = std::move(tmp.steps_);
    records_ = std::move(tmp.records_);
    flops_total_ = tmp.flops_total_;
    num_charges_ = tmp.num_charges_;
    return *this;
}

void Ledger::register_path(const std::string& name, int64_t fwd, int64_t fwd_bwd) {
    if (name.empty()) throw std::invalid_argument("Ledger: path name must be non-empty");
    if (fwd <= 0)
        throw std::invalid_argument("Ledger: fwd_flops_per_image of path '" + name + "' must be > 0 (got " +
                                    std::to_string(fwd) + ")");
    if (fwd_bwd < fwd)
        throw std::invalid_argument("Ledger: fwd_bwd_flops_per_image of path '" + name + "' must be >= its fwd " +
                                    std::to_string(fwd) + " (got " + std::to_string(fwd_bwd) + ")");
    std::lock_guard<std::mutex> lk(mu_);
    paths_[name] = PathCost{fwd, fwd_bwd};
}

bool Ledger::has_path(const std::string& name) const {
    std::lock_guard<std::mutex> lk(mu_);
    return paths_.count(name) != 0;
}

PathCost Ledger::path_cost(const std::string& name) const {
    std::lock_guard<std::mutex> lk(mu_);
    return cost_locked(name);
}

std::map<std::string, PathCost> Ledger::paths() const {
    std::lock_guard<std::mutex> lk(mu_);
    return paths_;
}

const PathCost& Ledger::cost_locked(const std::string& path) const {
    auto it = paths_.find(path);
    if (it == paths_.end()) {
        std::string known;
        for (const auto& kv : paths_) known += (known.empty() ? "" : ", ") + kv.first;
        throw std::invalid_argument("Ledger: unknown path '" + path + "' (register_path it first; known: [" +
                                    known + "])");
    }
    return it->second;
}

const StepTotals& Ledger::cur_locked() const {
    if (current_ < 0) throw std::invalid_argument("Ledger: no step begun (call begin_step(t, budget) first)");
    return steps_.at(current_);
}

void Ledger::begin_step(int64_t t, double budget) {
    if (t < 0) throw std::invalid_argument("Ledger: step t must be >= 0 (got " + std::to_string(t) + ")");
    if (!(budget >= 0.0) || !std::isfinite(budget))
        throw std::invalid_argument("Ledger: budget_units must be finite and >= 0 (got " + fmt(budget) + ")");
    std::lock_guard<std::mutex> lk(mu_);
    if (steps_.count(t))  // a step's budget is set once: re-opening would reset what it allows
        throw std::invalid_argument("Ledger: step " + std::to_string(t) + " was already begun (budget " +
                                    fmt(steps_.at(t).budget) + " units, " + fmt(steps_.at(t).units(global_batch_)) +
                                    " spent); a step's budget is set once");
    StepTotals& s = steps_[t];
    s.t = t;
    s.budget = budget;
    current_ = t;
}

bool Ledger::in_step() const {
    std::lock_guard<std::mutex> lk(mu_);
    return current_ >= 0;
}

int64_t Ledger::current_step() const {
    std::lock_guard<std::mutex> lk(mu_);
    return current_;
}

double Ledger::units_locked(const PathCost& c, int64_t images, bool backward) const {
    const double k = static_cast<double>(images) / static_cast<double>(global_batch_);
    return backward ? k : k * (static_cast<double>(c.fwd) / static_cast<double>(c.fwd_bwd));
}

double Ledger::units_for(const std::string& path, int64_t images, bool backward) const {
    if (images < 0) throw std::invalid_argument("Ledger: images must be >= 0 (got " + std::to_string(images) + ")");
    std::lock_guard<std::mutex> lk(mu_);
    return units_locked(cost_locked(path), images, backward);
}

bool Ledger::can_charge(const std::string& path, int64_t images, bool backward) const {
    if (images < 0) throw std::invalid_argument("Ledger: images must be >= 0 (got " + std::to_string(images) + ")");
    std::lock_guard<std::mutex> lk(mu_);
    const PathCost& c = cost_locked(path);
    const StepTotals& s = cur_locked();
    double after;
    if (backward) {
        after = static_cast<double>(s.images_fwd_bwd + images) / static_cast<double>(global_batch_) +
                s.fwd_only_units.value();
    } else {
        after = s.units(global_batch_) + units_locked(c, images, false);
    }
    return !(after > s.budget * (1.0 + 1e-9));
}

double Ledger::charge(const std::string& path, int64_t images, bool backward) {
    if (images < 0) throw std::invalid_argument("Ledger: images must be >= 0 (got " + std::to_string(images) + ")");
    std::lock_guard<std::mutex> lk(mu_);
    const PathCost c = cost_locked(path);
    StepTotals& s = steps_.at(cur_locked().t);
    const double units = units_locked(c, images, backward);
    ChargeRecord* prev = nullptr;
    {
        auto it = records_.find(std::make_tuple(s.t, path, backward));
        if (it != records_.end()) prev = &it->second;
    }
    // image counters are exact int64: refuse a charge that would wrap them
    if (images > INT64_MAX - s.images_fwd_bwd || (prev && images > INT64_MAX - prev->images))
        throw std::invalid_argument("Ledger: charging " + std::to_string(images) +
                                    " images would overflow the step's 64-bit image count");
    double after;
    if (backward) {
        after = static_cast<double>(s.images_fwd_bwd + images) / static_cast<double>(global_batch_) +
                s.fwd_only_units.value();
    } else {
        after = s.units(global_batch_) + units;
    }
    if (after > s.budget * (1.0 + 1e-9)) {
        const double spent = s.units(global_batch_);
        throw BudgetExceeded("Ledger: budget exceeded at step " + std::to_string(s.t) + ": charging " + fmt(units) +
                             " units (path '" + path + "', " + std::to_string(images) + " images, " +
                             (backward ? "fwd+bwd" : "fwd only") + ") on top of " + fmt(spent) + " spent would exceed the budget of " +
                             fmt(s.budget) + " units (remaining " + fmt(std::max(0.0, s.budget - spent)) + ")");
    }
    const uint64_t per_image = static_cast<uint64_t>(backward ? c.fwd_bwd : c.fwd);
    if (backward)
        s.images_fwd_bwd += images;
    else
        s.fwd_only_units.add(units);
    s.flops.add_product(static_cast<uint64_t>(images), per_image);
    s.charges += 1;
    ChargeRecord& r = records_[std::make_tuple(s.t, path, backward)];
    r.t = s.t;
    r.path = path;
    r.backward = backward;
    r.charges += 1;
    r.images += images;
    r.flops.add_product(static_cast<uint64_t>(images), per_image);
    r.units.add(units);
    flops_total_.add_product(static_cast<uint64_t>(images), per_image);
    num_charges_ += 1;
    return units;
}

double Ledger::budget_units() const {
    std::lock_guard<std::mutex> lk(mu_);
    return cur_locked().budget;
}

double Ledger::spent_units() const {
    std::lock_guard<std::mutex> lk(mu_);
    return cur_locked().units(global_batch_);
}

double Ledger::remaining_units() const {
    std::lock_guard<std::mutex> lk(mu_);
    const StepTotals& s = cur_locked();
    return std::max(0.0, s.budget - s.units(global_batch_));
}

std::vector<StepTotals> Ledger::steps() const {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<StepTotals> v;
    for (const auto& kv : steps_) v.push_back(kv.second);
    return v;
}

std::vector<ChargeRecord> Ledger::records() const {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<ChargeRecord> v;
    for (const auto& kv : records_) v.push_back(kv.second);
    return v;
}

U128 Ledger::flops_total() const {
    std::lock_guard<std::mutex> lk(mu_);
    return flops_total_;
}

int64_t Ledger::num_charges() const {
    std::lock_guard<std::mutex> lk(mu_);
    return num_charges_;
}

std::vector<uint8_t> Ledger::state_bytes() const {
    std::lock_guard<std::mutex> lk(mu_);
    ser::Writer w;
    w.put<int64_t>(global_batch_);
    w.put<int64_t>(current_);
    w.put<uint64_t>(paths_.size());
    for (const auto& kv : paths_) {
        w.put_string(kv.first);
        w.put<int64_t>(kv.second.fwd);
        w.put<int64_t>(kv.second.fwd_bwd);
    }
    w.put<uint64_t>(steps_.size());
    for (const auto& kv : steps_) {
        const StepTotals& s = kv.second;
        w.put<int64_t>(s.t);
        w.put<double>(s.budget);
        w.put<int64_t>(s.images_fwd_bwd);
        w.put<double>(s.fwd_only_units.sum);
        w.put<double>(s.fwd_only_units.comp);
        w.put<uint64_t>(s.flops.hi);
        w.put<uint64_t>(s.flops.lo);
        w.put<int64_t>(s.charges);
    }
    w.put<uint64_t>(records_.size());
    for (const auto& kv : records_) {
        const ChargeRecord& r = kv.second;
        w.put<int64_t>(r.t);
        w.put_string(r.path);
        w.put<uint8_t>(r.backward ? 1 : 0);
        w.put<int64_t>(r.charges);
        w.put<int64_t>(r.images);
        w.put<uint64_t>(r.flops.hi);
        w.put<uint64_t>(r.flops.lo);
        w.put<double>(r.units.sum);
        w.put<double>(r.units.comp);
    }
    w.put<uint64_t>(flops_total_.hi);
    w.put<uint64_t>(flops_total_.lo);
    w.put<int64_t>(num_charges_);
    return ser::seal(kMagic, kVersion, w.bytes());
}

Ledger Ledger::from_state_bytes(const uint8_t* data, size_t n) {
    auto pl = ser::unseal(kMagic, kVersion, data, n, "Ledger");
    ser::Reader r(pl.first, pl.second, "Ledger");
    const int64_t gb = r.get<int64_t>();
    if (gb < 1) throw StateError("Ledger state: invalid global_batch " + std::to_string(gb));
    Ledger L(gb);
    L.current_ = r.get<int64_t>();
    const uint64_t np = r.get<uint64_t>();
    if (np > r.remaining() / 24) throw StateError("Ledger state: path count exceeds payload");
    for (uint64_t i = 0; i < np; ++i) {
        std::string name = r.get_string();
        PathCost c;
        c.fwd = r.get<int64_t>();
        c.fwd_bwd = r.get<int64_t>();
        L.paths_[name] = c;
    }
    const uint64_t ns = r.get<uint64_t>();
    if (ns > r.remaining() / 64) throw StateError("Ledger state: step count exceeds payload");
    for (uint64_t i = 0; i < ns; ++i) {
        StepTotals s;
        s.t = r.get<int64_t>();
        s.budget = r.get<double>();
        s.images_fwd_bwd = r.get<int64_t>();
        s.fwd_only_units.sum = r.get<double>();
        s.fwd_only_units.comp = r.get<double>();
        s.flops.hi = r.get<uint64_t>();
        s.flops.lo = r.get<uint64_t>();
        s.charges = r.get<int64_t>();
        L.steps_[s.t] = s;
    }
    const uint64_t nr = r.get<uint64_t>();
    if (nr > r.remaining() / 57) throw StateError("Ledger state: record count exceeds payload");
    for (uint64_t i = 0; i < nr; ++i) {
        ChargeRecord c;
        c.t = r.get<int64_t>();
        c.path = r.get_string();
        c.backward = r.get<uint8_t>() != 0;
        c.charges = r.get<int64_t>();
        c.images = r.get<int64_t>();
        c.flops.hi = r.get<uint64_t>();
        c.flops.lo = r.get<uint64_t>();
        c.units.sum = r.get<double>();
        c.units.comp = r.get<double>();
        L.records_[std::make_tuple(c.t, c.path, c.backward)] = c;
    }
    L.flops_total_.hi = r.get<uint64_t>();
    L.flops_total_.lo = r.get<uint64_t>();
    L.num_charges_ = r.get<int64_t>();
    if (r.remaining() != 0) throw StateError("Ledger state: trailing bytes in payload");
    if (L.current_ >= 0 && L.steps_.count(L.current_) == 0)
        throw StateError("Ledger state: current step " + std::to_string(L.current_) + " has no totals");
    return L;
}

}  // namespace dietcl
