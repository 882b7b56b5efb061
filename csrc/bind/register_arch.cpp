// SPDX-License-Identifier: MIT
// register_arch.cpp - binds Arch, the built-in models and Recorder; PyArch lets Python override hooks.
#include "common.hpp"
#include "arch_state.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {
namespace {
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
        hook(f, mainline(f) ? "make_private" : "prepare", "make_private", "prepare",
             [&] { Base::prepare(f, index, pfn, nr); },
             [&](py::object &fn) { fn(index, pfn, nr); });
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
        hook(f, "post_populate", "post_populate", nullptr,
             [&] { Base::post_populate(f, index, pfn, has_token, token); },
             [&](py::object &fn) {
                 fn(index, pfn, has_token ? py::object(py::int_(token)) : py::object(py::none()));
             });
    }
    void invalidate_range(GuestMemfd &f, uint64_t start, uint64_t end, unsigned kinds) override
    {
        hook(f, "invalidate_range", "invalidate_range", nullptr,
             [&] { Base::invalidate_range(f, start, end, kinds); },
             [&](py::object &fn) { fn(start, end, kinds); });
    }
    void invalidate_start(GuestMemfd &f, uint64_t start, uint64_t end, unsigned kinds) override
    {
        hook(f, "invalidate_start", "invalidate_start", nullptr,
             [&] { Base::invalidate_start(f, start, end, kinds); },
             [&](py::object &fn) { fn(start, end, kinds); });
    }
    void invalidate_end(GuestMemfd &f, uint64_t start, uint64_t end) override
    {
        hook(f, "invalidate_end", "invalidate_end", nullptr,
             [&] { Base::invalidate_end(f, start, end); },
             [&](py::object &fn) { fn(start, end); });
    }

private:
    static bool mainline(const GuestMemfd &f) { return f.hook_design() == HookDesign::Mainline; }

    /*
     * A hook with scalar arguments: the Python override of @name (or @alias), called
     * by @with_python under the GIL (@label names it in a violation); none: @fallback,
     * the Base model's own; a lookup that failed: nothing (recorded as hook-raised).
     */
    template <class Fallback, class WithPython>
    void hook(GuestMemfd &f, const char *label, const char *name, const char *alias,
              Fallback &&fallback, WithPython &&with_python)
    {
        py::gil_scoped_acquire gil;
        py::object fn;
        Lookup l = lookup(f, label, name, alias, fn);
        if (l == Lookup::Absent)
            fallback();
        else if (l == Lookup::Found)
            call(f, label, [&] { with_python(fn); });
    }

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
            f->check_range(start, end);
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
                f->check_range(start, end);
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


} // namespace

void register_arch(py::module_ &m)
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
    tdx.def(py::init([](py::handle every) { return new TDX(to_u64(every, "demote_busy_every")); },
                     [](py::handle every) {
                         return new PyArch<TDX>(to_u64(every, "demote_busy_every"));
                     }),
            py::arg("demote_busy_every") = 0)
        .def_property_readonly("demote_busy_every", &TDX::demote_busy_every);
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

} // namespace gmem_bind
