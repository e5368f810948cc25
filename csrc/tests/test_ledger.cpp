#include <cmath>
#include <stdexcept>

#include "check.hpp"
#include "dietcl/errors.hpp"
#include "dietcl/flops.hpp"
#include "dietcl/ledger.hpp"

int main() {
    dietcl::ViTSpec vb;  // ViT-B/16, 224, K=1000, MAE 512x8x16, mask 0.75
    auto f = dietcl::flops_per_image(vb);
    CHECK(f.classify_fwd == 35127656448LL);
    CHECK(f.classify_fwd_bwd == 105151758336LL);
    CHECK(f.mae_fwd_bwd == 58455588864LL);
    CHECK(std::fabs(f.mae_fwd_bwd_flash / 1e9 - 58.8) < 0.05);
    dietcl::ViTSpec bad;
    bad.img_size = 30;
    CHECK_THROWS(dietcl::flops_per_image(bad), std::invalid_argument, "img_size = 30");
    dietcl::ViTSpec huge;  // 4096 px at patch 1: 16.7 M tokens; N^2 attention overflows int64
    huge.img_size = 4096;
    huge.patch = 1;
    CHECK_THROWS(dietcl::flops_per_image(huge), std::overflow_error, "overflows 64-bit");

    dietcl::Ledger L(1024);
    L.register_path("classify", f.classify_fwd, f.classify_fwd_bwd);
    L.register_path("mae", f.mae_fwd, f.mae_fwd_bwd);
    L.begin_step(0, 10.0);
    for (int i = 0; i < 10; ++i) {
        L.charge("classify", 616);
        L.charge("mae", 408);
    }
    CHECK(L.spent_units() == 10.0);
    CHECK(!L.can_charge("mae", 1));
    CHECK_THROWS(L.charge("mae", 1), dietcl::BudgetExceeded, "budget exceeded");
    CHECK_THROWS(L.charge("nope", 1), std::invalid_argument, "unknown path");
    CHECK_THROWS(L.begin_step(0, 100.0), std::invalid_argument, "already begun");  // budget set once
    CHECK(!L.can_charge("mae", 1));
    L.begin_step(1, 1.0);
    L.charge("classify", 1024, false);
    CHECK(std::fabs(L.spent_units() - double(f.classify_fwd) / double(f.classify_fwd_bwd)) < 1e-15);
    auto bytes = L.state_bytes();
    auto R = dietcl::Ledger::from_state_bytes(bytes);
    CHECK(R.flops_total() == L.flops_total());
    CHECK(R.spent_units() == L.spent_units());
    CHECK(R.num_charges() == 21);
    bytes[bytes.size() - 9] ^= 4;
    CHECK_THROWS(dietcl::Ledger::from_state_bytes(bytes), dietcl::StateError, "checksum mismatch");
    dietcl::U128 u;
    u.add_product(~0ULL, ~0ULL);
    CHECK(u.to_string() == "340282366920938463426481119284349108225");
    TEST_MAIN_END();
}
