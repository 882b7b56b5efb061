// SPDX-License-Identifier: MIT
// gmem_c.cpp - the C ABI (gmem.h) over the C++ core: handles, error codes, C hooks.
//
// DOC: how the C ABI wraps the core
//
// Every entry point runs its body through guarded(), which catches every exception the
// core (or the host: std::bad_alloc) throws and turns it into a gmem_status plus a
// thread-local message: nothing C++ crosses into C.  A file operation goes through
// file_op(), the C twin of the Python bindings' file_op: it takes the PhysMem's
// ModelLock (not again if this thread holds it: a hook calling back), refuses a change
// to a file from that file's own hook, marks the file busy while it runs, and turns the
// first failure of a C hook during the operation into GMEM_ERR_HOOK once it completes.
//
// CArch<Base> is the C hooks over a built-in model, as PyArch<Base> is for Python: a
// NULL hook falls through to Base; a hook returning non-zero (or a C++ hook throwing) is
// recorded as a "hook-raised" violation, since the operation cannot stop after its point
// of no return.
#define GMEM_C_BUILD
#include "gmem.h"

#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <vector>

#include "gmem/arch.hpp"
#include "gmem/errors.hpp"
#include "gmem/guest_memfd.hpp"
#include "gmem/interrupt.hpp"
#include "gmem/physmem.hpp"

using namespace gmem;

struct gmem_physmem {
    std::shared_ptr<PhysMem> pm;
};
struct gmem_arch {
    std::shared_ptr<Arch> arch;
};

static_assert(sizeof(gmem_pfn_range) == sizeof(PfnRange) &&
                  offsetof(gmem_pfn_range, end_pfn) == offsetof(PfnRange, end_pfn),
              "gmem_pfn_range is the core's PfnRange");
static_assert(GMEM_CONFIG_PREPARE == CONFIG_PREPARE && GMEM_CONFIG_FREE == CONFIG_FREE &&
                  GMEM_CONFIG_FREE_ON_SHARED_CONVERSION == CONFIG_FREE_ON_SHARED_CONVERSION &&
                  GMEM_CONFIG_INVALIDATE == CONFIG_INVALIDATE &&
                  GMEM_CONFIG_POPULATE == CONFIG_POPULATE && GMEM_PRIVATE == ATTR_PRIVATE &&
                  GMEM_FOLIO_BATCH_SIZE == FOLIO_BATCH_SIZE,
              "gmem.h's constants are the core's");

namespace {

constexpr unsigned CONFIG_ALL = CONFIG_CONVERT | CONFIG_RECLAIM | CONFIG_INVALIDATE |
                                CONFIG_POPULATE;

/* ---- errors ------------------------------------------------------------------------ */

std::string &last_error()
{
    thread_local std::string msg;
    return msg;
}
// The page of the last GMEM_ERR_BUSY, _SIGBUS or _HWPOISON (the Python exception's index).
thread_local uint64_t error_index = NO_PFN;

gmem_status fail(gmem_status s, const char *msg) noexcept
{
    try {
        last_error() = msg;
    } catch (...) { // no memory for the message: keep the code, drop the text
        last_error().clear();
    }
    return s;
}

/* Run @body, mapping every exception to its status (the Python bindings' translator). */
template <class Body>
gmem_status guarded(Body &&body) noexcept
{
    try {
        return body();
    } catch (const ConversionBusy &e) {
        error_index = e.error_index;
        return fail(GMEM_ERR_BUSY, e.what());
    } catch (const HWPoison &e) {
        error_index = e.index;
        return fail(GMEM_ERR_HWPOISON, e.what());
    } catch (const SigBus &e) {
        error_index = e.index;
        return fail(GMEM_ERR_SIGBUS, e.what());
    } catch (const OutOfMemory &e) {
        return fail(GMEM_ERR_NOMEM, e.what());
    } catch (const InvalidArgument &e) {
        return fail(GMEM_ERR_INVALID, e.what());
    } catch (const Reentrant &e) {
        return fail(GMEM_ERR_REENTRANT, e.what());
    } catch (const std::bad_alloc &) {
        return fail(GMEM_ERR_HOST_NOMEM, "the host ran out of memory (std::bad_alloc); the "
                                         "call changed nothing");
    } catch (const std::exception &e) {
        return fail(GMEM_ERR_INTERNAL, e.what());
    } catch (...) {
        return fail(GMEM_ERR_INTERNAL, "an unknown exception");
    }
}

template <class T>
T &need(T *p, const char *arg)
{
    if (!p)
        throw invalid(arg, "must not be NULL");
    return *p;
}

/* ---- locking ----------------------------------------------------------------------- */

/* A ModelLock for one call: shared (read) or exclusive; not taken again by the thread
 * that holds it exclusively (a hook calling back into its model). */
class Lock {
public:
    Lock(ModelLock &m, bool write) : m_(m), write_(write)
    {
        if (m.held_by_me())
            return;
        write ? m.lock() : m.lock_shared();
        owned_ = true;
    }
    ~Lock()
    {
        if (owned_)
            write_ ? m_.unlock() : m_.unlock_shared();
    }
    Lock(const Lock &) = delete;
    Lock &operator=(const Lock &) = delete;

private:
    ModelLock &m_;
    bool write_, owned_ = false;
};

/* ---- C hooks ----------------------------------------------------------------------- */

/* What every C arch carries, whatever its base model. */
struct CHooks {
    virtual ~CHooks() = default;
    gmem_hooks h{};
    std::string name;
    unsigned config_bits = 0;
    gmem_file *handle = nullptr; // the handle of the file it serves, given to hooks
    bool failed = false;         // a hook failed during the current operation
    std::string failure;         // the first such failure

