// SPDX-License-Identifier: MIT
// arch_state.hpp - what the Arch bindings and the GuestMemfd bindings share about a Python
// arch: the state read from it at file creation, and the hook config names.
#pragma once

#include <cstddef>
#include <typeinfo>

#include "common.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {

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

/*
 * The PyHookState of an arch whose hooks may be Python methods (a PyArch), or null for a
 * built-in model.  Every file operation asks, so the answer - null, or where the
 * PyHookState lies inside the object - is kept per dynamic type in a few slots of this
 * thread: a cross dynamic_cast costs more than the rest of a small operation's binding.
 */
inline PyHookState *hook_state(Arch &a)
{
    struct Slot {
        const std::type_info *type;
        bool python;
        std::ptrdiff_t offset;
    };
    static thread_local Slot slots[4] = {};
    static thread_local unsigned next = 0;
    const std::type_info *type = &typeid(a);
    for (const Slot &s : slots)
        if (s.type == type)
            return s.python ? reinterpret_cast<PyHookState *>(reinterpret_cast<char *>(&a) +
                                                              s.offset)
                            : nullptr;
    PyHookState *hs = dynamic_cast<PyHookState *>(&a);
    slots[next++ % 4] = Slot{type, hs != nullptr,
                             hs ? reinterpret_cast<char *>(hs) - reinterpret_cast<char *>(&a) : 0};
    return hs;
}

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

inline unsigned config_bits(py::handle obj)
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
inline py::set config_set(unsigned bits, bool mainline)
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

} // namespace gmem_bind
