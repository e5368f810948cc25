// pybind11 module dietcl_fast._core: BalancedBuffer, ViTSpec / flops_per_image, Ledger.
// std::invalid_argument -> ValueError (pybind11 default); dietcl::StateError -> ValueError;
// dietcl::BudgetExceeded -> _core.BudgetExceeded (a ValueError subclass).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "dietcl/balanced_buffer.hpp"
#include "dietcl/errors.hpp"
#include "dietcl/flops.hpp"
#include "dietcl/ledger.hpp"

namespace py = pybind11;
using dietcl::BalancedBuffer;
using dietcl::Ledger;

namespace {

// Draws at or above this many items release the GIL while sampling; below it the work
// (< ~100 us) is shorter than a GIL hand-off can cost other threads, so it is kept.
constexpr int64_t kReleaseGilMin = int64_t(1) << 14;

// One uninitialised heap block backs all three outputs of sample() (ids | labels | tasks);
// numpy views it without copying and a single capsule frees it with the last array.
py::tuple sample_arrays(const BalancedBuffer& b, int64_t n, int64_t step, int64_t rank, int64_t world_size) {
    const int64_t k = BalancedBuffer::shard_size(n, rank, world_size);
    constexpr size_t per_item = 2 * sizeof(int64_t) + sizeof(int32_t);
    // the byte count must not wrap (it would allocate a small block and write past it)
    if (static_cast<uint64_t>(k) > static_cast<uint64_t>(PTRDIFF_MAX) / per_item)
        throw std::invalid_argument("BalancedBuffer: sample: n = " + std::to_string(n) + " items (" +
                                    std::to_string(k) + " on this rank) cannot be held in memory");
    const size_t bytes = static_cast<size_t>(k) * per_item;
    // (Huge-page-advised output blocks were tried for 1M draws: slower, first-touch compaction.)
    std::unique_ptr<char, void (*)(char*)> raw(static_cast<char*>(std::malloc(bytes > 0 ? bytes : 1)),
                                               [](char* q) { std::free(q); });
    if (!raw) throw std::bad_alloc();
    auto* ids = reinterpret_cast<int64_t*>(raw.get());
    int64_t* labels = ids + k;
    auto* tasks = reinterpret_cast<int32_t*>(labels + k);
    if (k >= kReleaseGilMin) {
        py::gil_scoped_release nogil;
        b.sample_into(n, step, rank, world_size, ids, labels, tasks);
    } else {
        b.sample_into(n, step, rank, world_size, ids, labels, tasks);
    }
    py::capsule owner(raw.get(), [](void* q) { std::free(q); });
    raw.release();  // owned by the capsule from here on
    const py::ssize_t len = static_cast<py::ssize_t>(k);
    return py::make_tuple(py::array_t<int64_t>(len, ids, owner), py::array_t<int64_t>(len, labels, owner),
                          py::array_t<int32_t>(len, tasks, owner));
}

py::object u128_to_int(const dietcl::U128& x) {
    return py::reinterpret_steal<py::object>(PyLong_FromString(x.to_string().c_str(), nullptr, 10));
}

py::bytes to_bytes(const std::vector<uint8_t>& b) {
    return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
}

std::string from_bytes(const py::bytes& b) { return std::string(b); }

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "dietcl-fast native core (C++17): BalancedBuffer, FLOP model, Ledger";