    void reset()
    {
        failed = false;
        failure.clear();
    }
    // The base model's hooks (gmem_base_*).
    virtual void base_prepare(GuestMemfd &, uint64_t, uint64_t, uint64_t) = 0;
    virtual void base_make_shared(GuestMemfd &, const PfnRange *, size_t) = 0;
    virtual void base_free_folio(GuestMemfd &, const PfnRange *, size_t) = 0;
    virtual void base_invalidate_range(GuestMemfd &, uint64_t, uint64_t, unsigned) = 0;
    virtual void base_invalidate_start(GuestMemfd &, uint64_t, uint64_t, unsigned) = 0;
    virtual void base_invalidate_end(GuestMemfd &, uint64_t, uint64_t) = 0;
    virtual void base_post_populate(GuestMemfd &, uint64_t, uint64_t, bool, uint64_t) = 0;
    virtual void base_flush(GuestMemfd &) = 0;
};

CHooks *c_hooks(Arch &a) { return dynamic_cast<CHooks *>(&a); }

} // namespace

/* A file and, when its arch is a C arch, that arch's hooks (found once: a file's arch
 * never changes, and every operation needs them). */
struct gmem_file {
    std::shared_ptr<GuestMemfd> f;
    CHooks *hooks = nullptr;
};

namespace {

const gmem_pfn_range *c_ranges(const PfnRange *r)
{
    return reinterpret_cast<const gmem_pfn_range *>(r);
}

template <class Base>
class CArch final : public Base, public CHooks {
public:
    ~CArch() override
    {
        if (h.destroy)
            h.destroy(h.user);
    }
    std::string name() const override { return CHooks::name; }
    unsigned config() const override { return config_bits; }

    void prepare(GuestMemfd &f, uint64_t index, uint64_t pfn, uint64_t nr) override
    {
        if (!h.make_private)
            return Base::prepare(f, index, pfn, nr);
        call(f, mainline(f) ? "make_private" : "prepare",
             [&] { return h.make_private(h.user, handle, index, pfn, nr); });
    }
    void make_shared(GuestMemfd &f, const PfnRange *r, size_t n) override
    {
        if (!h.make_shared)
            return Base::make_shared(f, r, n);
        call(f, "make_shared", [&] { return h.make_shared(h.user, handle, c_ranges(r), n); });
    }
    void free_folio(GuestMemfd &f, const PfnRange *r, size_t n) override
    {
        if (!h.reclaim)
            return Base::free_folio(f, r, n);
        call(f, mainline(f) ? "reclaim" : "free_folio",
             [&] { return h.reclaim(h.user, handle, c_ranges(r), n); });
    }
    void invalidate_range(GuestMemfd &f, uint64_t start, uint64_t end, unsigned kinds) override
    {
        if (!h.invalidate_range)
            return Base::invalidate_range(f, start, end, kinds);
        call(f, "invalidate_range",
             [&] { return h.invalidate_range(h.user, handle, start, end, kinds); });
    }
    void invalidate_start(GuestMemfd &f, uint64_t start, uint64_t end, unsigned kinds) override
    {
        if (!h.invalidate_start)
            return Base::invalidate_start(f, start, end, kinds);
        call(f, "invalidate_start",
             [&] { return h.invalidate_start(h.user, handle, start, end, kinds); });
    }
    void invalidate_end(GuestMemfd &f, uint64_t start, uint64_t end) override
    {
        if (!h.invalidate_end)
            return Base::invalidate_end(f, start, end);
        call(f, "invalidate_end", [&] { return h.invalidate_end(h.user, handle, start, end); });
    }
    void post_populate(GuestMemfd &f, uint64_t index, uint64_t pfn, bool has_token,
                       uint64_t token) override
    {
        if (!h.post_populate)
            return Base::post_populate(f, index, pfn, has_token, token);
        call(f, "post_populate",
             [&] { return h.post_populate(h.user, handle, index, pfn, has_token, token); });
    }

