// SPDX-License-Identifier: MIT
// common.hpp - what every register_<area>.cpp of the gmem._core extension shares: argument
// conversion (each error names its argument), the caster that refuses objects never
// initialised, and the Guard that takes a model lock for one bound call.
//
// Locking and the GIL: every core object carries a ModelLock (lockable.hpp); a
// GuestMemfd uses its PhysMem's.  A call first tries the lock while holding the GIL and,
// only if that fails, drops the GIL to wait for it (Guard).  A long loop then drops the
// GIL while holding the lock (Guard::nogil), and gives the lock back *before* it takes
// the GIL again.  So no thread ever waits for the GIL while holding a model lock, or for
// a model lock while holding the GIL, and the two cannot deadlock - even when a Python
// arch hook, running under the model lock, lets another Python thread run.
#pragma once

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


/*
 * Objects made with Cls.__new__(Cls) and never initialised: pybind11 would hand their
 * methods uninitialised memory.  Every gmem class is loaded as `self` through this
 * caster, which refuses such an object with a TypeError first.
 */
namespace gmem_detail __attribute__((visibility("hidden"))) {
inline bool initialised(py::handle h)
{
    // The C-level type check: isinstance() would look up __instancecheck__ (a bound method
    // made and dropped on every call) and believe a faked __class__.
    static PyTypeObject *const base = reinterpret_cast<PyTypeObject *>(
        py::detail::get_internals().instance_base);
    if (!PyObject_TypeCheck(h.ptr(), base))
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

namespace gmem_bind __attribute__((visibility("hidden"))) {
using namespace gmem;


using u64_array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

/* An integer argument (anything with __index__) as u64: TypeError or ValueError naming it. */
inline uint64_t to_u64(py::handle h, const char *name)
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

inline uint64_t to_end(py::handle h, uint64_t none_value, const char *name = "end")
{
    return h.is_none() ? none_value : to_u64(h, name);
}

inline double to_double(py::handle h, const char *name)
{
    double v = PyFloat_AsDouble(h.ptr()); // takes __float__ and __index__, refuses str
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw py::type_error(std::string(name) + ": must be a number, got " +
                             std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    }
    return v;
}

inline unsigned to_order(py::handle h, const char *name = "order")
{
    uint64_t v = to_u64(h, name);
    if (v > MAX_ORDER)
        throw invalid(name, "must be in 0..18, got " + std::to_string(v));
    return unsigned(v);
}

inline void check_start_end(uint64_t start, uint64_t end)
{
    if (start > end)
        throw invalid("start", "must be <= end, got start=" + std::to_string(start) +
                                   " end=" + std::to_string(end));
}

/* A query range of a file: start <= end <= nr_pages (empty ranges answer empty). */
inline void check_query(const GuestMemfd &f, uint64_t start, uint64_t end)
{
    check_start_end(start, end);
    if (end > f.nr_pages())
        throw invalid("end", "must be <= nr_pages (" + std::to_string(f.nr_pages()) +
                                 "), got " + std::to_string(end));
}

/* A page_pfns answer of end - start entries must fit in the host's memory. */
inline void check_page_count(uint64_t start, uint64_t end)
{
    uint64_t n = end - start;
    if (n > SMALL_REQUEST / sizeof(uint64_t) && n > host_memory_available() / sizeof(uint64_t))
        throw invalid("end", "[" + std::to_string(start) + ", " + std::to_string(end) +
                                 ") is " + std::to_string(end - start) +
                                 " pages: one PFN each is more than the host has available");
}

/* A 1-D array of non-negative integers (or anything numpy turns into one) as u64. */
inline u64_array to_u64_array(py::handle obj, const char *name)
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

/*
 * A bulk call's 1-D array-like of integers as contiguous u64, each value converted as
 * to_u64() converts one argument: numpy integer and bool arrays at C speed (an int64 array
 * with no negative value is reinterpreted, not copied), anything else numpy makes an
 * object array of (Python ints too large for int64, objects with __index__) element by
 * element.  Errors name the argument and the position; nothing else is accepted.
 */
inline u64_array to_index_array(py::handle obj, const char *name)
{
    py::object numpy = py::module_::import("numpy");
    py::array a;
    try {
        a = numpy.attr("asarray")(obj);
        // numpy makes a list of Python ints float64 when one of them does not fit int64
        // ([1, 2**63]): a sequence that is no integer array goes element by element.
        char k = a.dtype().kind();
        if (!py::isinstance<py::array>(obj) && a.size() > 0 && k != 'i' && k != 'u' && k != 'b')
            a = numpy.attr("asarray")(obj, py::arg("dtype") = py::dtype("O"));
    } catch (py::error_already_set &e) {
        if (!e.matches(PyExc_ValueError) && !e.matches(PyExc_TypeError))
            throw;
        throw py::type_error(std::string(name) + ": must be a 1-D array of integers (" +
                             std::string(py::str(e.value())) + ")");
    }
    if (a.ndim() != 1)
        throw invalid(name, "must be a 1-D array, got " + std::to_string(a.ndim()) + " dims");
    char kind = a.dtype().kind();
    if (a.size() == 0)
        return u64_array(0);
    if (kind == 'i') {
        auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
        const int64_t *p = s.data();
        for (py::ssize_t i = 0; i < s.size(); i++)
            if (p[i] < 0)
                throw invalid(name, "must be >= 0, got " + std::to_string(p[i]) +
                                        " at position " + std::to_string(i));
        return u64_array::ensure(s.attr("view")(numpy.attr("uint64")));
    }
    if (kind == 'u' || kind == 'b')
        return u64_array::ensure(kind == 'b' ? a.attr("astype")(numpy.attr("uint64")) : a);
    if (kind != 'O')
        throw py::type_error(std::string(name) + ": must hold integers, got dtype " +
                             std::string(py::str(a.dtype())));
    u64_array out(a.size());
    uint64_t *o = out.mutable_data();
    py::ssize_t i = 0;
    for (py::handle item : a.attr("tolist")()) {
        try {
            o[i] = to_u64(item, name);
        } catch (py::type_error &e) {
            throw py::type_error(std::string(e.what()) + " at position " + std::to_string(i));
        } catch (InvalidArgument &e) {
            throw InvalidArgument(std::string(e.what()) + " at position " + std::to_string(i));
        }
        i++;
    }
    return out;
}

/* Three parallel 1-D arrays of one length, as u64: (starts, ends, values) or (index, order,
 * pfn).  A length mismatch is a ValueError naming the second array. */
struct Columns {
    u64_array a, b, c;
    size_t n;
};

inline Columns to_columns(py::handle a, py::handle b, py::handle c, const char *na, const char *nb,
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

inline WaitGraph &wait_graph()
{
    static WaitGraph *g = new WaitGraph; // never destroyed: threads may outlive statics
    return *g;
}

/* How many model locks this thread holds exclusively (through Guards). */
inline thread_local unsigned held_exclusive = 0;

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

inline py::array_t<uint64_t> new_u64_2d(size_t rows, size_t cols)
{
    return py::array_t<uint64_t>({py::ssize_t(rows), py::ssize_t(cols)});
}

/* The runs of a per-PFN map, in absolute PFNs. */
struct FolioRow {
    uint64_t index;
    uint8_t order;
    uint64_t pfn;
    uint32_t pins;
    uint32_t mapped;
    bool uptodate;
};

inline py::array folio_rows(const std::vector<Folio> &folios)
{
    py::array_t<FolioRow> out(py::ssize_t(folios.size()));
    FolioRow *row = out.mutable_data();
    for (const Folio &f : folios)
        *row++ = FolioRow{f.index, uint8_t(f.order), f.pfn, 0, 0, f.uptodate};
    return std::move(out);
}

/*
 * OutRows - a caller's buffer for a walk (pfn_ranges(..., out=)): a writable, C-contiguous
 * (m, 2) uint64 array, checked before the walk; rows(n) checks that it has room for the n
 * ranges the walk will write (errors name `out`), and answer(n) is the view of those rows.
 * A walk that walks repeatedly reuses one buffer instead of fresh pages every call.
 */
struct OutRows {
    py::array_t<uint64_t> array;

    explicit OutRows(py::handle out)
    {
        if (!py::isinstance<py::array>(out))
            throw py::type_error("out: must be a numpy array of uint64 with shape (n, 2), got " +
                                 std::string(py::str(py::type::handle_of(out).attr("__name__"))));
        py::array a = py::reinterpret_borrow<py::array>(out);
        if (!py::isinstance<py::array_t<uint64_t>>(a))
            throw py::type_error("out: must have dtype uint64, got " +
                                 std::string(py::str(a.dtype())));
        if (a.ndim() != 2 || a.shape(1) != 2)
            throw invalid("out", "must have shape (n, 2), got " +
                                     std::string(py::str(a.attr("shape"))));
        if (!(a.flags() & py::array::c_style))
            throw invalid("out", "must be C-contiguous (np.empty((n, 2), np.uint64) is)");
        if (!a.writeable())
            throw invalid("out", "must be writable (this array is read-only)");
        array = py::reinterpret_borrow<py::array_t<uint64_t>>(a);
    }
    PfnRange *rows(size_t n)
    {
        if (size_t(array.shape(0)) < n)
            throw invalid("out", "has room for " + std::to_string(array.shape(0)) +
                                     " ranges, the walk needs " + std::to_string(n));
        return reinterpret_cast<PfnRange *>(array.mutable_data());
    }
    py::object answer(size_t n) const
    {
        return array[py::slice(0, static_cast<py::ssize_t>(n), 1)];
    }
};

/*
 * The Python exception pybind11 raises for the C++ exception in flight, through the
 * module's registered translators, as an error_already_set; call it from a catch block.
 * (A bound function that rethrows it: every pybind11 version translates that way.)
 */
inline py::error_already_set python_error_of_current_exception()
{
    std::exception_ptr p = std::current_exception();
    try {
        py::cpp_function([p] { std::rethrow_exception(p); })();
    } catch (py::error_already_set &e) {
        return e;
    }
    throw std::logic_error("python_error_of_current_exception: nothing was raised");
}

inline std::string first_line(const std::string &s) { return s.substr(0, s.find('\n')); }

void register_interval_map(py::module_ &m);
void register_physmem(py::module_ &m);
void register_folio_cache(py::module_ &m);
void register_clamp(py::module_ &m);
void register_arch(py::module_ &m);
void register_guest_memfd(py::module_ &m);

} // namespace gmem_bind
