// SPDX-License-Identifier: MIT
// bindings.cpp - the gmem._core extension: converts Python values to and from the C++
// core in csrc/gmem/ and nothing else.  One bind_<area>() per wrapped core class.
//
// Locking and the GIL: every core object carries a ModelLock (lockable.hpp); a
// GuestMemfd uses its PhysMem's.  A call first tries the lock while holding the GIL and,
// only if that fails, drops the GIL to wait for it (Guard).  A long loop then drops the
// GIL while holding the lock (Guard::nogil), and gives the lock back *before* it takes
// the GIL again.  So no thread ever waits for the GIL while holding a model lock, or for
// a model lock while holding the GIL, and the two cannot deadlock - even when a Python
// arch hook, running under the model lock, lets another Python thread run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <chrono>
#include <thread>
#include <unordered_map>
#include <climits>
#include <type_traits>
#include <utility>
#include <cstring>
#include <functional>
#include <optional>
#include <mutex>
#include <shared_mutex>

#include "gmem/arch.hpp"
#include "gmem/errors.hpp"
#include "gmem/guest_memfd.hpp"
#include "gmem/host.hpp"
#include "gmem/interrupt.hpp"
#include "gmem/folio_cache.hpp"
#include "gmem/interval_map.hpp"
#include "gmem/pfn_check.hpp"
#include "gmem/physmem.hpp"

namespace py = pybind11;
using namespace gmem;

/*
 * Objects made with Cls.__new__(Cls) and never initialised: pybind11 would hand their
 * methods uninitialised memory.  Every gmem class is loaded as `self` through this
 * caster, which refuses such an object with a TypeError first.
 */
namespace gmem_detail {
inline bool initialised(py::handle h)
{
    if (!py::isinstance(h, py::handle(reinterpret_cast<PyObject *>(
                               py::detail::get_internals().instance_base))))
        return true; // not a pybind11 instance: the base caster says no on its own
    auto *inst = reinterpret_cast<py::detail::instance *>(h.ptr());
    for (auto &vh : py::detail::values_and_holders(inst))
        if (!vh.holder_constructed())
            return false;
    return true;
}

template <class T>
struct checked_caster : py::detail::type_caster_base<T> {
    bool load(py::handle src, bool convert)
    {
        if (src && !initialised(src))
            throw py::type_error(std::string(py::str(py::type::handle_of(src).attr("__name__"))) +
                                 ": this object was never initialised (made with __new__ and "
                                 "no __init__); create it by calling the class");
        return py::detail::type_caster_base<T>::load(src, convert);
    }
};
} // namespace gmem_detail

namespace pybind11::detail {
template <> struct type_caster<gmem::GuestMemfd> : gmem_detail::checked_caster<gmem::GuestMemfd> {};
template <> struct type_caster<gmem::PhysMem> : gmem_detail::checked_caster<gmem::PhysMem> {};
template <> struct type_caster<gmem::IntervalMap> : gmem_detail::checked_caster<gmem::IntervalMap> {};
template <> struct type_caster<gmem::FolioCache> : gmem_detail::checked_caster<gmem::FolioCache> {};
template <> struct type_caster<gmem::Violation> : gmem_detail::checked_caster<gmem::Violation> {};
template <> struct type_caster<gmem::Arch> : gmem_detail::checked_caster<gmem::Arch> {};
template <> struct type_caster<gmem::SwProtected> : gmem_detail::checked_caster<gmem::SwProtected> {};
template <> struct type_caster<gmem::SNP> : gmem_detail::checked_caster<gmem::SNP> {};
template <> struct type_caster<gmem::TDX> : gmem_detail::checked_caster<gmem::TDX> {};
template <> struct type_caster<gmem::PKVM> : gmem_detail::checked_caster<gmem::PKVM> {};
template <> struct type_caster<gmem::Recorder> : gmem_detail::checked_caster<gmem::Recorder> {};
} // namespace pybind11::detail