    void base_prepare(GuestMemfd &f, uint64_t i, uint64_t p, uint64_t n) override
    {
        Base::prepare(f, i, p, n);
    }
    void base_make_shared(GuestMemfd &f, const PfnRange *r, size_t n) override
    {
        Base::make_shared(f, r, n);
    }
    void base_free_folio(GuestMemfd &f, const PfnRange *r, size_t n) override
    {
        Base::free_folio(f, r, n);
    }
    void base_invalidate_range(GuestMemfd &f, uint64_t s, uint64_t e, unsigned k) override
    {
        Base::invalidate_range(f, s, e, k);
    }
    void base_invalidate_start(GuestMemfd &f, uint64_t s, uint64_t e, unsigned k) override
    {
        Base::invalidate_start(f, s, e, k);
    }
    void base_invalidate_end(GuestMemfd &f, uint64_t s, uint64_t e) override
    {
        Base::invalidate_end(f, s, e);
    }
    void base_post_populate(GuestMemfd &f, uint64_t i, uint64_t p, bool has, uint64_t t) override
    {
        Base::post_populate(f, i, p, has, t);
    }
    void base_flush(GuestMemfd &f) override { Base::flush(f); }

private:
    static bool mainline(const GuestMemfd &f) { return f.hook_design() == HookDesign::Mainline; }

