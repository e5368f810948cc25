// Embedding the DietCL core without Python: build a task-balanced buffer, sample a step
// (as rank 0 of 2), charge the compute to a Ledger and print.
#include <cstdio>
#include <vector>

#include "dietcl/balanced_buffer.hpp"
#include "dietcl/flops.hpp"
#include "dietcl/ledger.hpp"

int main() {
    dietcl::BalancedBuffer buf(/*seed=*/42);
    const int64_t sizes[] = {3, 50, 1000};
    int64_t next_id = 0;
    for (int64_t t = 0; t < 3; ++t) {
        std::vector<int64_t> ids, labels;
        for (int64_t i = 0; i < sizes[t]; ++i) {
            ids.push_back(next_id++);
            labels.push_back(10 * t + i % 5);
        }
        buf.add(t, ids, labels);
    }
    auto s = buf.sample(/*n=*/12, /*step=*/0, /*rank=*/0, /*world_size=*/2);
    std::printf("buffer: %lld samples in %lld tasks; rank 0 of 2 draws %zu:\n", (long long)buf.size(),
                (long long)buf.num_tasks(), s.ids.size());
    for (size_t i = 0; i < s.ids.size(); ++i)
        std::printf("  id=%lld label=%lld task=%d\n", (long long)s.ids[i], (long long)s.labels[i], s.tasks[i]);

    dietcl::ViTSpec spec;  // ViT-B/16 + MAE 512x8x16
    auto f = dietcl::flops_per_image(spec);
    dietcl::Ledger ledger(1024);
    ledger.register_path("classify", f.classify_fwd, f.classify_fwd_bwd);
    ledger.register_path("mae", f.mae_fwd, f.mae_fwd_bwd);
    ledger.begin_step(0, 1.0);
    ledger.charge("classify", 616);
    ledger.charge("mae", 408);
    std::printf("ledger: spent %.3f of %.3f units, %.2f TFLOP\n", ledger.spent_units(), ledger.budget_units(),
                ledger.flops_total().to_double() / 1e12);
    return 0;
}
