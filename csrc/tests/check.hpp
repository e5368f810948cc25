// Tiny self-contained check macros for the C++ unit tests (no gtest: no network).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>

namespace dietcl_test {
inline int& failures() {
    static int f = 0;
    return f;
}
}  // namespace dietcl_test

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++dietcl_test::failures();                                              \
        }                                                                           \
    } while (0)

#define CHECK_THROWS(expr, ExcType, needle)                                                         \
    do {                                                                                            \
        bool thrown_ = false;                                                                       \
        try {                                                                                       \
            expr;                                                                                   \
        } catch (const ExcType& e_) {                                                               \
            thrown_ = std::string(e_.what()).find(needle) != std::string::npos;                     \
            if (!thrown_) std::fprintf(stderr, "%s:%d: wrong message: %s\n", __FILE__, __LINE__, e_.what()); \
        } catch (...) {                                                                             \
        }                                                                                           \
        if (!thrown_) {                                                                             \
            std::fprintf(stderr, "%s:%d: expected %s(\"%s\") from %s\n", __FILE__, __LINE__, #ExcType, needle, #expr); \
            ++dietcl_test::failures();                                                              \
        }                                                                                           \
    } while (0)

#define TEST_MAIN_END()                                                        \
    do {                                                                       \
        if (dietcl_test::failures()) {                                         \
            std::fprintf(stderr, "%d check(s) failed\n", dietcl_test::failures()); \
            return 1;                                                          \
        }                                                                      \
        std::printf("all checks passed\n");                                    \
        return 0;                                                              \
    } while (0)