    /* Run one C hook; a failure is recorded, the first one reported when the operation
     * returns.  A hook may write page contents (gmem_physmem_write): the conversion then
     * checks what it did, as for a Python hook. */
    template <class Hook>
    void call(GuestMemfd &f, const char *label, Hook &&hook)
    {
        this->contents_touched = true;
        last_error().clear();
        int rc;
        std::string why;
        try {
            rc = hook();
        } catch (const std::exception &e) { // a C++ hook that throws: not across the ABI
            rc = -1;
            why = std::string("threw ") + e.what();
        } catch (...) {
            rc = -1;
            why = "threw an exception";
        }
        if (rc == 0 && why.empty())
            return;
        std::string detail = std::string(label) + " " +
                             (why.empty() ? "returned " + std::to_string(rc) : why);
        if (why.empty() && !last_error().empty())
            detail += ": " + last_error();
        f.record(Violation{this->name(), "hook-raised", NO_PFN, NO_PFN, detail});
        if (!failed) {
            failed = true;
            failure = detail;
        }
    }
};

/* A built-in model by name, or (with @hooks) C hooks over it. */
template <class Base>
std::shared_ptr<Arch> arch_of(const gmem_hooks *hooks)
{
    if (!hooks)
        return std::make_shared<Base>();
    auto a = std::make_shared<CArch<Base>>();
    a->h = *hooks;
    a->CHooks::name = hooks->name ? std::string(hooks->name) : a->Base::name();
    a->config_bits = (hooks->config & GMEM_CONFIG_BASE) ? a->Base::config() : 0;
    a->config_bits |= hooks->config & ~GMEM_CONFIG_BASE;
    return a;
}

/* Each hook set must be enabled by the config: C has no warnings, and a hook that never
 * runs is a bug (Python warns: UnusedHookWarning). */
void check_hooks(const gmem_hooks &h, unsigned config)
{
    struct {
        bool set;
        const char *hook;
        unsigned bit;
        const char *need;
    } const gates[] = {
        {h.make_private != nullptr, "make_private", CONFIG_PREPARE, "CONVERT (PREPARE)"},
        {h.make_shared != nullptr, "make_shared", CONFIG_FREE_ON_SHARED_CONVERSION,
         "CONVERT (FREE_ON_SHARED_CONVERSION)"},
        {h.reclaim != nullptr, "reclaim", CONFIG_FREE, "RECLAIM (FREE)"},
        {h.invalidate_range != nullptr, "invalidate_range", CONFIG_INVALIDATE, "INVALIDATE"},
        {h.post_populate != nullptr, "post_populate", CONFIG_POPULATE, "POPULATE"},
    };
    for (const auto &g : gates)
        if (g.set && !(config & g.bit))
            throw invalid("hooks", std::string(g.hook) + " is set but config does not enable " +
                                       "it (GMEM_CONFIG_" + g.need + "): it would never run");
}

/* ---- files ------------------------------------------------------------------------- */

/*
 * file_op - run @fn(file) under the PhysMem's lock (@write: exclusive, and the file busy:
 * its hooks may read it, not change it).  A hook failure during the outermost operation
 * on the file is its status once the operation completes.
 */
template <class Fn>
gmem_status file_op(gmem_file *h, bool write, Fn &&fn) noexcept
{
    return guarded([&] {
        GuestMemfd &f = *need(h, "file").f;
        ModelLock &m = f.physmem().lock();
        bool nested = m.held_by_me() && f.in_operation();
        Lock lk(m, write);
        if (write && f.in_operation())
            throw Reentrant("an arch hook may read the file it serves, not change it");
        CHooks *hs = nested ? nullptr : h->hooks;
        struct Busy {
            GuestMemfd *f;
            ~Busy()
            {
                if (f)
                    f->set_in_operation(false);
            }
        } busy{write ? &f : nullptr};
        if (busy.f)
            f.set_in_operation(true);
        try {
            fn(f);
        } catch (...) {
            if (hs)
                hs->reset();
            throw;
        }
        if (hs && hs->failed) {
            std::string why = hs->failure;
            hs->reset();
            return fail(GMEM_ERR_HOOK, ("a hook failed (the operation completed; check() "
                                        "reports it): " + why).c_str());
        }
        return GMEM_OK;
    });
}

HookDesign design_of(const char *name)
{
    std::string n = name ? name : "mainline";
    if (n == "mainline")
        return HookDesign::Mainline;
    if (n == "split")
        return HookDesign::Split;
    if (n == "overloaded")
        return HookDesign::Overloaded;
    throw invalid("hook_design", "must be \"mainline\", \"split\" or \"overloaded\", got \"" +
                                     n + "\"");
}

HugePolicy policy_of(const char *name)
{
    std::string n = name ? name : "none";
    if (n == "none")
        return HugePolicy::None;
    if (n == "hugetlb")
        return HugePolicy::HugeTLB;
    throw invalid("huge_policy", "must be \"none\" or \"hugetlb\", got \"" + n + "\"");
}

std::shared_ptr<Arch> builtin_arch(const char *name, const gmem_hooks *hooks, const char *arg)
{
    std::string n = name ? name : "sw_protected";
    if (n == "sw_protected")
        return arch_of<SwProtected>(hooks);
    if (n == "snp")
        return arch_of<SNP>(hooks);
    if (n == "tdx")
        return arch_of<TDX>(hooks);
    if (n == "pkvm")
        return arch_of<PKVM>(hooks);
    throw invalid(arg,
                  "unknown arch \"" + n + "\"; allowed: sw_protected, snp, tdx, pkvm");
}

/*
 * A caller's struct (options, hooks), read as Linux's copy_struct_from_user() reads one
 * that grows: fields past the caller's size keep their defaults; bytes past ours must be
 * zero (a newer caller that sets a field we do not know is refused, not ignored).
 */
template <class T>
T read_struct(const T *in, void (*init)(T *), const char *arg, const char *init_name)
{
    T out;
    init(&out);
    if (!in)
        return out;
    size_t n = in->size;
    if (n <= sizeof(size_t))
        throw invalid(arg, std::string("size must be set (") + init_name + "), got " +
                               std::to_string(n));
    const unsigned char *bytes = reinterpret_cast<const unsigned char *>(in);
    for (size_t i = sizeof(T); i < n; i++)
        if (bytes[i])
            throw invalid(arg, "has fields this library does not know (size " +
                                   std::to_string(n) + ", known " + std::to_string(sizeof(T)) +
                                   ")");
    std::memcpy(&out, in, n < sizeof(T) ? n : sizeof(T));
    out.size = sizeof(T);
    return out;
}

/* Checks of the base hooks' arguments, as the Python direct hook calls make them. */
void check_pfns(const GuestMemfd &f, uint64_t start_pfn, uint64_t end_pfn, const char *sname,
                const char *ename)
{
    const PhysMem &pm = f.physmem();
    if (start_pfn < pm.base_pfn() || start_pfn >= pm.end_pfn())
        throw invalid(sname, "must be in [" + hex(pm.base_pfn()) + ", " + hex(pm.end_pfn()) +
                                 ") (the file's PhysMem), got " + hex(start_pfn));
    if (end_pfn <= start_pfn || end_pfn > pm.end_pfn())
        throw invalid(ename, "must be in (" + hex(start_pfn) + ", " + hex(pm.end_pfn()) +
                                 "], got " + hex(end_pfn));
}

void check_kinds(unsigned kinds)
{
    if (kinds == 0 || kinds > (FILTER_SHARED | FILTER_PRIVATE))
        throw invalid("kinds", "must be GMEM_FILTER_SHARED (1), GMEM_FILTER_PRIVATE (2) or "
                               "both (3), got " +
                                   std::to_string(kinds));
}

/* Run a base hook of @h's arch: under the lock, on an open file, after @check. */
template <class Check, class Call>
gmem_status base_op(gmem_file *h, Check &&check, Call &&call) noexcept
{
    return guarded([&] {
        GuestMemfd &f = *need(h, "file").f;
        Lock lk(f.physmem().lock(), true);
        f.check_open();
        check(f);
        CHooks *c = c_hooks(f.arch());
        call(f, c);
        return GMEM_OK;
    });
}

const char *intern(const std::string &s)
{
    static std::mutex mu;
    static std::set<std::string> *names = new std::set<std::string>; // outlives every caller
    std::lock_guard<std::mutex> lk(mu);
    return names->insert(s).first->c_str();
}

} // namespace