    static py::exception<dietcl::BudgetExceeded> budget_exc(m, "BudgetExceeded", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const dietcl::BudgetExceeded& e) {
            py::set_error(budget_exc, e.what());
        } catch (const dietcl::StateError& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    // ---------------------------------------------------------------- BalancedBuffer
    py::class_<BalancedBuffer>(m, "BalancedBuffer")
        .def(py::init<uint64_t, bool, bool>(), py::arg("seed") = 0, py::arg("replacement") = false,
             py::arg("class_balanced") = false)
        .def(
            "add",
            [](BalancedBuffer& b, int64_t task, I64Array ids, I64Array labels) {
                if (ids.ndim() != 1 || labels.ndim() != 1)
                    throw std::invalid_argument("BalancedBuffer: add: ids and labels must be 1-D");
                if (ids.shape(0) != labels.shape(0))
                    throw std::invalid_argument("BalancedBuffer: add: ids and labels must have the same length (got " +
                                                std::to_string(ids.shape(0)) + " ids and " +
                                                std::to_string(labels.shape(0)) + " labels)");
                const int64_t n = ids.shape(0);
                const int64_t* pi = ids.data();
                const int64_t* pl = labels.data();
                py::gil_scoped_release nogil;
                b.add(task, pi, pl, n);
            },
            py::arg("task"), py::arg("ids"), py::arg("labels"))
        .def(
            "sample",
            [](const BalancedBuffer& b, int64_t n, int64_t step, int64_t rank, int64_t world_size) {
                if (n < 0 || world_size < 1 || rank < 0 || rank >= world_size || step < 0)
                    b.sample_into(n, step, rank, world_size, nullptr, nullptr, nullptr);  // throws
                return sample_arrays(b, n, step, rank, world_size);
            },
            py::arg("n"), py::arg("step"), py::arg("rank") = 0, py::arg("world_size") = 1)
        .def_static("shard_size", &BalancedBuffer::shard_size)
        .def("__len__", &BalancedBuffer::size)
        .def_property_readonly("num_tasks", &BalancedBuffer::num_tasks)
        .def_property_readonly("seed", &BalancedBuffer::seed)
        .def_property_readonly("replacement", &BalancedBuffer::replacement)
        .def_property_readonly("class_balanced", &BalancedBuffer::class_balanced)
        .def("task_sizes", &BalancedBuffer::task_sizes)
        .def("state_bytes", [](const BalancedBuffer& b) { return to_bytes(b.state_bytes()); })
        .def_static("from_state_bytes", [](const py::bytes& data) {
            const std::string s = from_bytes(data);
            return BalancedBuffer::from_state_bytes(reinterpret_cast<const uint8_t*>(s.data()), s.size());
        });

    // ---------------------------------------------------------------- FLOP model
    py::class_<dietcl::ViTSpec>(m, "ViTSpec")
        .def(py::init<>())
        .def_readwrite("img_size", &dietcl::ViTSpec::img_size)
        .def_readwrite("patch", &dietcl::ViTSpec::patch)
        .def_readwrite("in_chans", &dietcl::ViTSpec::in_chans)
        .def_readwrite("embed_dim", &dietcl::ViTSpec::embed_dim)
        .def_readwrite("depth", &dietcl::ViTSpec::depth)
        .def_readwrite("heads", &dietcl::ViTSpec::heads)
        .def_readwrite("mlp_ratio", &dietcl::ViTSpec::mlp_ratio)
        .def_readwrite("num_classes", &dietcl::ViTSpec::num_classes)
        .def_readwrite("class_token", &dietcl::ViTSpec::class_token)
        .def_readwrite("decoder_dim", &dietcl::ViTSpec::decoder_dim)
        .def_readwrite("decoder_depth", &dietcl::ViTSpec::decoder_depth)
        .def_readwrite("decoder_heads", &dietcl::ViTSpec::decoder_heads)
        .def_readwrite("mask_ratio", &dietcl::ViTSpec::mask_ratio);

    m.def("flops_per_image", [](const dietcl::ViTSpec& s) {
        const dietcl::FlopsPerImage f = dietcl::flops_per_image(s);
        py::dict d;
        d["classify_fwd"] = f.classify_fwd;
        d["classify_fwd_bwd"] = f.classify_fwd_bwd;
        d["mae_fwd"] = f.mae_fwd;
        d["mae_fwd_bwd"] = f.mae_fwd_bwd;
        d["classify_fwd_bwd_flash"] = f.classify_fwd_bwd_flash;
        d["mae_fwd_bwd_flash"] = f.mae_fwd_bwd_flash;
        return d;
    });

    // ---------------------------------------------------------------- Ledger
    py::class_<Ledger>(m, "Ledger")
        .def(py::init<int64_t>(), py::arg("global_batch") = 1024)
        .def_property_readonly("global_batch", &Ledger::global_batch)
        .def("register_path", &Ledger::register_path, py::arg("name"), py::arg("fwd_flops_per_image"),
             py::arg("fwd_bwd_flops_per_image"))
        .def("has_path", &Ledger::has_path)
        .def("paths",
             [](const Ledger& l) {
                 py::dict d;
                 for (const auto& kv : l.paths())
                     d[py::str(kv.first)] = py::make_tuple(kv.second.fwd, kv.second.fwd_bwd);
                 return d;
             })
        .def("begin_step", &Ledger::begin_step, py::arg("t"), py::arg("budget_units"))
        .def_property_readonly("in_step", &Ledger::in_step)
        .def_property_readonly("current_step", &Ledger::current_step)
        .def("units_for", &Ledger::units_for, py::arg("path"), py::arg("images"), py::arg("backward") = true)
        .def("can_charge", &Ledger::can_charge, py::arg("path"), py::arg("images"), py::arg("backward") = true)
        .def("charge", &Ledger::charge, py::arg("path"), py::arg("images"), py::arg("backward") = true)
        .def("budget_units", &Ledger::budget_units)
        .def("spent_units", &Ledger::spent_units)
        .def("remaining_units", &Ledger::remaining_units)
        .def("steps",
             [](const Ledger& l) {
                 py::list out;
                 for (const auto& s : l.steps()) {
                     py::dict d;
                     d["t"] = s.t;
                     d["budget"] = s.budget;
                     d["units"] = s.units(l.global_batch());
                     d["images_fwd_bwd"] = s.images_fwd_bwd;
                     d["fwd_only_units"] = s.fwd_only_units.value();
                     d["flops"] = u128_to_int(s.flops);
                     d["charges"] = s.charges;
                     out.append(d);
                 }
                 return out;
             })
        .def("records",
             [](const Ledger& l) {
                 py::list out;
                 for (const auto& r : l.records()) {
                     py::dict d;
                     d["t"] = r.t;
                     d["path"] = r.path;
                     d["backward"] = r.backward;
                     d["charges"] = r.charges;
                     d["images"] = r.images;
                     d["flops"] = u128_to_int(r.flops);
                     d["units"] = r.units.value();
                     out.append(d);
                 }
                 return out;
             })
        .def_property_readonly("flops_total", [](const Ledger& l) { return u128_to_int(l.flops_total()); })
        .def_property_readonly("num_charges", &Ledger::num_charges)
        .def("state_bytes", [](const Ledger& l) { return to_bytes(l.state_bytes()); })
        .def_static("from_state_bytes", [](const py::bytes& data) {
            const std::string s = from_bytes(data);
            return Ledger::from_state_bytes(reinterpret_cast<const uint8_t*>(s.data()), s.size());
        });
}
