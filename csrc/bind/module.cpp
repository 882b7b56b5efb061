// SPDX-License-Identifier: MIT
// module.cpp - the gmem._core extension: converts Python values to and from the C++ core in
// csrc/gmem/ and nothing else.  One register_<area>() per wrapped area, each in its own
// file (common.hpp says how locking and the GIL work); here, the errors and the module.
#include "common.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {
namespace {

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

} // namespace
} // namespace gmem_bind

PYBIND11_MODULE(_core, m)
{
    m.doc() = "gmem C++ engine (private; use the gmem package)";
    using namespace gmem_bind;
    bind_errors(m);
    register_interval_map(m);
    register_physmem(m);
    register_folio_cache(m);
    register_clamp(m);
    register_arch(m);
    register_guest_memfd(m);
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