/* ---- the ABI ----------------------------------------------------------------------- */

extern "C" {

const char *gmem_last_error(void) { return last_error().c_str(); }

const char *gmem_status_name(int status)
{
    static const char *const names[] = {
        "GMEM_OK",         "GMEM_ERR_INVALID",     "GMEM_ERR_BUSY",
        "GMEM_ERR_SIGBUS", "GMEM_ERR_HWPOISON",    "GMEM_ERR_NOMEM",
        "GMEM_ERR_HOST_NOMEM", "GMEM_ERR_REENTRANT", "GMEM_ERR_HOOK",
        "GMEM_ERR_INTERNAL"};
    if (status < 0 || size_t(status) >= sizeof(names) / sizeof(names[0]))
        return "unknown";
    return names[status];
}

int gmem_abi_version(void) { return GMEM_ABI_VERSION; }

uint64_t gmem_last_error_index(void) { return error_index; }

void gmem_set_last_error(const char *msg) { fail(GMEM_OK, msg ? msg : ""); }

gmem_status gmem_physmem_create(uint64_t nr_pages, uint64_t base_pfn, uint64_t seed,
                                gmem_physmem **out)
{
    return guarded([&] {
        need(out, "out") = nullptr;
        auto h = std::make_unique<gmem_physmem>();
        h->pm = std::make_shared<PhysMem>(nr_pages, base_pfn, seed);
        *out = h.release();
        return GMEM_OK;
    });
}

void gmem_physmem_release(gmem_physmem *pm) { delete pm; }

gmem_status gmem_physmem_read(gmem_physmem *pm, uint64_t pfn, uint64_t *token)
{
    return guarded([&] {
        PhysMem &p = *need(pm, "physmem").pm;
        uint64_t &t = need(token, "token");
        Lock lk(p.lock(), false);
        t = p.read(pfn);
        return GMEM_OK;
    });
}

gmem_status gmem_physmem_write(gmem_physmem *pm, uint64_t pfn, uint64_t token)
{
    return guarded([&] {
        PhysMem &p = *need(pm, "physmem").pm;
        Lock lk(p.lock(), true);
        p.write(pfn, token);
        return GMEM_OK;
    });
}

gmem_status gmem_physmem_nr_free(gmem_physmem *pm, uint64_t *nr_free)
{
    return guarded([&] {
        PhysMem &p = *need(pm, "physmem").pm;
        uint64_t &n = need(nr_free, "nr_free");
        Lock lk(p.lock(), false);
        n = p.nr_free();
        return GMEM_OK;
    });
}

void gmem_hooks_init(gmem_hooks *hooks)
{
    if (!hooks)
        return;
    *hooks = gmem_hooks{};
    hooks->size = sizeof(gmem_hooks);
    hooks->config = GMEM_CONFIG_BASE;
}

gmem_status gmem_arch_create(const char *base, const gmem_hooks *hooks, gmem_arch **out)
{
    return guarded([&] {
        need(out, "out") = nullptr;
        gmem_hooks h = read_struct(hooks, gmem_hooks_init, "hooks", "gmem_hooks_init");
        if (hooks) {
            if (unsigned unknown = h.config & ~(CONFIG_ALL | GMEM_CONFIG_BASE))
                throw invalid("config", "unknown bits " + hex(unknown) +
                                            "; allowed: GMEM_CONFIG_* | GMEM_CONFIG_BASE");
        }
        auto a = std::make_unique<gmem_arch>();
        a->arch = builtin_arch(base, hooks ? &h : nullptr, "base");
        if (hooks)
            check_hooks(h, a->arch->config());
        *out = a.release();
        return GMEM_OK;
    });
}

void gmem_arch_release(gmem_arch *arch) { delete arch; }

gmem_status gmem_arch_stats(gmem_arch *arch, gmem_stat *out, size_t cap, size_t *count)
{
    return guarded([&] {
        Arch &a = *need(arch, "arch").arch;
        size_t &n = need(count, "count");
        std::map<std::string, uint64_t> stats;
        if (a.file) {
            Lock lk(a.file->physmem().lock(), false);
            stats = a.stats();
        } else {
            stats = a.stats();
        }
        if (cap && !out)
            throw invalid("out", "must not be NULL when cap > 0");
        size_t i = 0;
        for (const auto &kv : stats) {
            if (i < cap)
                out[i] = gmem_stat{intern(kv.first), kv.second};
            i++;
        }
        n = stats.size();
        return GMEM_OK;
    });
}

gmem_status gmem_base_make_private(gmem_file *file, uint64_t index, uint64_t pfn,
                                   uint64_t nr_pages)
{
    return base_op(
        file,
        [&](GuestMemfd &f) {
            f.check_index(index);
            if (nr_pages == 0 || nr_pages > f.nr_pages() - index)
                throw invalid("nr_pages", "must be in 1.." + std::to_string(f.nr_pages() - index) +
                                              " (the file's end), got " + std::to_string(nr_pages));
            check_pfns(f, pfn, pfn + nr_pages, "pfn", "nr_pages");
        },
        [&](GuestMemfd &f, CHooks *c) {
            c ? c->base_prepare(f, index, pfn, nr_pages)
              : f.arch().prepare(f, index, pfn, nr_pages);
        });
}

static gmem_status base_ranges(gmem_file *file, const gmem_pfn_range *ranges, size_t n,
                               bool shared)
{
    return base_op(
        file,
        [&](GuestMemfd &f) {
            if (n == 0 || !ranges)
                throw invalid("ranges", "must hold at least one range");
            for (size_t i = 0; i < n; i++)
                check_pfns(f, ranges[i].start_pfn, ranges[i].end_pfn, "start_pfn", "end_pfn");
        },
        [&](GuestMemfd &f, CHooks *c) {
            auto *r = reinterpret_cast<const PfnRange *>(ranges);
            if (shared)
                c ? c->base_make_shared(f, r, n) : f.arch().make_shared(f, r, n);
            else
                c ? c->base_free_folio(f, r, n) : f.arch().free_folio(f, r, n);
            c ? c->base_flush(f) : f.arch().flush(f); // a direct call is done when it returns
        });
}

gmem_status gmem_base_make_shared(gmem_file *file, const gmem_pfn_range *ranges, size_t n)
{
    return base_ranges(file, ranges, n, true);
}

gmem_status gmem_base_reclaim(gmem_file *file, const gmem_pfn_range *ranges, size_t n)
{
    return base_ranges(file, ranges, n, false);
}

gmem_status gmem_base_invalidate_range(gmem_file *file, uint64_t start, uint64_t end,
                                       unsigned kinds)
{
    return base_op(
        file,
        [&](GuestMemfd &f) {
            f.check_range(start, end);
            check_kinds(kinds);
        },
        [&](GuestMemfd &f, CHooks *c) {
            c ? c->base_invalidate_range(f, start, end, kinds)
              : f.arch().invalidate_range(f, start, end, kinds);
        });
}

gmem_status gmem_base_invalidate_start(gmem_file *file, uint64_t start, uint64_t end,
                                       unsigned kinds)
{
    return base_op(
        file,
        [&](GuestMemfd &f) {
            f.check_range(start, end);
            check_kinds(kinds);
        },
        [&](GuestMemfd &f, CHooks *c) {
            c ? c->base_invalidate_start(f, start, end, kinds)
              : f.arch().invalidate_start(f, start, end, kinds);
        });
}

gmem_status gmem_base_invalidate_end(gmem_file *file, uint64_t start, uint64_t end)
{
    return base_op(
        file, [&](GuestMemfd &f) { f.check_range(start, end); },
        [&](GuestMemfd &f, CHooks *c) {
            c ? c->base_invalidate_end(f, start, end) : f.arch().invalidate_end(f, start, end);
        });
}

gmem_status gmem_base_post_populate(gmem_file *file, uint64_t index, uint64_t pfn,
                                    int has_token, uint64_t token)
{
    return base_op(
        file,
        [&](GuestMemfd &f) {
            f.check_index(index);
            check_pfns(f, pfn, pfn + 1, "pfn", "pfn");
        },
        [&](GuestMemfd &f, CHooks *c) {
            c ? c->base_post_populate(f, index, pfn, has_token != 0, token)
              : f.arch().post_populate(f, index, pfn, has_token != 0, token);
        });
}

void gmem_file_options_init(gmem_file_options *options)
{
    if (!options)
        return;
    *options = gmem_file_options{};
    options->size = sizeof(gmem_file_options);
}

gmem_status gmem_file_create(uint64_t size_bytes, const gmem_file_options *options,
                             gmem_file **out)
{
    return guarded([&] {
        need(out, "out") = nullptr;
        gmem_file_options o = read_struct(options, gmem_file_options_init, "options",
                                          "gmem_file_options_init");
        HookDesign design = design_of(o.hook_design);
        HugePolicy policy = policy_of(o.huge_policy);
        if (o.folio_order > MAX_ORDER)
            throw invalid("folio_order", "must be in 0..18, got " + std::to_string(o.folio_order));
        if (o.arch && o.arch_name)
            throw invalid("arch_name", "must be NULL when arch is given");
        std::shared_ptr<Arch> arch =
            o.arch ? o.arch->arch : builtin_arch(o.arch_name, nullptr, "arch_name");
        std::shared_ptr<PhysMem> pm = o.physmem ? o.physmem->pm : nullptr;
        auto h = std::make_unique<gmem_file>();
        {
            // The arch and the PhysMem may be another file's: created under its lock.
            std::unique_ptr<Lock> lk;
            if (pm)
                lk = std::make_unique<Lock>(pm->lock(), true);
            else if (arch->file)
                lk = std::make_unique<Lock>(arch->file->physmem().lock(), false);
            h->f = std::make_shared<GuestMemfd>(size_bytes, o.flags, o.folio_order, pm, arch,
                                                design, policy);
            if ((h->hooks = c_hooks(*arch)))
                h->hooks->handle = h.get();
        }
        *out = h.release();
        return GMEM_OK;
    });
}

gmem_status gmem_file_release(gmem_file *file)
{
    if (!file)
        return GMEM_OK;
    gmem_status s = GMEM_OK;
    {
        GuestMemfd &f = *file->f;
        if (f.physmem().lock().held_by_me() && f.in_operation())
            return fail(GMEM_ERR_REENTRANT, "an arch hook may not release the file it serves");
        if (!f.closed())
            s = file_op(file, true, [](GuestMemfd &g) { g.close(); });
    }
    gmem_status d = guarded([&] {
        std::shared_ptr<PhysMem> pm = file->f->physmem_ptr();
        Lock lk(pm->lock(), true); // the arch and the PhysMem may be shared: let go under it
        if (file->hooks && file->hooks->handle == file)
            file->hooks->handle = nullptr;
        file->f.reset();
        return GMEM_OK;
    });
    delete file;
    return s != GMEM_OK ? s : d;
}

gmem_status gmem_file_close(gmem_file *file)
{
    return file_op(file, true, [](GuestMemfd &f) { f.close(); });
}

gmem_status gmem_file_nr_pages(gmem_file *file, uint64_t *nr_pages)
{
    return guarded([&] {
        need(nr_pages, "nr_pages") = need(file, "file").f->nr_pages();
        return GMEM_OK;
    });
}

gmem_status gmem_file_fallocate(gmem_file *file, uint64_t start, uint64_t end)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.fallocate(start, end); });
}