namespace {

using u64_array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

/* An integer argument (anything with __index__) as u64: TypeError or ValueError naming it. */
uint64_t to_u64(py::handle h, const char *name)
{
    if (PyLong_CheckExact(h.ptr())) { // the common case, without a new reference
        unsigned long long v = PyLong_AsUnsignedLongLong(h.ptr());
        if (!(v == (unsigned long long)-1 && PyErr_Occurred()))
            return v;
        PyErr_Clear(); // negative or too large: the path below says which
    }
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

/* A query range of a file: start <= end <= nr_pages (empty ranges answer empty). */
void check_query(const GuestMemfd &f, uint64_t start, uint64_t end)
{
    check_start_end(start, end);
    if (end > f.nr_pages())
        throw invalid("end", "must be <= nr_pages (" + std::to_string(f.nr_pages()) +
                                 "), got " + std::to_string(end));
}

/* A page_pfns answer of end - start entries must fit in the host's memory. */
void check_page_count(uint64_t start, uint64_t end)
{
    uint64_t n = end - start;
    if (n > SMALL_REQUEST / sizeof(uint64_t) && n > host_memory_available() / sizeof(uint64_t))
        throw invalid("end", "[" + std::to_string(start) + ", " + std::to_string(end) +
                                 ") is " + std::to_string(end - start) +
                                 " pages: one PFN each is more than the host has available");
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

/* Three parallel 1-D arrays of one length, as u64: (starts, ends, values) or (index, order,
 * pfn).  A length mismatch is a ValueError naming the second array. */
struct Columns {
    u64_array a, b, c;
    size_t n;
};

Columns to_columns(py::handle a, py::handle b, py::handle c, const char *na, const char *nb,
                   const char *nc)
{
    Columns cols{to_u64_array(a, na), to_u64_array(b, nb), to_u64_array(c, nc), 0};
    cols.n = size_t(cols.a.size());
    if (size_t(cols.b.size()) != cols.n || size_t(cols.c.size()) != cols.n)
        throw invalid(nb, std::string(na) + ", " + nb + " and " + nc +
                              " must have one length, got " + std::to_string(cols.n) + ", " +
                              std::to_string(cols.b.size()) + ", " +
                              std::to_string(cols.c.size()));
    return cols;
}

/*
 * WaitGraph - which thread waits for which model lock, kept for the threads that wait while
 * holding one: a hook (its operation holds its PhysMem's lock) that calls into a file on
 * another PhysMem.  Only they can close a cycle, since every other holder of a model lock
 * runs C++ to completion without waiting for anything.  A waiter follows the chain
 * lock -> its exclusive owner -> the lock that owner waits for -> ...; coming back to
 * itself means a deadlock, and it gives up with an error instead.
 */
class WaitGraph {
public:
    void wait_for(const ModelLock *m)
    {
        std::lock_guard<std::mutex> lk(mu_);
        waiting_[std::this_thread::get_id()] = m;
    }
    void done()
    {
        std::lock_guard<std::mutex> lk(mu_);
        waiting_.erase(std::this_thread::get_id());
    }
    bool closes_cycle(const ModelLock *m)
    {
        std::lock_guard<std::mutex> lk(mu_);
        const std::thread::id me = std::this_thread::get_id();
        for (size_t hops = 0; hops <= waiting_.size(); hops++) {
            std::thread::id owner = m->owner();
            if (owner == me)
                return true;
            auto it = waiting_.find(owner);
            if (owner == std::thread::id() || it == waiting_.end())
                return false;
            m = it->second;
        }
        return false;
    }

private:
    std::mutex mu_;
    std::unordered_map<std::thread::id, const ModelLock *> waiting_;
};

WaitGraph &wait_graph()
{
    static WaitGraph *g = new WaitGraph; // never destroyed: threads may outlive statics
    return *g;
}

/* How many model locks this thread holds exclusively (through Guards). */
thread_local unsigned held_exclusive = 0;

/*
 * Guard - holds a ModelLock for one bound call, shared (Read) or exclusive (Write).
 * A thread that already holds the lock exclusively is inside an operation of that model
 * (an arch hook calling back); it proceeds without locking again.  A thread that has to
 * wait does so without the GIL, a few milliseconds at a time, looking for Ctrl-C (and,
 * if it holds another model lock, for a deadlock) in between.
 */
enum class Mode { Read, Write };

class Guard {
public:
    Guard(ModelLock &m, Mode mode) : m_(m), shared_(mode == Mode::Read)
    {
        if (m.held_by_me())
            return;
        if (shared_ ? !m.try_lock_shared() : !m.try_lock())
            wait();
        owned_ = true;
        held_exclusive += !shared_;
    }
    ~Guard() { unlock(); }
    Guard(const Guard &) = delete;
    Guard &operator=(const Guard &) = delete;

    /// Run @fn without the GIL; the lock is released before the GIL is taken back.
    template <class Fn>
    auto nogil(Fn &&fn)
    {
        py::gil_scoped_release nogil;
        struct Unlock {
            Guard *g;
            ~Unlock() { g->unlock(); }
        } unlock_first{this};
        return fn();
    }

    void unlock()
    {
        if (!owned_)
            return;
        owned_ = false;
        held_exclusive -= !shared_;
        shared_ ? m_.unlock_shared() : m_.unlock();
    }

private:
    ModelLock &m_;
    bool shared_, owned_ = false;

    void wait()
    {
        const bool watch = held_exclusive > 0;
        if (watch)
            wait_graph().wait_for(&m_);
        struct Done {
            bool on;
            ~Done()
            {
                if (on)
                    wait_graph().done();
            }
        } done{watch};
        for (;;) {
            bool got;
            {
                py::gil_scoped_release nogil;
                auto slice = std::chrono::milliseconds(10);
                got = shared_ ? m_.try_lock_shared_for(slice) : m_.try_lock_for(slice);
            }
            if (got)
                return;
            if (watch && wait_graph().closes_cycle(&m_))
                throw Reentrant("deadlock: this thread holds one PhysMem's lock (an arch "
                                "hook is running) and waits for another's, whose holder "
                                "waits for this one; the call is refused");
            if (PyErr_CheckSignals() != 0)
                throw py::error_already_set();
        }
    }
};

py::array_t<uint64_t> new_u64_2d(size_t rows, size_t cols)
{
    return py::array_t<uint64_t>({py::ssize_t(rows), py::ssize_t(cols)});
}

/* The runs of a per-PFN map, in absolute PFNs. */
py::array_t<uint64_t> shifted_runs(const IntervalMap &map, uint64_t base)
{
    auto runs = map.runs(0, map.nr_pages());
    auto out = new_u64_2d(runs.size(), 3);
    uint64_t *p = out.mutable_data();
    for (const Run &r : runs) {
        *p++ = r.start + base;
        *p++ = r.end + base;
        *p++ = r.value;
    }
    return out;
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
        } catch (const Reentrant &e) {
            PyErr_SetString(PyExc_RuntimeError, e.what());
        } catch (const OutOfMemory &e) {
            py::object cls = py::module_::import("gmem.errors").attr("OutOfMemory");
            PyErr_SetObject(cls.ptr(), py::str(e.what()).ptr());
        } catch (const ConversionBusy &e) {
            py::object cls = py::module_::import("gmem.errors").attr("ConversionBusy");
            py::object exc = cls(e.what(), e.error_index);
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const HWPoison &e) {
            py::object cls = py::module_::import("gmem.errors").attr("HWPoison");
            py::object exc = cls(e.what(), e.index);
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const SigBus &e) {
            py::object cls = py::module_::import("gmem.errors").attr("SigBus");
            py::object exc = cls(e.what(), e.index);
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const Interrupted &e) {
            PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
        }
    });
    // Long loops of the core ask, every 20 ms, whether Ctrl-C is pending.  They must not
    // run signal handlers (PyErr_CheckSignals would): a handler is arbitrary Python, and
    // this thread holds the model lock in the middle of an update.  SIGINT is taken here
    // and becomes the KeyboardInterrupt the default handler would raise; other signals
    // are handled when the call returns.
    set_interrupt_probe([]() -> bool {
        py::gil_scoped_acquire gil;
        return PyOS_InterruptOccurred() != 0;
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
                                   Guard lk(im.lock(), Mode::Read);
                                   return im.memory_bytes();
                               })
        .def("__len__",
             [](const IntervalMap &im) {
                 Guard lk(im.lock(), Mode::Read);
                 return im.nr_runs();
             })
        .def(
            "store",
            [](IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                uint64_t value = to_u64(v, "value");
                Guard lk(im.lock(), Mode::Write);
                im.store(start, end, value);
            },
            py::arg("start"), py::arg("end"), py::arg("value"))
        .def(
            "load",
            [](const IntervalMap &im, py::handle i) {
                uint64_t index = to_u64(i, "index");
                Guard lk(im.lock(), Mode::Read);
                return im.load(index);
            },
            py::arg("index"))
        .def(
            "range_has",
            [](const IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                uint64_t value = to_u64(v, "value");
                Guard lk(im.lock(), Mode::Read);
                return im.range_has(start, end, value);
            },
            py::arg("start"), py::arg("end"), py::arg("value"))
        .def(
            "runs",
            [](const IntervalMap &im, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, im.nr_pages());
                Guard lk(im.lock(), Mode::Read);
                size_t n = im.count_runs(start, end);
                auto out = new_u64_2d(n, 3);
                auto *rows = reinterpret_cast<Run *>(out.mutable_data());
                lk.nogil([&] { return im.runs(start, end, rows, n); });
                return out;
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "store_many",
            [](IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                Columns cols = to_columns(s, e, v, "starts", "ends", "values");
                Guard lk(im.lock(), Mode::Write);
                // The arrays are our own contiguous copies or views we hold references to.
                lk.nogil([&] {
                    im.store_many(cols.a.data(), cols.b.data(), cols.c.data(), cols.n);
                    return 0;
                });
            },
            py::arg("starts"), py::arg("ends"), py::arg("values"))
        .def("dump",
             [](const IntervalMap &im) {
                 Guard lk(im.lock(), Mode::Read);
                 return im.dump();
             })
        .def("__repr__", [](const IntervalMap &im) {
            Guard lk(im.lock(), Mode::Read);
            return "<gmem." + first_line(im.dump()) + ">";
        });
}

