// dietcl error types. std::invalid_argument -> Python ValueError (pybind11 default);
// StateError and BudgetExceeded are translated to ValueError / BudgetExceeded(ValueError).
#pragma once
#include <stdexcept>
#include <string>

namespace dietcl {

// Corrupted, truncated or wrong-version serialized state.
struct StateError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A Ledger charge that would exceed the current step's budget.
struct BudgetExceeded : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace dietcl