gmem_status gmem_file_punch_hole(gmem_file *file, uint64_t start, uint64_t end)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.punch_hole(start, end); });
}

gmem_status gmem_file_add_folio(gmem_file *file, uint64_t index, unsigned order, uint64_t pfn)
{
    return file_op(file, true, [&](GuestMemfd &f) {
        if (order > MAX_ORDER)
            throw invalid("order", "must be in 0..18, got " + std::to_string(order));
        f.add_folio(index, order, pfn);
    });
}

gmem_status gmem_file_get_pfn(gmem_file *file, uint64_t index, uint64_t *pfn, unsigned *max_order)
{
    return file_op(file, true, [&](GuestMemfd &f) {
        auto r = f.get_pfn(index);
        if (pfn)
            *pfn = r.first;
        if (max_order)
            *max_order = r.second;
    });
}

gmem_status gmem_file_host_fault(gmem_file *file, uint64_t index, uint64_t *pfn)
{
    return file_op(file, true, [&](GuestMemfd &f) {
        uint64_t p = f.host_fault(index);
        if (pfn)
            *pfn = p;
    });
}

// Reads fault the page in: exclusive, like every operation that may change the file.
gmem_status gmem_file_guest_read(gmem_file *file, uint64_t index, uint64_t *token)
{
    return file_op(file, true, [&](GuestMemfd &f) {
        uint64_t &t = need(token, "token");
        t = f.guest_read(index);
    });
}

