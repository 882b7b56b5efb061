// SPDX-License-Identifier: MIT
// register_guest_memfd.cpp - binds GuestMemfd: every operation runs through file_op() under the model lock.
#include "common.hpp"
#include "arch_state.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {
namespace {
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

/*
 * bulk_op - run one bulk call (get_pfns, guest_read_many, ...) under file_op: without
 * the GIL for a built-in arch, with it for a Python one, whose hooks need it.  Each
 * element is one operation, as the single calls are: after each, a Python arch forgets
 * the hook lookups of the element, and a hook that raised ends the call there.  What
 * the call raises - the failing element's own error, a hook's, the KeyboardInterrupt of
 * a Ctrl-C between elements, RuntimeError from the file's own hook - carries
 * `completed`: the number of elements done before it stopped, which stay applied.
 */
template <class Fn>
void bulk_op(GuestMemfd &f, Fn &&fn)
{
    BulkCall call;
    if (PyHookState *hs = hook_state(f.arch())) {
        call.arg = hs;
        call.between = [](void *arg) {
            auto *h = static_cast<PyHookState *>(arg);
            h->forget();
            return h->pending.has_value();
        };
    }
    auto completed = [&](py::error_already_set &e) {
        if (PyObject_SetAttrString(e.value().ptr(), "completed",
                                   py::int_(call.done).ptr()) < 0)
            PyErr_Clear(); // an exception object that takes no attributes: raised as it is
    };
    try {
        file_op(f, Mode::Write, true, [&] {
            fn(call);
            return 0;
        });
    } catch (py::error_already_set &e) {
        completed(e);
        throw;
    } catch (...) {
        py::error_already_set e = python_error_of_current_exception();
        completed(e);
        throw e;
    }
}

/* guest_read_many / host_read_many: the tokens read at @indexes, as a new array. */
py::array_t<uint64_t> read_many(GuestMemfd &f, py::handle indexes,
                                void (GuestMemfd::*read)(const uint64_t *, size_t, uint64_t *,
                                                         BulkCall &))
{
    u64_array index = to_index_array(indexes, "indexes");
    size_t n = size_t(index.size());
    py::array_t<uint64_t> token(static_cast<py::ssize_t>(n));
    const uint64_t *ip = index.data();
    uint64_t *tp = token.mutable_data();
    bulk_op(f, [&](BulkCall &call) { (f.*read)(ip, n, tp, call); });
    return token;
}

/* The indexes of a bulk call and, when it has them, its tokens: one length. */
std::pair<u64_array, u64_array> indexes_and_tokens(py::handle i, py::handle t)
{
    u64_array index = to_index_array(i, "indexes");
    u64_array token = to_index_array(t, "tokens");
    if (token.size() != index.size())
        throw invalid("tokens", "indexes and tokens must have one length, got " +
                                    std::to_string(index.size()) + " and " +
                                    std::to_string(token.size()));
    return {index, token};
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


} // namespace

void register_guest_memfd(py::module_ &m)
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
                        py::handle physmem, py::handle arch, py::handle hook_design,
                        py::handle huge_policy) {
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
                if (!py::isinstance<py::str>(huge_policy))
                    throw py::type_error("huge_policy: must be 'none' or 'hugetlb'");
                std::string pname = huge_policy.cast<std::string>();
                if (pname != "none" && pname != "hugetlb")
                    throw invalid("huge_policy",
                                  "must be 'none' or 'hugetlb', got '" + pname + "'");
                HugePolicy policy = pname == "hugetlb" ? HugePolicy::HugeTLB : HugePolicy::None;
                std::shared_ptr<Arch> a = make_arch(arch);
                ArchConfig cfg(*a, arch);
                std::unique_ptr<Guard> g;
                if (pm)
                    g = std::make_unique<Guard>(pm->lock(), Mode::Write);
                std::function<void()> undo = cfg.apply();
                GM *file;
                try {
                    file = new GM(sz, fl, order, pm, a, design, policy);
                } catch (...) {
                    undo();
                    throw;
                }
                return std::shared_ptr<GM>(file, close_unclosed);
            }),
            py::arg("size_bytes"), py::kw_only(), py::arg("flags") = 0,
            py::arg("folio_order") = 0, py::arg("physmem") = py::none(),
            py::arg("arch") = "sw_protected", py::arg("hook_design") = "mainline",
            py::arg("huge_policy") = "none", py::keep_alive<1, 6>())
        .def_property_readonly("size", &GM::size)
        .def_property_readonly("nr_pages", &GM::nr_pages)
        .def_property_readonly("flags", &GM::flags)
        .def_property_readonly("folio_order", &GM::folio_order)
        .def_property_readonly("closed", &GM::closed)
        .def_property_readonly("hook_design",
                               [](const GM &f) { return design_name(f.hook_design()); })
        .def_property_readonly("huge_policy",
                               [](const GM &f) { return policy_name(f.huge_policy()); })
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
                // Built by hand: py::make_tuple's generic casters cost as much as the fault.
                py::object pfn = py::reinterpret_steal<py::object>(
                    PyLong_FromUnsignedLongLong(r.first));
                py::object order = py::reinterpret_steal<py::object>(PyLong_FromLong(r.second));
                if (!pfn || !order)
                    throw py::error_already_set();
                PyObject *t = PyTuple_New(2);
                if (!t)
                    throw py::error_already_set();
                PyTuple_SET_ITEM(t, 0, pfn.release().ptr());
                PyTuple_SET_ITEM(t, 1, order.release().ptr());
                return py::reinterpret_steal<py::tuple>(t);
            },
            py::arg("index"))
        .def(
            "get_pfns",
            [](GM &f, py::handle i) {
                u64_array index = to_index_array(i, "indexes");
                size_t n = size_t(index.size());
                py::array_t<uint64_t> pfn(static_cast<py::ssize_t>(n));
                py::array_t<uint8_t> order(static_cast<py::ssize_t>(n));
                const uint64_t *ip = index.data();
                uint64_t *pp = pfn.mutable_data();
                uint8_t *op = order.mutable_data();
                bulk_op(f, [&](BulkCall &call) { f.get_pfns(ip, n, pp, op, call); });
                return py::make_tuple(pfn, order);
            },
            py::arg("indexes"))
        .def(
            "guest_read_many",
            [](GM &f, py::handle i) { return read_many(f, i, &GM::guest_read_many); },
            py::arg("indexes"))
        .def(
            "host_read_many",
            [](GM &f, py::handle i) { return read_many(f, i, &GM::host_read_many); },
            py::arg("indexes"))
        .def(
            "guest_write_many",
            [](GM &f, py::handle i, py::handle t) {
                auto cols = indexes_and_tokens(i, t);
                const uint64_t *ip = cols.first.data(), *tp = cols.second.data();
                size_t n = size_t(cols.first.size());
                bulk_op(f, [&](BulkCall &call) { f.guest_write_many(ip, tp, n, call); });
            },
            py::arg("indexes"), py::arg("tokens"))
        .def(
            "host_write_many",
            [](GM &f, py::handle i, py::handle t) {
                auto cols = indexes_and_tokens(i, t);
                const uint64_t *ip = cols.first.data(), *tp = cols.second.data();
                size_t n = size_t(cols.first.size());
                bulk_op(f, [&](BulkCall &call) { f.host_write_many(ip, tp, n, call); });
            },
            py::arg("indexes"), py::arg("tokens"))
        .def(
            "set_attributes_many",
            [](GM &f, py::handle s, py::handle e, py::handle a) {
                u64_array start = to_index_array(s, "starts");
                u64_array end = to_index_array(e, "ends");
                u64_array attrs = to_index_array(a, "attrs");
                if (end.size() != start.size() || attrs.size() != start.size())
                    throw invalid("ends", "starts, ends and attrs must have one length, got " +
                                              std::to_string(start.size()) + ", " +
                                              std::to_string(end.size()) + ", " +
                                              std::to_string(attrs.size()));
                const uint64_t *sp = start.data(), *ep = end.data(), *ap = attrs.data();
                size_t n = size_t(start.size());
                bulk_op(f, [&](BulkCall &call) { f.set_attributes_many(sp, ep, ap, n, call); });
            },
            py::arg("starts"), py::arg("ends"), py::arg("attrs"))
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
            [](GM &f, py::handle s, py::handle e, py::handle o) -> py::object {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_query(f, start, end);
                std::optional<OutRows> into;
                if (!o.is_none())
                    into.emplace(o);
                Guard lk(f.physmem().lock(), Mode::Read);
                f.check_open();
                size_t n = f.cache().count(start, end);
                py::array_t<uint64_t> fresh;
                PfnRange *ranges;
                if (into) {
                    ranges = into->rows(n);
                } else {
                    fresh = new_u64_2d(n, 2);
                    ranges = reinterpret_cast<PfnRange *>(fresh.mutable_data());
                }
                lk.nogil([&] { return f.cache().pfn_ranges(start, end, ranges); });
                return into ? into->answer(n) : py::object(fresh);
            },
            py::arg("start"), py::arg("end"), py::arg("out") = py::none())
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

} // namespace gmem_bind
