// SPDX-License-Identifier: MIT
// bindings.cpp - the gmem._core extension: converts Python values to and from the C++
// core in csrc/gmem/ and nothing else.  One bind_<area>() per wrapped core class.
//
// Locking and the GIL: every core object carries a reader/writer lock (lockable.hpp).
// A call takes it while still holding the GIL, sizes and allocates its numpy output, and
// only then drops the GIL for the loop; the lock is moved into the GIL-free scope so that
// it is always released *before* the GIL is taken back.  No thread ever waits for the GIL
// while holding an object lock, so the two locks cannot deadlock.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <mutex>
#include <shared_mutex>

#include "gmem/errors.hpp"
#include "gmem/folio_cache.hpp"
#include "gmem/interval_map.hpp"
#include "gmem/physmem.hpp"

namespace py = pybind11;
using namespace gmem;

namespace {

using u64_array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

/* An integer argument (anything with __index__) as u64: TypeError or ValueError naming it. */
uint64_t to_u64(py::handle h, const char *name)
{
    PyObject *idx = PyNumber_Index(h.ptr());
    if (!idx) {
        PyErr_Clear();
        throw py::type_error(std::string(name) + ": must be an integer, got " +
                             std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        bool negative = PyObject_RichCompareBool(idx, py::int_(0).ptr(), Py_LT) == 1;
        std::string got = py::str(idx);
        Py_DECREF(idx);
        throw InvalidArgument(std::string(name) +
                              (negative ? ": must be >= 0, got " : ": must be < 2**64, got ") +
                              got);
    }
    Py_DECREF(idx);
    return v;
}

uint64_t to_end(py::handle h, uint64_t none_value, const char *name = "end")
{
    return h.is_none() ? none_value : to_u64(h, name);
}

double to_double(py::handle h, const char *name)
{
    double v = PyFloat_AsDouble(h.ptr()); // takes __float__ and __index__, refuses str
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw py::type_error(std::string(name) + ": must be a number, got " +
                             std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    }
    return v;
}

unsigned to_order(py::handle h, const char *name = "order")
{
    uint64_t v = to_u64(h, name);
    if (v > MAX_ORDER)
        throw invalid(name, "must be in 0..18, got " + std::to_string(v));
    return unsigned(v);
}

void check_start_end(uint64_t start, uint64_t end)
{
    if (start > end)
        throw invalid("start", "must be <= end, got start=" + std::to_string(start) +
                                   " end=" + std::to_string(end));
}

/* A 1-D array of non-negative integers (or anything numpy turns into one) as u64. */
u64_array to_u64_array(py::handle obj, const char *name)
{
    py::array a = py::module_::import("numpy").attr("asarray")(obj);
    if (a.ndim() != 1)
        throw invalid(name, "must be a 1-D array, got " + std::to_string(a.ndim()) + " dims");
    char kind = a.dtype().kind();
    if (a.size() > 0 && kind != 'i' && kind != 'u')
        throw py::type_error(std::string(name) + ": must hold integers, got dtype " +
                             std::string(py::str(a.dtype())));
    if (kind == 'i' && a.size() > 0) {
        auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
        const int64_t *p = s.data();
        for (py::ssize_t i = 0; i < s.size(); i++)
            if (p[i] < 0)
                throw invalid(name, "must be >= 0, got " + std::to_string(p[i]) +
                                        " at position " + std::to_string(i));
    }
    return u64_array::ensure(a);
}

/* Run @fn without the GIL while still holding @lk, which is dropped before the GIL returns. */
template <class Lock, class Fn>
auto without_gil(Lock &lk, Fn &&fn)
{
    py::gil_scoped_release nogil;
    Lock held(std::move(lk));
    return fn();
}

py::array_t<uint64_t> new_u64_2d(size_t rows, size_t cols)
{
    return py::array_t<uint64_t>({py::ssize_t(rows), py::ssize_t(cols)});
}

struct FolioRow {
    uint64_t index;
    uint8_t order;
    uint64_t pfn;
    uint32_t pins;
    uint32_t mapped;
    bool uptodate;
};

py::array folio_rows(const std::vector<Folio> &folios)
{
    py::array_t<FolioRow> out(py::ssize_t(folios.size()));
    FolioRow *row = out.mutable_data();
    for (const Folio &f : folios)
        *row++ = FolioRow{f.index, uint8_t(f.order), f.pfn, 0, 0, f.uptodate};
    return std::move(out);
}

std::string first_line(const std::string &s) { return s.substr(0, s.find('\n')); }

void bind_errors(py::module_ &m)
{
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p)
                std::rethrow_exception(p);
        } catch (const InvalidArgument &e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        } catch (const OutOfMemory &e) {
            py::object cls = py::module_::import("gmem.errors").attr("OutOfMemory");
            PyErr_SetObject(cls.ptr(), py::str(e.what()).ptr());
        }
    });
    m.attr("MAX_ORDER") = MAX_ORDER;
    m.attr("NO_PFN") = py::int_(NO_PFN);
    m.attr("FOLIO_BATCH_SIZE") = FOLIO_BATCH_SIZE;
    m.attr("PFN_LIMIT") = py::int_(PFN_LIMIT);
}