gmem_status gmem_file_host_read(gmem_file *file, uint64_t index, uint64_t *token)
{
    return file_op(file, true, [&](GuestMemfd &f) {
        uint64_t &t = need(token, "token");
        t = f.host_read(index);
    });
}

gmem_status gmem_file_guest_write(gmem_file *file, uint64_t index, uint64_t token)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.guest_write(index, token); });
}

gmem_status gmem_file_host_write(gmem_file *file, uint64_t index, uint64_t token)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.host_write(index, token); });
}

gmem_status gmem_file_pin(gmem_file *file, uint64_t index, uint64_t *pfn)
{
    return file_op(file, true, [&](GuestMemfd &f) {
        uint64_t p = f.pin(index);
        if (pfn)
            *pfn = p;
    });
}

gmem_status gmem_file_unpin(gmem_file *file, uint64_t index)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.unpin(index); });
}

gmem_status gmem_file_unpin_pfn(gmem_file *file, uint64_t pfn)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.unpin_pfn(pfn); });
}

gmem_status gmem_file_set_attributes(gmem_file *file, uint64_t start, uint64_t end,
                                     uint64_t attrs, uint64_t *error_index)
{
    gmem_status s =
        file_op(file, true, [&](GuestMemfd &f) { f.set_attributes(start, end, attrs); });
    if (s == GMEM_ERR_BUSY && error_index)
        *error_index = ::error_index;
    return s;
}