void bind_physmem(py::module_ &m)
{
    py::class_<PhysMem, std::shared_ptr<PhysMem>>(m, "PhysMem")
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
                                   Guard lk(pm.lock(), Mode::Read);
                                   return pm.nr_free();
                               })
        .def_property_readonly("nr_kept",
                               [](const PhysMem &pm) {
                                   Guard lk(pm.lock(), Mode::Read);
                                   return pm.nr_kept();
                               })
        .def(
            "alloc",
            [](PhysMem &pm, py::handle o) {
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Write);
                return pm.user_alloc(order);
            },
            py::arg("order"))
        .def(
            "free",
            [](PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Write);
                pm.user_free(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "take",
            [](PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Write);
                pm.user_take(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "is_free",
            [](const PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Read);
                pm.check_block(pfn, order);
                return pm.is_free(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "fragment",
            [](PhysMem &pm, py::handle f) {
                double fraction = to_double(f, "fraction");
                Guard lk(pm.lock(), Mode::Write);
                lk.nogil([&] {
                    pm.fragment(fraction);
                    return 0;
                });
            },
            py::arg("fraction"))
        .def(
            "read",
            [](const PhysMem &pm, py::handle p) {
                uint64_t pfn = to_u64(p, "pfn");
                Guard lk(pm.lock(), Mode::Read);
                return pm.read(pfn);
            },
            py::arg("pfn"))
        .def(
            "write",
            [](PhysMem &pm, py::handle p, py::handle t) {
                uint64_t pfn = to_u64(p, "pfn"), token = to_u64(t, "token");
                Guard lk(pm.lock(), Mode::Write);
                pm.write(pfn, token);
            },
            py::arg("pfn"), py::arg("token"))
        .def("rmp_runs",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 return shifted_runs(pm.rmp(), pm.base_pfn());
             })
        .def("content_runs",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 auto runs = pm.contents(pm.base_pfn(), pm.nr_pages());
                 auto out = new_u64_2d(runs.size(), 3);
                 std::memcpy(out.mutable_data(), runs.data(), runs.size() * sizeof(Run));
                 return out;
             })
        .def("owner_runs",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 return shifted_runs(pm.owner(), pm.base_pfn());
             })
        .def("free_blocks",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 if (pm.nr_free_blocks() > FREE_BLOCKS_LISTED)
                     throw invalid("self", std::to_string(pm.nr_free_blocks()) +
                                               " free blocks are more than free_blocks() "
                                               "lists (2**24); nr_free counts them");
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
                 Guard lk(pm.lock(), Mode::Read);
                 return pm.dump();
             })
        .def("__repr__", [](const PhysMem &pm) {
            Guard lk(pm.lock(), Mode::Read);
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
                 Guard lk(c.lock(), Mode::Read);
                 return c.nr_folios();
             })
        .def_property_readonly("nr_pages",
                               [](const FolioCache &c) {
                                   Guard lk(c.lock(), Mode::Read);
                                   return c.nr_pages();
                               })
        .def_property_readonly("memory_bytes",
                               [](const FolioCache &c) {
                                   Guard lk(c.lock(), Mode::Read);
                                   return c.memory_bytes();
                               })
        .def(
            "add_folio",
            [](FolioCache &c, py::handle i, py::handle o, py::handle p, bool uptodate) {
                uint64_t index = to_u64(i, "index"), pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(c.lock(), Mode::Write);
                c.add(index, order, pfn, uptodate);
            },
            py::arg("index"), py::arg("order"), py::arg("pfn"), py::arg("uptodate") = false)
        .def(
            "add_folios",
            [](FolioCache &c, py::handle i, py::handle o, py::handle p) {
                Columns cols = to_columns(i, o, p, "index", "order", "pfn");
                Guard lk(c.lock(), Mode::Write);
                lk.nogil([&] {
                    c.add_many(cols.a.data(), cols.b.data(), cols.c.data(), cols.n);
                    return 0;
                });
            },
            py::arg("index"), py::arg("order"), py::arg("pfn"))
        .def(
            "remove_folio",
            [](FolioCache &c, py::handle i) {
                uint64_t index = to_u64(i, "index");
                Guard lk(c.lock(), Mode::Write);
                Folio f = c.remove(index);
                return py::make_tuple(f.index, f.order, f.pfn);
            },
            py::arg("index"))
        .def(
            "lookup",
            [](const FolioCache &c, py::handle i) -> py::object {
                uint64_t index = to_u64(i, "index");
                Guard lk(c.lock(), Mode::Read);
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
                Guard lk(c.lock(), Mode::Write);
                c.split(index, new_order);
            },
            py::arg("index"), py::arg("new_order"))
        .def(
            "split_range",
            [](FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                Guard lk(c.lock(), Mode::Write);
                return c.split_range(start, end);
            },
            py::arg("start"), py::arg("end"))
        .def(
            "folios",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, NO_PFN);
                check_start_end(start, end);
                Guard lk(c.lock(), Mode::Read);
                return folio_rows(c.folios(start, end));
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "pfn_ranges",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                Guard lk(c.lock(), Mode::Read);
                size_t n = c.count(start, end);
                auto out = new_u64_2d(n, 2);
                auto *ranges = reinterpret_cast<PfnRange *>(out.mutable_data());
                lk.nogil([&] { return c.pfn_ranges(start, end, ranges); });
                return out;
            },
            py::arg("start"), py::arg("end"))
        .def(
            "pfn_batches",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                Guard lk(c.lock(), Mode::Read);
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
                check_page_count(start, end);
                py::array_t<uint64_t> out(py::ssize_t(end - start));
                Guard lk(c.lock(), Mode::Read);
                uint64_t *p = out.mutable_data();
                lk.nogil([&] {
                    c.page_pfns(start, end, p);
                    return 0;
                });
                return out;
            },
            py::arg("start"), py::arg("end"))
        .def("dump",
             [](const FolioCache &c) {
                 Guard lk(c.lock(), Mode::Read);
                 return c.dump();
             })
        .def("__repr__", [](const FolioCache &c) {
            Guard lk(c.lock(), Mode::Read);
            return "<gmem." + first_line(c.dump()) + ">";
        });
}

void bind_clamp(py::module_ &m)
{
    m.def(
        "check_pfn_exhaustive",
        [](py::handle o) {
            unsigned size_order = unsigned(std::min<uint64_t>(to_u64(o, "size_order"), 99));
            PfnCheckReport rep;
            {
                py::gil_scoped_release nogil; // pure C++ on objects it creates itself
                rep = check_pfn_exhaustive(size_order);
            }
            py::dict d;
            d["ok"] = rep.ok;
            d["files"] = rep.files;
            d["layouts"] = rep.layouts;
            d["ranges"] = rep.ranges;
            if (!rep.ok) {
                py::list layout, expected, emitted;
                for (const Folio &f : rep.layout)
                    layout.append(py::make_tuple(f.index, f.order, f.pfn));
                for (const PfnRange &r : rep.expected)
                    expected.append(py::make_tuple(r.start_pfn, r.end_pfn));
                for (const PfnRange &r : rep.emitted)
                    emitted.append(py::make_tuple(r.start_pfn, r.end_pfn));
                d["layout"] = layout;
                d["start"] = rep.start;
                d["end"] = rep.end;
                d["expected"] = expected;
                d["emitted"] = emitted;
                d["what"] = rep.what;
            }
            return d;
        },
        py::arg("size_order"));
    m.def(
        "clamp_folio_ranges",
        [](py::handle i, py::handle o, py::handle p, py::handle s, py::handle e) {
            Columns cols = to_columns(i, o, p, "index", "order", "pfn");
            uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
            check_start_end(start, end);
            size_t n = cols.n;
            const uint64_t *ip = cols.a.data(), *op = cols.b.data(), *pp = cols.c.data();
            size_t first = 0, count = 0;
            {
                // Safe without the GIL: the three arrays are contiguous and referenced here.
                py::gil_scoped_release nogil;
                count = count_clamped(ip, op, n, start, end, &first);
            }
            auto out = new_u64_2d(count, 2);
            auto *ranges = reinterpret_cast<PfnRange *>(out.mutable_data());
            {
                py::gil_scoped_release nogil;
                clamp_folio_ranges(ip, op, pp, n, first, count, start, end, ranges);
            }
            return out;
        },
        py::arg("index"), py::arg("order"), py::arg("pfn"), py::arg("start"), py::arg("end"));
}


/* ---- architecture hooks ---------------------------------------------------------- */

/* What every Python-subclassable arch carries: what was read from the Python object when
 * its file was created, and the first exception a Python hook raised during the current
 * operation (re-raised when the operation completes). */
struct PyHookState {
    virtual ~PyHookState() = default;
    bool configured = false, batched = false;
    unsigned config_bits = 0;
    std::string py_name;
    std::optional<py::error_already_set> pending;
    // The Python overrides of the two range hooks, looked up once per operation rather
    // than once per folio batch.  forget() drops them (GIL held) when the outermost
    // operation ends: a hook that reads its file runs a nested operation, which must not.
    py::object make_shared_fn, free_folio_fn;
    bool make_shared_known = false, free_folio_known = false;
    void forget()
    {
        make_shared_fn = py::object();
        free_folio_fn = py::object();
        make_shared_known = free_folio_known = false;
    }
};

PyHookState *hook_state(Arch &a) { return dynamic_cast<PyHookState *>(&a); }

/* The hooks a Python Arch may override. */
const char *const HOOK_NAMES[] = {"make_private",     "prepare",        "make_shared",
                                  "reclaim",          "free_folio",     "invalidate_range",
                                  "invalidate_start", "invalidate_end", "post_populate"};