void bind_interval_map(py::module_ &m)
{
    py::class_<IntervalMap>(m, "IntervalMap")
        .def(py::init([](py::handle nr_pages, py::handle dflt) {
                 return new IntervalMap(to_u64(nr_pages, "nr_pages"), to_u64(dflt, "default"));
             }),
             py::arg("nr_pages"), py::arg("default") = 0)
        .def_property_readonly("nr_pages", &IntervalMap::nr_pages)
        .def_property_readonly("memory_bytes",
                               [](const IntervalMap &im) {
                                   std::shared_lock lk(im.lock());
                                   return im.memory_bytes();
                               })
        .def("__len__",
             [](const IntervalMap &im) {
                 std::shared_lock lk(im.lock());
                 return im.nr_runs();
             })
        .def(
            "store",
            [](IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                uint64_t value = to_u64(v, "value");
                std::unique_lock lk(im.lock());
                im.store(start, end, value);
            },
            py::arg("start"), py::arg("end"), py::arg("value"))
        .def(
            "load",
            [](const IntervalMap &im, py::handle i) {
                uint64_t index = to_u64(i, "index");
                std::shared_lock lk(im.lock());
                return im.load(index);
            },
            py::arg("index"))
        .def(
            "range_has",
            [](const IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                uint64_t value = to_u64(v, "value");
                std::shared_lock lk(im.lock());
                return im.range_has(start, end, value);
            },
            py::arg("start"), py::arg("end"), py::arg("value"))
        .def(
            "runs",
            [](const IntervalMap &im, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, im.nr_pages());
                std::shared_lock lk(im.lock());
                size_t n = im.count_runs(start, end);
                auto out = new_u64_2d(n, 3);
                auto *rows = reinterpret_cast<Run *>(out.mutable_data());
                without_gil(lk, [&] { return im.runs(start, end, rows, n); });
                return out;
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "store_many",
            [](IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                u64_array starts = to_u64_array(s, "starts"), ends = to_u64_array(e, "ends");
                u64_array values = to_u64_array(v, "values");
                size_t n = size_t(starts.size());
                if (size_t(ends.size()) != n || size_t(values.size()) != n)
                    throw invalid("ends", "starts, ends and values must have one length, got " +
                                              std::to_string(n) + ", " +
                                              std::to_string(ends.size()) + ", " +
                                              std::to_string(values.size()));
                std::unique_lock lk(im.lock());
                // The arrays are our own contiguous copies or views we hold references to.
                without_gil(lk, [&] {
                    im.store_many(starts.data(), ends.data(), values.data(), n);
                    return 0;
                });
            },
            py::arg("starts"), py::arg("ends"), py::arg("values"))
        .def("dump",
             [](const IntervalMap &im) {
                 std::shared_lock lk(im.lock());
                 return im.dump();
             })
        .def("__repr__", [](const IntervalMap &im) {
            std::shared_lock lk(im.lock());
            return "<gmem." + first_line(im.dump()) + ">";
        });
}