gmem_status gmem_file_set_memory_attributes2(gmem_file *file, uint64_t offset, uint64_t size,
                                             uint64_t attributes, uint64_t flags,
                                             uint64_t *error_offset)
{
    gmem_status s = file_op(file, true, [&](GuestMemfd &f) {
        f.set_memory_attributes2(offset, size, attributes, flags);
    });
    if (s == GMEM_ERR_BUSY && error_offset)
        *error_offset = ::error_index * PAGE_SIZE;
    return s;
}

gmem_status gmem_file_get_attributes(gmem_file *file, uint64_t index, uint64_t *attrs)
{
    return file_op(file, false, [&](GuestMemfd &f) {
        uint64_t &a = need(attrs, "attrs");
        f.check_open();
        a = f.get_attributes(index);
    });
}

gmem_status gmem_file_populate(gmem_file *file, uint64_t index, int has_token, uint64_t token)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.populate(index, has_token != 0, token); });
}

gmem_status gmem_file_memory_failure(gmem_file *file, uint64_t index)
{
    return file_op(file, true, [&](GuestMemfd &f) { f.memory_failure(index); });
}

gmem_status gmem_file_pfn_ranges(gmem_file *file, uint64_t start, uint64_t end,
                                 gmem_pfn_range *out, size_t cap, size_t *count)
{
    return file_op(file, false, [&](GuestMemfd &f) {
        size_t &n = need(count, "count");
        f.check_open();
        if (start > end)
            throw invalid("start", "must be <= end, got start=" + std::to_string(start) +
                                       " end=" + std::to_string(end));
        if (end > f.nr_pages())
            throw invalid("end", "must be <= nr_pages (" + std::to_string(f.nr_pages()) +
                                     "), got " + std::to_string(end));
        size_t total = f.cache().count(start, end);
        if (cap >= total && total) {
            need(out, "out");
            f.cache().pfn_ranges(start, end, reinterpret_cast<PfnRange *>(out));
        }
        n = total;
    });
}

gmem_status gmem_file_stats(gmem_file *file, gmem_stat *out, size_t cap, size_t *count)
{
    return file_op(file, false, [&](GuestMemfd &f) {
        size_t &n = need(count, "count");
        if (cap && !out)
            throw invalid("out", "must not be NULL when cap > 0");
        auto items = f.stats().items();
        for (size_t i = 0; i < items.size() && i < cap; i++)
            out[i] = gmem_stat{items[i].first, items[i].second};
        n = items.size();
    });
}

gmem_status gmem_file_stat(gmem_file *file, const char *name, uint64_t *value)
{
    return file_op(file, false, [&](GuestMemfd &f) {
        need(name, "name");
        std::string n = name;
        uint64_t &v = need(value, "value");
        std::string allowed;
        for (const auto &kv : f.stats().items()) {
            if (n == kv.first) {
                v = kv.second;
                return;
            }
            allowed += (allowed.empty() ? "" : ", ") + std::string(kv.first);
        }
        throw invalid("name", "unknown counter \"" + n + "\"; allowed: " + allowed);
    });
}

gmem_status gmem_file_check(gmem_file *file, void (*fn)(void *user, const gmem_violation *v),
                            void *user, size_t *count)
{
    std::vector<Violation> found;
    gmem_status s = file_op(file, false, [&](GuestMemfd &f) { found = f.check(); });
    if (s != GMEM_OK)
        return s;
    return guarded([&] {
        if (count)
            *count = found.size();
        for (const Violation &v : found) {
            std::string text = v.str();
            gmem_violation cv{v.arch.c_str(), v.rule.c_str(), v.detail.c_str(), v.index, v.pfn,
                              text.c_str()};
            if (fn)
                fn(user, &cv); // unlocked: the callback may call gmem
        }
        return GMEM_OK;
    });
}

gmem_status gmem_file_physmem(gmem_file *file, gmem_physmem **out)
{
    return guarded([&] {
        need(out, "out") = nullptr;
        auto h = std::make_unique<gmem_physmem>();
        h->pm = need(file, "file").f->physmem_ptr();
        *out = h.release();
        return GMEM_OK;
    });
}

} // extern "C"