/* Config names in both vocabularies: the merged kernel's, and the June 2026 thread's. */
const std::pair<const char *, unsigned> CONFIG_NAMES[] = {
    {"CONVERT", CONFIG_CONVERT},
    {"RECLAIM", CONFIG_RECLAIM}, // the same bit as FREE: config_set() names it by design
    {"INVALIDATE", CONFIG_INVALIDATE},
    {"POPULATE", CONFIG_POPULATE},
    {"PREPARE", CONFIG_PREPARE},
    {"FREE", CONFIG_FREE},
    {"FREE_ON_SHARED_CONVERSION", CONFIG_FREE_ON_SHARED_CONVERSION}};
const char *const CONFIG_ALLOWED =
    "CONVERT, RECLAIM, INVALIDATE, POPULATE (or PREPARE, FREE, FREE_ON_SHARED_CONVERSION)";

unsigned config_bits(py::handle obj)
{
    if (py::isinstance<py::str>(obj) || !py::isinstance<py::iterable>(obj))
        throw py::type_error("config: must be a set of hook names, got " +
                             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    unsigned bits = 0;
    size_t seen = 0;
    for (py::handle item : obj) {
        if (++seen > 64) // an endless iterator would spin here holding the GIL
            throw invalid("config", "more than 64 items; allowed: a set of hook names");
        std::string name = py::isinstance<py::str>(item) ? item.cast<std::string>() : "";
        unsigned bit = 0;
        for (const auto &c : CONFIG_NAMES)
            if (name == c.first)
                bit = c.second;
        if (!bit)
            throw invalid("config", "unknown hook config " + std::string(py::repr(item)) +
                                        "; allowed: " + CONFIG_ALLOWED);
        bits |= bit;
    }
    return bits;
}

/* @bits as names: the merged kernel's vocabulary for @mainline, else the thread's. */
py::set config_set(unsigned bits, bool mainline)
{
    py::set out;
    if (mainline) {
        if ((bits & CONFIG_CONVERT) == CONFIG_CONVERT)
            bits &= ~CONFIG_CONVERT, out.add(py::str("CONVERT"));
        if (bits & CONFIG_RECLAIM)
            bits &= ~CONFIG_RECLAIM, out.add(py::str("RECLAIM"));
    }
    for (const auto &c : CONFIG_NAMES) {
        std::string name = c.first;
        if (name != "CONVERT" && name != "RECLAIM" && (bits & c.second))
            out.add(py::str(c.first)); // the thread's names, one bit each
    }
    return out;
}

/*
 * PyArch - the trampoline that lets a Python subclass of gmem.Arch (or of a built-in
 * model) override hooks.  A hook the subclass does not define falls through to Base.
 * A Python exception in a hook is caught here: the operation cannot stop after its
 * point of no return, so it is recorded as a violation and re-raised at the end.
 */
template <class Base>
class PyArch : public Base, public PyHookState {
public:
    using Base::Base;

    std::string name() const override { return configured ? py_name : base_name(); }
    unsigned config() const override { return configured ? config_bits : Base::config(); }

    // make_private or prepare: a subclass may define either name (make_private first).
    void prepare(GuestMemfd &f, uint64_t index, uint64_t pfn, uint64_t nr) override
    {
        py::gil_scoped_acquire gil;
        py::object fn;
        const char *label = mainline(f) ? "make_private" : "prepare";
        if (Lookup l = lookup(f, label, "make_private", "prepare", fn); l != Lookup::Found) {
            if (l == Lookup::Absent)
                Base::prepare(f, index, pfn, nr);
            return;
        }
        call(f, label, [&] { fn(index, pfn, nr); });
    }
    void make_shared(GuestMemfd &f, const PfnRange *r, size_t n) override
    {
        ranges_hook(f, "make_shared", r, n, [&] { Base::make_shared(f, r, n); });
    }
    // reclaim or free_folio: either name (reclaim first).
    void free_folio(GuestMemfd &f, const PfnRange *r, size_t n) override
    {
        ranges_hook(f, mainline(f) ? "reclaim" : "free_folio", r, n,
                    [&] { Base::free_folio(f, r, n); });
    }
    void post_populate(GuestMemfd &f, uint64_t index, uint64_t pfn, bool has_token,
                       uint64_t token) override
    {
        py::gil_scoped_acquire gil;
        py::object fn;
        if (Lookup l = lookup(f, "post_populate", "post_populate", nullptr, fn);
            l != Lookup::Found) {
            if (l == Lookup::Absent)
                Base::post_populate(f, index, pfn, has_token, token);
            return;
        }
        call(f, "post_populate", [&] {
            fn(index, pfn, has_token ? py::object(py::int_(token)) : py::object(py::none()));
        });
    }
    void invalidate_range(GuestMemfd &f, uint64_t start, uint64_t end, unsigned kinds) override
    {
        py::gil_scoped_acquire gil;
        py::object fn;
        if (Lookup l = lookup(f, "invalidate_range", "invalidate_range", nullptr, fn);
            l != Lookup::Found) {
            if (l == Lookup::Absent)
                Base::invalidate_range(f, start, end, kinds);
            return;
        }
        call(f, "invalidate_range", [&] { fn(start, end, kinds); });
    }
    void invalidate_start(GuestMemfd &f, uint64_t start, uint64_t end, unsigned kinds) override
    {
        py::gil_scoped_acquire gil;
        py::object fn;
        if (Lookup l = lookup(f, "invalidate_start", "invalidate_start", nullptr, fn);
            l != Lookup::Found) {
            if (l == Lookup::Absent)
                Base::invalidate_start(f, start, end, kinds);
            return;
        }
        call(f, "invalidate_start", [&] { fn(start, end, kinds); });
    }
    void invalidate_end(GuestMemfd &f, uint64_t start, uint64_t end) override
    {
        py::gil_scoped_acquire gil;
        py::object fn;
        if (Lookup l = lookup(f, "invalidate_end", "invalidate_end", nullptr, fn);
            l != Lookup::Found) {
            if (l == Lookup::Absent)
                Base::invalidate_end(f, start, end);
            return;
        }
        call(f, "invalidate_end", [&] { fn(start, end); });
    }

private:
    static bool mainline(const GuestMemfd &f) { return f.hook_design() == HookDesign::Mainline; }

    std::string base_name() const
    {
        if constexpr (std::is_same_v<Base, Arch>)
            return "python";
        else
            return Base::name();
    }

    /* Record what a Python hook raised, and keep the first to re-raise at the end. */
    void hook_raised(GuestMemfd &f, const char *hook, py::error_already_set &e)
    {
        std::string what = py::str(e.type().attr("__name__"));
        what += ": " + std::string(py::str(e.value()));
        f.record(Violation{name(), "hook-raised", NO_PFN, NO_PFN,
                           std::string(hook) + " raised " + what});
        if (!pending)
            pending = e;
    }

    template <class Body>
    void call(GuestMemfd &f, const char *hook, Body &&body)
    {
        try {
            body();
        } catch (py::error_already_set &e) {
            hook_raised(f, hook, e);
        } catch (py::builtin_exception &e) { // a conversion pybind11 refused, as TypeError
            e.set_error();
            py::error_already_set err;
            hook_raised(f, hook, err);
        }
    }

    enum class Lookup { Absent, Found, Failed };

    /*
     * The Python override of hook @name, or else of its other name @alias (may be null).
     * Looking it up runs Python (a property, __getattr__) and may find something that
     * cannot be called: either is the hook failing (recorded under @label, re-raised at
     * the end: Failed), never a silent fall-through to Base.
     */
    Lookup lookup(GuestMemfd &f, const char *label, const char *name, const char *alias,
                  py::object &fn)
    {
        const py::detail::type_info *ti = py::detail::get_type_info(typeid(Base));
        py::handle self =
            ti ? py::detail::get_object_handle(static_cast<const Base *>(this), ti) : nullptr;
        if (!self)
            return Lookup::Absent;
        Lookup result = Lookup::Failed;
        call(f, label, [&] {
            for (const char *hook : {name, alias}) {
                if (!hook)
                    break;
                py::object o = self.attr(hook);
                if (!PyCallable_Check(o.ptr()))
                    throw py::type_error(std::string(hook) + " is not callable (it is " +
                                         std::string(py::str(py::type::handle_of(o).attr(
                                             "__name__"))) +
                                         ")");
                if (py::reinterpret_borrow<py::function>(o).is_cpp_function())
                    continue; // the C++ method itself: not overridden under this name
                fn = std::move(o);
                this->contents_touched = true; // Python may write PhysMem: check what it did
                result = Lookup::Found;
                return;
            }
            result = Lookup::Absent;
        });
        return result;
    }

    template <class Fallback>
    void ranges_hook(GuestMemfd &f, const char *hook, const PfnRange *r, size_t n,
                     Fallback &&fallback)
    {
        py::gil_scoped_acquire gil;
        bool ms = hook[0] == 'm';
        py::object &cached = ms ? make_shared_fn : free_folio_fn;
        bool &known = ms ? make_shared_known : free_folio_known;
        if (!known) {
            Lookup l = ms ? lookup(f, hook, "make_shared", nullptr, cached)
                          : lookup(f, hook, "reclaim", "free_folio", cached);
            known = true;
            if (l == Lookup::Failed)
                cached = py::none(); // looked up, failed: deliver nothing this operation
        }
        // Our own reference: a hook may run a nested operation, or replace its override.
        py::object fn = cached;
        if (!fn)
            return fallback();
        if (fn.is_none())
            return;
        if (batched) {
            auto a = new_u64_2d(n, 2);
            std::memcpy(a.mutable_data(), r, n * sizeof(PfnRange));
            call(f, hook, [&] { fn(a); });
            return;
        }
        for (size_t i = 0; i < n; i++)
            call(f, hook, [&] { fn(r[i].start_pfn, r[i].end_pfn); });
    }
};

/*
 * FileRef - the file an Arch serves, for a direct hook call: held by a strong reference,
 * so that nothing the call runs can free it.  A file being closed by its deleter (dropped
 * without close()) has no strong reference left; it is still safe to use from inside its
 * own operation (this thread holds its lock), which is where its hooks run.
 */
struct FileRef {
    std::shared_ptr<GuestMemfd> keep;
    GuestMemfd *file = nullptr;
    GuestMemfd *operator->() const { return file; }
    GuestMemfd &operator*() const { return *file; }
};

FileRef file_of(const Arch &a)
{
    FileRef ref;
    if (a.file) {
        ref.keep = a.file->weak_from_this().lock();
        if (ref.keep || a.file->physmem().lock().held_by_me())
            ref.file = a.file;
    }
    if (!ref.file || ref.file->closed())
        throw invalid("self", "this Arch serves no open file");
    return ref;
}

/* A direct hook call's PFN range: inside the file's PhysMem and not empty. */
void check_hook_pfns(const GuestMemfd &f, uint64_t start_pfn, uint64_t end_pfn,
                     const char *start_name = "start_pfn", const char *end_name = "end_pfn")
{
    const PhysMem &pm = f.physmem();
    if (start_pfn < pm.base_pfn() || start_pfn >= pm.end_pfn())
        throw invalid(start_name, "must be in [" + hex(pm.base_pfn()) + ", " + hex(pm.end_pfn()) +
                                      ") (the file's PhysMem), got " + hex(start_pfn));
    if (end_pfn <= start_pfn || end_pfn > pm.end_pfn())
        throw invalid(end_name, "must be in (" + hex(start_pfn) + ", " + hex(pm.end_pfn()) +
                                    "], got " + hex(end_pfn));
}

/* A direct hook call's range of file pages: not empty, inside the file. */
void check_hook_range(const GuestMemfd &f, uint64_t start, uint64_t end)
{
    if (start >= end)
        throw invalid("start", "must be < end, got start=" + std::to_string(start) +
                                   " end=" + std::to_string(end));
    if (end > f.nr_pages())
        throw invalid("end", "must be <= nr_pages (" + std::to_string(f.nr_pages()) +
                                 "), got " + std::to_string(end));
}

/*
 * The hooks as methods, so that Python can call them directly or through super().  Every
 * argument is converted (which may run Python: __index__) before the file is looked up,
 * and checked before anything changes: a direct call that fails changes nothing.
 */
template <class T, class Cls>
void bind_hook_methods(Cls &cls)
{
    auto prepare = [](T &a, py::handle i, py::handle p, py::handle n) {
        uint64_t index = to_u64(i, "index"), pfn = to_u64(p, "pfn");
        uint64_t nr = to_u64(n, "nr_pages");
        FileRef f = file_of(a);
        Guard lk(f->physmem().lock(), Mode::Write);
        if (index >= f->nr_pages())
            throw invalid("index", "must be < nr_pages (" + std::to_string(f->nr_pages()) +
                                       "), got " + std::to_string(index));
        if (nr == 0 || nr > f->nr_pages() - index)
            throw invalid("nr_pages", "must be in 1.." + std::to_string(f->nr_pages() - index) +
                                          " (the file's end), got " + std::to_string(nr));
        check_hook_pfns(*f, pfn, pfn + nr, "pfn", "nr_pages");
        a.T::prepare(*f, index, pfn, nr);
    };
    auto free_folio = [](T &a, py::handle s, py::handle e) {
        PfnRange r{to_u64(s, "start_pfn"), to_u64(e, "end_pfn")};
        FileRef f = file_of(a);
        Guard lk(f->physmem().lock(), Mode::Write);
        check_hook_pfns(*f, r.start_pfn, r.end_pfn);
        a.T::free_folio(*f, &r, 1);
        a.T::flush(*f); // a direct call is done when it returns
    };
    auto invalidate = [](auto method) {
        return [method](T &a, py::handle s, py::handle e, py::handle k) {
            uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
            uint64_t kinds = to_u64(k, "kinds");
            FileRef f = file_of(a);
            Guard lk(f->physmem().lock(), Mode::Write);
            check_hook_range(*f, start, end);
            if (kinds == 0 || kinds > (FILTER_SHARED | FILTER_PRIVATE))
                throw invalid("kinds", "must be FILTER_SHARED (1), FILTER_PRIVATE (2) or "
                                       "both (3), got " +
                                           std::to_string(kinds));
            method(a, *f, start, end, unsigned(kinds));
        };
    };
    // Each hook under both names: the merged kernel's and the June 2026 thread's.
    cls.def("make_private", prepare, py::arg("index"), py::arg("pfn"), py::arg("nr_pages"))
        .def("prepare", prepare, py::arg("index"), py::arg("pfn"), py::arg("nr_pages"))
        .def("reclaim", free_folio, py::arg("start_pfn"), py::arg("end_pfn"))
        .def("free_folio", free_folio, py::arg("start_pfn"), py::arg("end_pfn"))
        .def(
            "make_shared",
            [](T &a, py::handle s, py::handle e) {
                PfnRange r{to_u64(s, "start_pfn"), to_u64(e, "end_pfn")};
                FileRef f = file_of(a);
                Guard lk(f->physmem().lock(), Mode::Write);
                check_hook_pfns(*f, r.start_pfn, r.end_pfn);
                a.T::make_shared(*f, &r, 1);
                a.T::flush(*f);
            },
            py::arg("start_pfn"), py::arg("end_pfn"))
        // T:: calls the model's own hook, not a Python override of it (no recursion).
        .def("invalidate_start",
             invalidate([](T &a, GuestMemfd &f, uint64_t s, uint64_t e, unsigned k) {
                 a.T::invalidate_start(f, s, e, k);
             }),
             py::arg("start"), py::arg("end"), py::arg("kinds"))
        .def("invalidate_range",
             invalidate([](T &a, GuestMemfd &f, uint64_t s, uint64_t e, unsigned k) {
                 a.T::invalidate_range(f, s, e, k);
             }),
             py::arg("start"), py::arg("end"), py::arg("kinds"))
        .def(
            "post_populate",
            [](T &a, py::handle i, py::handle p, py::handle t) {
                uint64_t index = to_u64(i, "index"), pfn = to_u64(p, "pfn");
                bool has_token = !t.is_none();
                uint64_t token = has_token ? to_u64(t, "token") : 0;
                FileRef f = file_of(a);
                Guard lk(f->physmem().lock(), Mode::Write);
                f->check_index(index);
                check_hook_pfns(*f, pfn, pfn + 1, "pfn", "pfn");
                a.T::post_populate(*f, index, pfn, has_token, token);
            },
            py::arg("index"), py::arg("pfn"), py::arg("token") = py::none())
        .def(
            "invalidate_end",
            [](T &a, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                FileRef f = file_of(a);
                Guard lk(f->physmem().lock(), Mode::Write);
                check_hook_range(*f, start, end);
                a.T::invalidate_end(*f, start, end);
            },
            py::arg("start"), py::arg("end"));
}

py::tuple call_tuple(const HookCall &c)
{
    std::string hook = c.hook;
    if (hook == "post_populate")
        return py::make_tuple(c.hook, c.a, c.b,
                              c.c == NO_PFN ? py::object(py::none()) : py::object(py::int_(c.c)));
    if (hook == "prepare" || hook == "make_private" || hook == "invalidate_start" ||
        hook == "invalidate_range")
        return py::make_tuple(c.hook, c.a, c.b, c.c);
    return py::make_tuple(c.hook, c.a, c.b);
}

void bind_arch(py::module_ &m)
{
    py::class_<Violation>(m, "Violation")
        .def_readonly("arch", &Violation::arch)
        .def_readonly("rule", &Violation::rule)
        .def_property_readonly("index",
                               [](const Violation &v) -> py::object {
                                   if (v.index == NO_PFN)
                                       return py::none();
                                   return py::int_(v.index);
                               })
        .def_property_readonly("pfn",
                               [](const Violation &v) -> py::object {
                                   if (v.pfn == NO_PFN)
                                       return py::none();
                                   return py::int_(v.pfn);
                               })
        .def_readonly("detail", &Violation::detail)
        .def("__str__", &Violation::str)
        .def("__eq__",
             [](const Violation &a, py::handle other) -> py::object {
                 if (!py::isinstance<Violation>(other)) // None, or another type: not equal
                     return py::reinterpret_borrow<py::object>(Py_NotImplemented);
                 const Violation &b = other.cast<const Violation &>();
                 return py::bool_(a.arch == b.arch && a.rule == b.rule && a.index == b.index &&
                                  a.pfn == b.pfn && a.detail == b.detail);
             })
        .def("__hash__", [](const Violation &v) { return py::hash(py::str(v.str())); })
        .def("__repr__", [](const Violation &v) { return "<gmem.Violation " + v.str() + ">"; });

    py::class_<Arch, PyArch<Arch>, std::shared_ptr<Arch>> arch(m, "Arch");
    arch.def(py::init<>())
        .def_property_readonly("config", [](Arch &a) { return config_set(a.config(), false); })
        .def_property_readonly("name", &Arch::name)
        // A strong reference, or None: a file dropped without close() is closed by its
        // deleter when nothing can own it any more; its hooks then see no file.
        .def_property_readonly("file",
                               [](const Arch &a) -> py::object {
                                   std::shared_ptr<GuestMemfd> f;
                                   if (a.file)
                                       f = a.file->weak_from_this().lock();
                                   if (!f)
                                       return py::none();
                                   return py::cast(f);
                               })
        .def_property_readonly("stats", [](const Arch &a) {
            std::shared_ptr<GuestMemfd> f;
            if (a.file)
                f = a.file->weak_from_this().lock();
            if (!f)
                return a.stats();
            Guard lk(f->physmem().lock(), Mode::Read);
            return a.stats();
        });
    arch.attr("batched") = false;
    bind_hook_methods<Arch>(arch);

    py::module_ &sub = m; // re-exported by gmem/arch.py
    py::class_<SwProtected, Arch, PyArch<SwProtected>, std::shared_ptr<SwProtected>> sw(
        sub, "SwProtected");
    sw.def(py::init<>());
    bind_hook_methods<SwProtected>(sw);
    py::class_<SNP, Arch, PyArch<SNP>, std::shared_ptr<SNP>> snp(sub, "SNP");
    snp.def(py::init<>());
    bind_hook_methods<SNP>(snp);
    py::class_<TDX, Arch, PyArch<TDX>, std::shared_ptr<TDX>> tdx(sub, "TDX");
    tdx.def(py::init<>());
    bind_hook_methods<TDX>(tdx);
    py::class_<PKVM, Arch, PyArch<PKVM>, std::shared_ptr<PKVM>> pkvm(sub, "PKVM");
    pkvm.def(py::init<>());
    bind_hook_methods<PKVM>(pkvm);
    py::class_<Recorder, Arch, PyArch<Recorder>, std::shared_ptr<Recorder>> rec(sub, "Recorder");
    rec.def(py::init([](py::handle config) { return new Recorder(config_bits(config)); },
                     [](py::handle config) { return new PyArch<Recorder>(config_bits(config)); }),
            py::arg("config") = py::set())
        .def_property_readonly("calls",
                               [](const Recorder &r) {
                                   py::list out;
                                   for (const HookCall &c : r.calls())
                                       out.append(call_tuple(c));
                                   return out;
                               })
        .def(
            "ranges",
            [](const Recorder &r, const std::string &hook) {
                std::vector<HookCall> calls = r.calls();
                size_t n = 0;
                for (const HookCall &c : calls)
                    n += hook == c.hook;
                auto out = new_u64_2d(n, 2);
                uint64_t *p = out.mutable_data();
                for (const HookCall &c : calls)
                    if (hook == c.hook) {
                        *p++ = c.a;
                        *p++ = c.b;
                    }
                return out;
            },
            py::arg("hook"))
        .def("clear", [](Recorder &r) { r.clear(); });
    bind_hook_methods<Recorder>(rec);
}

/* ---- GuestMemfd --------------------------------------------------------------- */

std::shared_ptr<Arch> make_arch(py::handle obj)
{
    if (py::isinstance<py::str>(obj)) {
        std::string name = obj.cast<std::string>();
        if (name == "sw_protected")
            return std::make_shared<SwProtected>();
        if (name == "snp")
            return std::make_shared<SNP>();
        if (name == "tdx")
            return std::make_shared<TDX>();
        if (name == "pkvm")
            return std::make_shared<PKVM>();
        throw invalid("arch", "unknown arch '" + name +
                                  "'; allowed: sw_protected, snp, tdx, pkvm, or a gmem.Arch");
    }
    if (!py::isinstance<Arch>(obj))
        throw py::type_error("arch: must be a name or a gmem.Arch, got " +
                             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    if (!gmem_detail::initialised(obj))
        throw py::type_error("arch: this " +
                             std::string(py::str(py::type::handle_of(obj).attr("__name__"))) +
                             " was never initialised (made with __new__ and no __init__)");
    auto arch = obj.cast<std::shared_ptr<Arch>>();
    if (arch->file)
        throw invalid("arch", "this Arch already serves another file; create one per file");
    return arch;
}

/* Read attribute @name of a Python arch; what reading it raises is a TypeError naming it. */
py::object arch_attr(py::handle obj, const char *name)
{
    try {
        return obj.attr(name);
    } catch (py::error_already_set &e) {
        throw py::type_error(std::string(name) + ": reading it raised " +
                             std::string(py::str(e.type().attr("__name__"))) + ": " +
                             std::string(py::str(e.value())));
    }
}

/*
 * ArchConfig - what a Python arch's class says, read and checked when its file is created
 * (config, batched, every hook callable), and applied only once the file's own arguments
 * are known good: a GuestMemfd() that fails leaves its arch as it was.
 */
struct ArchConfig {
    PyHookState *hs = nullptr;
    unsigned bits = 0;
    bool batched = false;
    std::string name;

    explicit ArchConfig(Arch &arch, py::handle obj) : hs(hook_state(arch))
    {
        if (!hs)
            return;
        bits = config_bits(arch_attr(obj, "config"));
        py::object b = arch_attr(obj, "batched");
        if (!py::isinstance<py::bool_>(b) && !py::isinstance<py::int_>(b))
            throw py::type_error("batched: must be a bool, got " +
                                 std::string(py::str(py::type::handle_of(b).attr("__name__"))));
        batched = PyObject_IsTrue(b.ptr()) == 1;
        for (const char *hook : HOOK_NAMES) {
            py::object fn = arch_attr(obj, hook);
            if (!PyCallable_Check(fn.ptr()))
                throw py::type_error(std::string(hook) + ": must be a method, got " +
                                     std::string(py::str(py::type::handle_of(fn).attr(
                                         "__name__"))));
        }
        name = py::str(py::type::handle_of(obj).attr("__name__"));
    }
    /// Configure the arch; returns an undo for a file that fails to be created after all.
    std::function<void()> apply()
    {
        if (!hs)
            return [] {};
        PyHookState *h = hs;
        auto undo = [h, bits = h->config_bits, batched = h->batched, name = h->py_name,
                     configured = h->configured] {
            h->config_bits = bits;
            h->batched = batched;
            h->py_name = name;
            h->configured = configured;
        };
        hs->config_bits = bits;
        hs->batched = batched;
        hs->py_name = name;
        hs->configured = true;
        return undo;
    }
};

/*
 * file_op - run one GuestMemfd operation under the model lock.  A changing operation
 * marks the file busy so that its own hooks may read it but not change it; with a
 * built-in (C++) arch a long one runs without the GIL.  With a Python arch the GIL is
 * kept: its hooks need it anyway.  A Python hook's exception is re-raised at the end.
 */
template <class Fn>
auto file_op(GuestMemfd &f, Mode mode, bool long_op, Fn &&fn)
{
    // An operation on a file from one of that file's own hooks is nested: the outer
    // operation owns the hook state and re-raises what its hooks raised.  (An operation
    // on another file of the same PhysMem, from a hook, is that file's own outermost one.)
    bool inside = f.physmem().lock().held_by_me(); // in an operation of this PhysMem
    bool nested = inside && f.in_operation();
    Guard g(f.physmem().lock(), mode);
    PyHookState *py_arch = hook_state(f.arch());
    PyHookState *hs = nested ? nullptr : py_arch;
    if (mode == Mode::Write && f.in_operation())
        throw Reentrant("an arch hook may read the file it serves, not change it");
    // The busy mark is set and cleared inside the locked region: nogil() gives the lock
    // back as soon as the body returns, and the next thread must not see a stale mark.
    auto body = [&] {
        struct Busy {
            GuestMemfd *f;
            ~Busy()
            {
                if (f)
                    f->set_in_operation(false);
            }
        } busy{mode == Mode::Write ? &f : nullptr};
        if (busy.f)
            f.set_in_operation(true);
        return fn();
    };
    // Python hooks need the GIL anyway; an operation inside another keeps what it holds.
    bool keep_gil = inside || !long_op || py_arch;
    try {
        auto result = keep_gil ? body() : g.nogil(body);
        if (hs) {
            hs->forget();
            if (hs->pending) {
                py::error_already_set e = std::move(*hs->pending);
                hs->pending.reset();
                throw e;
            }
        }
        return result;
    } catch (...) {
        if (hs) {
            hs->forget();
            hs->pending.reset();
        }
        throw;
    }
}

py::array folio_info_rows(const std::vector<FolioInfo> &infos)
{
    py::array_t<FolioRow> out(py::ssize_t(infos.size()));
    FolioRow *row = out.mutable_data();
    for (const FolioInfo &fi : infos)
        *row++ = FolioRow{fi.folio.index, uint8_t(fi.folio.order), fi.folio.pfn, fi.pins,
                          fi.mapped, fi.folio.uptodate};
    return std::move(out);
}

py::dict stats_dict(const GmemStats &s)
{
    py::dict d;
    for (const auto &kv : s.items())
        d[kv.first] = kv.second;
    return d;
}

/*
 * The deleter of every file Python creates: dropping the last reference to an open file
 * warns (ResourceWarning, like an unclosed Python file) and closes it, so its folios go
 * through the free hook while its Python arch is still alive.  Errors here cannot
 * propagate; they go to sys.unraisablehook as they would from __del__.
 */
void close_unclosed(GuestMemfd *f) noexcept
{
    if (!f->closed()) {
        py::gil_scoped_acquire gil;
        if (PyErr_WarnEx(PyExc_ResourceWarning,
                         "unclosed gmem.GuestMemfd: closing it frees its folios through the "
                         "free hook",
                         1) < 0)
            PyErr_WriteUnraisable(nullptr);
        try {
            file_op(*f, Mode::Write, false, [&] {
                f->close();
                return 0;
            });
        } catch (py::error_already_set &e) {
            e.discard_as_unraisable("closing an unclosed gmem.GuestMemfd");
        } catch (...) {
        }
    }
    delete f;
}

using GuestMemfdClass = py::class_<GuestMemfd, std::shared_ptr<GuestMemfd>>;

/* Bind a file operation whose arguments are all u64, named @names, run by file_op(). */
template <class R, class... A, size_t... I>
void def_file_op(GuestMemfdClass &cls, const char *name, R (GuestMemfd::*method)(A...),
                 std::array<const char *, sizeof...(A)> names, bool long_op,
                 std::index_sequence<I...>)
{
    cls.def(
        name,
        [method, names, long_op](GuestMemfd &f, std::conditional_t<true, py::handle, A>... args) {
            const uint64_t v[] = {to_u64(args, names[I])...}; // converted left to right
            if constexpr (std::is_void_v<R>) {
                file_op(f, Mode::Write, long_op, [&] {
                    (f.*method)(A(v[I])...);
                    return 0;
                });
            } else {
                return file_op(f, Mode::Write, long_op, [&] { return (f.*method)(A(v[I])...); });
            }
        },
        py::arg(names[I])...);
}

template <class R, class... A>
void def_file_op(GuestMemfdClass &cls, const char *name, R (GuestMemfd::*method)(A...),
                 std::array<const char *, sizeof...(A)> names, bool long_op = false)
{
    def_file_op(cls, name, method, names, long_op, std::index_sequence_for<A...>{});
}

void bind_guest_memfd(py::module_ &m)
{
    using GM = GuestMemfd;
    GuestMemfdClass cls(m, "GuestMemfd");
    def_file_op(cls, "fallocate", &GM::fallocate, {"start", "end"}, true);
    def_file_op(cls, "punch_hole", &GM::punch_hole, {"start", "end"}, true);
    def_file_op(cls, "set_attributes", &GM::set_attributes, {"start", "end", "attrs"}, true);
    def_file_op(cls, "host_fault", &GM::host_fault, {"index"});
    def_file_op(cls, "guest_read", &GM::guest_read, {"index"});
    def_file_op(cls, "guest_write", &GM::guest_write, {"index", "token"});
    def_file_op(cls, "host_read", &GM::host_read, {"index"});
    def_file_op(cls, "host_write", &GM::host_write, {"index", "token"});
    def_file_op(cls, "pin", &GM::pin, {"index"});
    def_file_op(cls, "unpin", &GM::unpin, {"index"});
    def_file_op(cls, "unpin_pfn", &GM::unpin_pfn, {"pfn"});
    def_file_op(cls, "memory_failure", &GM::memory_failure, {"index"});
    cls.def(
        "populate",
        [](GM &f, py::handle i, py::handle t) {
            uint64_t index = to_u64(i, "index");
            bool has_token = !t.is_none();
            uint64_t token = has_token ? to_u64(t, "token") : 0;
            file_op(f, Mode::Write, false, [&] {
                f.populate(index, has_token, token);
                return 0;
            });
        },
        py::arg("index"), py::arg("token") = py::none());
    cls.def(py::init([](py::handle size, py::handle flags, py::handle folio_order,
                        py::handle physmem, py::handle arch, py::handle hook_design) {
                uint64_t sz = to_u64(size, "size_bytes"), fl = to_u64(flags, "flags");
                unsigned order = to_order(folio_order, "folio_order");
                std::shared_ptr<PhysMem> pm;
                if (!physmem.is_none()) {
                    if (!py::isinstance<PhysMem>(physmem))
                        throw py::type_error("physmem: must be a gmem.PhysMem or None");
                    if (!gmem_detail::initialised(physmem))
                        throw py::type_error("physmem: this PhysMem was never initialised");
                    pm = physmem.cast<std::shared_ptr<PhysMem>>();
                }
                if (!py::isinstance<py::str>(hook_design))
                    throw py::type_error(
                        "hook_design: must be 'mainline', 'split' or 'overloaded'");
                std::string name = hook_design.cast<std::string>();
                HookDesign design;
                if (name == "mainline")
                    design = HookDesign::Mainline;
                else if (name == "split")
                    design = HookDesign::Split;
                else if (name == "overloaded")
                    design = HookDesign::Overloaded;
                else
                    throw invalid("hook_design",
                                  "must be 'mainline', 'split' or 'overloaded', got '" + name +
                                      "'");
                std::shared_ptr<Arch> a = make_arch(arch);
                ArchConfig cfg(*a, arch);
                std::unique_ptr<Guard> g;
                if (pm)
                    g = std::make_unique<Guard>(pm->lock(), Mode::Write);
                std::function<void()> undo = cfg.apply();
                GM *file;
                try {
                    file = new GM(sz, fl, order, pm, a, design);
                } catch (...) {
                    undo();
                    throw;
                }
                return std::shared_ptr<GM>(file, close_unclosed);
            }),
            py::arg("size_bytes"), py::kw_only(), py::arg("flags") = 0,
            py::arg("folio_order") = 0, py::arg("physmem") = py::none(),
            py::arg("arch") = "sw_protected", py::arg("hook_design") = "mainline",
            py::keep_alive<1, 6>())
        .def_property_readonly("size", &GM::size)
        .def_property_readonly("nr_pages", &GM::nr_pages)
        .def_property_readonly("flags", &GM::flags)
        .def_property_readonly("folio_order", &GM::folio_order)
        .def_property_readonly("closed", &GM::closed)
        .def_property_readonly("hook_design",
                               [](const GM &f) { return design_name(f.hook_design()); })
        .def_property_readonly("config",
                               [](const GM &f) {
                                   return config_set(f.config(),
                                                     f.hook_design() == HookDesign::Mainline);
                               })
        .def_property_readonly("arch", [](const GM &f) { return f.arch_ptr(); })
        .def_property_readonly("physmem", [](const GM &f) { return f.physmem_ptr(); })
        .def_property_readonly("stats",
                               [](GM &f) {
                                   return stats_dict(
                                       file_op(f, Mode::Read, false, [&] { return f.stats(); }));
                               })
        .def("close",
             [](GM &f) {
                 file_op(f, Mode::Write, true, [&] {
                     f.close();
                     return 0;
                 });
             })
        .def("__enter__",
             [](py::object self) {
                 self.cast<GM &>(); // refuses an uninitialised file, as every method does
                 return self;
             })
        .def("__exit__",
             [](GM &f, py::handle, py::handle, py::handle) {
                 file_op(f, Mode::Write, true, [&] {
                     f.close();
                     return 0;
                 });
                 return false;
             })
        .def(
            "add_folio",
            [](GM &f, py::handle i, py::handle o, py::handle p) {
                uint64_t index = to_u64(i, "index"), pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                file_op(f, Mode::Write, false, [&] {
                    f.add_folio(index, order, pfn);
                    return 0;
                });
            },
            py::arg("index"), py::arg("order"), py::arg("pfn"))
        .def(
            "get_pfn",
            [](GM &f, py::handle i) {
                uint64_t index = to_u64(i, "index");
                auto r = file_op(f, Mode::Write, false, [&] { return f.get_pfn(index); });
                return py::make_tuple(r.first, r.second);
            },
            py::arg("index"))
        .def(
            "set_memory_attributes2",
            [](GM &f, py::handle o, py::handle s, py::handle a, py::handle fl) {
                uint64_t offset = to_u64(o, "offset"), size = to_u64(s, "size");
                uint64_t attributes = to_u64(a, "attributes"), flags = to_u64(fl, "flags");
                file_op(f, Mode::Write, true, [&] {
                    f.set_memory_attributes2(offset, size, attributes, flags);
                    return 0;
                });
            },
            py::arg("offset"), py::arg("size"), py::arg("attributes"), py::arg("flags") = 0)
        .def(
            "get_attributes",
            [](GM &f, py::handle i) {
                uint64_t index = to_u64(i, "index");
                return file_op(f, Mode::Read, false, [&] {
                    f.check_open();
                    return f.get_attributes(index);
                });
            },
            py::arg("index"))
        .def(
            "attribute_runs",
            [](GM &f, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, f.nr_pages());
                check_query(f, start, end);
                auto runs = file_op(f, Mode::Read, false, [&] {
                    f.check_open();
                    return f.attrs().runs(start, end);
                });
                auto out = new_u64_2d(runs.size(), 3);
                if (!runs.empty()) // memcpy from a null pointer is undefined, even of 0 bytes
                    std::memcpy(out.mutable_data(), runs.data(), runs.size() * sizeof(Run));
                return out;
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "folios",
            [](GM &f, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, f.nr_pages());
                check_query(f, start, end);
                return folio_info_rows(file_op(f, Mode::Read, false, [&] {
                    f.check_open();
                    return f.folios(start, end);
                }));
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "pfn_ranges",
            [](GM &f, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_query(f, start, end);
                Guard lk(f.physmem().lock(), Mode::Read);
                f.check_open();
                size_t n = f.cache().count(start, end);
                auto out = new_u64_2d(n, 2);
                auto *ranges = reinterpret_cast<PfnRange *>(out.mutable_data());
                lk.nogil([&] { return f.cache().pfn_ranges(start, end, ranges); });
                return out;
            },
            py::arg("start"), py::arg("end"))
        .def(
            "page_pfns",
            [](GM &f, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_query(f, start, end);
                check_page_count(start, end);
                py::array_t<uint64_t> out(py::ssize_t(end - start));
                uint64_t *p = out.mutable_data();
                Guard lk(f.physmem().lock(), Mode::Read);
                f.check_open();
                lk.nogil([&] {
                    f.cache().page_pfns(start, end, p);
                    return 0;
                });
                return out;
            },
            py::arg("start"), py::arg("end"))
        .def("check",
             [](GM &f) { return file_op(f, Mode::Read, true, [&] { return f.check(); }); })
        .def("dump", [](GM &f) { return file_op(f, Mode::Read, false, [&] { return f.dump(); }); })
        .def("__repr__", [](GM &f) {
            return "<gmem." + first_line(file_op(f, Mode::Read, false, [&] { return f.dump(); })) +
                   ">";
        });
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
    bind_arch(m);
    bind_guest_memfd(m);
    m.attr("GARBLED") = py::int_(GARBLED);
    // __init__ on a live object would re-point it while its holder keeps the old one.
    for (const char *name : {"IntervalMap", "PhysMem", "FolioCache", "GuestMemfd", "Arch",
                             "SwProtected", "SNP", "TDX", "PKVM", "Recorder"}) {
        py::object cls = m.attr(name);
        py::object init = cls.attr("__init__");
        cls.attr("__init__") = py::cpp_function(
            [init](py::handle self, py::args args, py::kwargs kwargs) {
                if (gmem_detail::initialised(self))
                    throw py::type_error(
                        std::string(py::str(py::type::handle_of(self).attr("__name__"))) +
                        ": __init__ called on an object that is already initialised");
                init(self, *args, **kwargs);
            },
            py::name("__init__ (checked)"), py::is_method(cls));
    }
    m.attr("PRIVATE") = ATTR_PRIVATE;
}