void bind_physmem(py::module_ &m)
{
    py::class_<PhysMem>(m, "PhysMem")
        .def(py::init([](py::handle nr_pages, py::handle base_pfn, py::handle seed) {
                 return new PhysMem(to_u64(nr_pages, "nr_pages"), to_u64(base_pfn, "base_pfn"),
                                    to_u64(seed, "seed"));
             }),
             py::arg("nr_pages"), py::kw_only(), py::arg("base_pfn") = 0, py::arg("seed") = 0)
        .def_property_readonly("nr_pages", &PhysMem::nr_pages)
        .def_property_readonly("base_pfn", &PhysMem::base_pfn)
        .def_property_readonly("seed", &PhysMem::seed)
        .def_property_readonly("nr_free",
                               [](const PhysMem &pm) {
                                   std::shared_lock lk(pm.lock());
                                   return pm.nr_free();
                               })
        .def_property_readonly("nr_kept",
                               [](const PhysMem &pm) {
                                   std::shared_lock lk(pm.lock());
                                   return pm.nr_kept();
                               })
        .def(
            "alloc",
            [](PhysMem &pm, py::handle o) {
                unsigned order = to_order(o);
                std::unique_lock lk(pm.lock());
                return pm.alloc(order);
            },
            py::arg("order"))
        .def(
            "free",
            [](PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                std::unique_lock lk(pm.lock());
                pm.free(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "take",
            [](PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                std::unique_lock lk(pm.lock());
                pm.take(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "is_free",
            [](const PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                std::shared_lock lk(pm.lock());
                pm.check_block(pfn, order);
                return pm.is_free(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "fragment",
            [](PhysMem &pm, py::handle f) {
                double fraction = to_double(f, "fraction");
                std::unique_lock lk(pm.lock());
                without_gil(lk, [&] {
                    pm.fragment(fraction);
                    return 0;
                });
            },
            py::arg("fraction"))
        .def(
            "read",
            [](const PhysMem &pm, py::handle p) {
                uint64_t pfn = to_u64(p, "pfn");
                std::shared_lock lk(pm.lock());
                return pm.read(pfn);
            },
            py::arg("pfn"))
        .def(
            "write",
            [](PhysMem &pm, py::handle p, py::handle t) {
                uint64_t pfn = to_u64(p, "pfn"), token = to_u64(t, "token");
                std::unique_lock lk(pm.lock());
                pm.write(pfn, token);
            },
            py::arg("pfn"), py::arg("token"))
        .def("free_blocks",
             [](const PhysMem &pm) {
                 std::shared_lock lk(pm.lock());
                 auto blocks = pm.free_blocks();
                 auto out = new_u64_2d(blocks.size(), 2);
                 uint64_t *p = out.mutable_data();
                 for (const FreeBlock &b : blocks) {
                     *p++ = b.pfn;
                     *p++ = b.order;
                 }
                 return out;
             })
        .def("dump",
             [](const PhysMem &pm) {
                 std::shared_lock lk(pm.lock());
                 return pm.dump();
             })
        .def("__repr__", [](const PhysMem &pm) {
            std::shared_lock lk(pm.lock());
            return "<gmem." + first_line(pm.dump()) + ">";
        });
}

void bind_folio_cache(py::module_ &m)
{
    PYBIND11_NUMPY_DTYPE(FolioRow, index, order, pfn, pins, mapped, uptodate);
    m.attr("FOLIO_DTYPE") = py::dtype::of<FolioRow>();

    py::class_<FolioCache>(m, "FolioCache")
        .def(py::init<>())
        .def("__len__",
             [](const FolioCache &c) {
                 std::shared_lock lk(c.lock());
                 return c.nr_folios();
             })
        .def_property_readonly("nr_pages",
                               [](const FolioCache &c) {
                                   std::shared_lock lk(c.lock());
                                   return c.nr_pages();
                               })
        .def_property_readonly("memory_bytes",
                               [](const FolioCache &c) {
                                   std::shared_lock lk(c.lock());
                                   return c.memory_bytes();
                               })
        .def(
            "add_folio",
            [](FolioCache &c, py::handle i, py::handle o, py::handle p, bool uptodate) {
                uint64_t index = to_u64(i, "index"), pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                std::unique_lock lk(c.lock());
                c.add(index, order, pfn, uptodate);
            },
            py::arg("index"), py::arg("order"), py::arg("pfn"), py::arg("uptodate") = false)
        .def(
            "add_folios",
            [](FolioCache &c, py::handle i, py::handle o, py::handle p) {
                u64_array index = to_u64_array(i, "index"), order = to_u64_array(o, "order");
                u64_array pfn = to_u64_array(p, "pfn");
                size_t n = size_t(index.size());
                if (size_t(order.size()) != n || size_t(pfn.size()) != n)
                    throw invalid("order", "index, order and pfn must have one length, got " +
                                               std::to_string(n) + ", " +
                                               std::to_string(order.size()) + ", " +
                                               std::to_string(pfn.size()));
                std::unique_lock lk(c.lock());
                without_gil(lk, [&] {
                    c.add_many(index.data(), order.data(), pfn.data(), n);
                    return 0;
                });
            },
            py::arg("index"), py::arg("order"), py::arg("pfn"))
        .def(
            "remove_folio",
            [](FolioCache &c, py::handle i) {
                uint64_t index = to_u64(i, "index");
                std::unique_lock lk(c.lock());
                Folio f = c.remove(index);
                return py::make_tuple(f.index, f.order, f.pfn);
            },
            py::arg("index"))
        .def(
            "lookup",
            [](const FolioCache &c, py::handle i) -> py::object {
                uint64_t index = to_u64(i, "index");
                std::shared_lock lk(c.lock());
                Folio f;
                if (!c.lookup(index, &f))
                    return py::none();
                return py::make_tuple(f.index, f.order, f.pfn);
            },
            py::arg("index"))
        .def(
            "split",
            [](FolioCache &c, py::handle i, py::handle o) {
                uint64_t index = to_u64(i, "index");
                unsigned new_order = to_order(o, "new_order");
                std::unique_lock lk(c.lock());
                c.split(index, new_order);
            },
            py::arg("index"), py::arg("new_order"))
        .def(
            "split_range",
            [](FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                std::unique_lock lk(c.lock());
                return c.split_range(start, end);
            },
            py::arg("start"), py::arg("end"))
        .def(
            "folios",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, NO_PFN);
                check_start_end(start, end);
                std::shared_lock lk(c.lock());
                return folio_rows(c.folios(start, end));
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "pfn_ranges",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                std::shared_lock lk(c.lock());
                size_t n = c.count(start, end);
                auto out = new_u64_2d(n, 2);
                auto *ranges = reinterpret_cast<PfnRange *>(out.mutable_data());
                without_gil(lk, [&] { return c.pfn_ranges(start, end, ranges); });
                return out;
            },
            py::arg("start"), py::arg("end"))
        .def(
            "pfn_batches",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                std::shared_lock lk(c.lock());
                py::list batches;
                c.walk_batches(start, end, [&](const Folio *, const PfnRange *r, unsigned n) {
                    auto a = new_u64_2d(n, 2);
                    std::memcpy(a.mutable_data(), r, n * sizeof(PfnRange));
                    batches.append(a);
                });
                return batches;
            },
            py::arg("start"), py::arg("end"))
        .def(
            "page_pfns",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                py::array_t<uint64_t> out(py::ssize_t(end - start));
                std::shared_lock lk(c.lock());
                uint64_t *p = out.mutable_data();
                without_gil(lk, [&] {
                    c.page_pfns(start, end, p);
                    return 0;
                });
                return out;
            },
            py::arg("start"), py::arg("end"))
        .def("dump",
             [](const FolioCache &c) {
                 std::shared_lock lk(c.lock());
                 return c.dump();
             })
        .def("__repr__", [](const FolioCache &c) {
            std::shared_lock lk(c.lock());
            return "<gmem." + first_line(c.dump()) + ">";
        });
}

void bind_clamp(py::module_ &m)
{
    m.def(
        "clamp_folio_ranges",
        [](py::handle i, py::handle o, py::handle p, py::handle s, py::handle e) {
            u64_array index = to_u64_array(i, "index"), order = to_u64_array(o, "order");
            u64_array pfn = to_u64_array(p, "pfn");
            uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
            check_start_end(start, end);
            size_t n = size_t(index.size());
            if (size_t(order.size()) != n || size_t(pfn.size()) != n)
                throw invalid("order", "index, order and pfn must have one length, got " +
                                           std::to_string(n) + ", " +
                                           std::to_string(order.size()) + ", " +
                                           std::to_string(pfn.size()));
            const uint64_t *ip = index.data(), *op = order.data(), *pp = pfn.data();
            size_t first = 0, count = 0;
            {
                // Safe without the GIL: the three arrays are contiguous and referenced here.
                py::gil_scoped_release nogil;
                check_folio_layout(ip, op, pp, n);
                count = count_clamped(ip, op, n, start, end, &first);
            }
            auto out = new_u64_2d(count, 2);
            auto *ranges = reinterpret_cast<PfnRange *>(out.mutable_data());
            {
                py::gil_scoped_release nogil;
                clamp_folio_ranges(ip, op, pp, first, count, start, end, ranges);
            }
            return out;
        },
        py::arg("index"), py::arg("order"), py::arg("pfn"), py::arg("start"), py::arg("end"));
}

} // namespace

PYBIND11_MODULE(_core, m)
{
    m.doc() = "gmem C++ engine (private; use the gmem package)";
    bind_errors(m);
    bind_interval_map(m);
    bind_physmem(m);
    bind_folio_cache(m);
    bind_clamp(m);
}
