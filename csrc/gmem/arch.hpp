// SPDX-License-Identifier: MIT
// arch.hpp - the architecture hooks guest_memfd calls, and the built-in arch models.
//
// DOC: Arch
//
// An Arch is what KVM's arch code is to guest_memfd: a config (which hooks exist) and
// the hooks themselves.  The model calls them at the kernel's points; the names are the
// merged kernel's ("mainline" design) and, in brackets, the June 2026 thread's:
//
//     make_private(index, pfn, nr) guest fault on a private index    (CONVERT)
//       [prepare]                                                    [PREPARE]
//     make_shared(ranges)          private->shared conversion        (CONVERT)
//                                  ["split" design]  [FREE_ON_SHARED_CONVERSION]
//     reclaim(ranges)              a folio leaves the page cache     (RECLAIM)
//       [free_folio]               ["overloaded": also to-shared]    [FREE]
//     invalidate_range(...)        right after invalidate_start, "mainline" only
//                                                                    (INVALIDATE)
//     invalidate_start/_end        KVM's MMU notifications, always
//
// CONVERT is PREPARE + FREE_ON_SHARED_CONVERSION and RECLAIM is FREE: one config serves
// every design.  The C++ methods keep the thread's names (prepare, free_folio).
//
// make_shared and free_folio get the clamped PFN ranges of one folio batch (up to 31);
// an arch whose range hooks are blind (range_hooks_blind()) gets merged PFN extents.
// Per-PFN state (SNP's RMP, pKVM's ownership) lives in the file's PhysMem, as on a real
// machine.  Each model also checks its contract at the points where it can be broken
// (check_freed, check_host_reach) and says what a conversion does to page contents.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <typeinfo>
#include <vector>

#include "folio_cache.hpp"

namespace gmem {

class GuestMemfd;

enum : unsigned {
    CONFIG_PREPARE = 1,
    CONFIG_FREE = 2,
    CONFIG_FREE_ON_SHARED_CONVERSION = 4,
    CONFIG_INVALIDATE = 8,
    CONFIG_POPULATE = 16,
    CONFIG_CONVERT = CONFIG_PREPARE | CONFIG_FREE_ON_SHARED_CONVERSION,
    CONFIG_RECLAIM = CONFIG_FREE,
};
enum : unsigned { FILTER_SHARED = 1, FILTER_PRIVATE = 2 };
constexpr uint64_t ATTR_PRIVATE = 1 << 3; // KVM_MEMORY_ATTRIBUTE_PRIVATE
/// The token a page reads as after SNP converts it: its bytes seen through the other key.
constexpr uint64_t GARBLED = 0x6761726231656421ULL;

/// What a private<->shared conversion does to the contents of the pages it converts.
enum class Contents { Keep, Zero, Garble };

/// A broken contract: which arch, which rule, where, and what was seen.
struct Violation {
    std::string arch, rule;
    uint64_t index, pfn; // NO_PFN where not applicable
    std::string detail;
    std::string str() const;
};

class Arch {
public:
    virtual ~Arch() = default;
    virtual std::string name() const = 0;
    virtual unsigned config() const { return 0; }
    virtual Contents conversion_contents() const { return Contents::Keep; }

    virtual void prepare(GuestMemfd &, uint64_t /*index*/, uint64_t /*pfn*/, uint64_t /*nr*/) {}
    virtual void make_shared(GuestMemfd &, const PfnRange *, size_t) {}
    virtual void free_folio(GuestMemfd &, const PfnRange *, size_t) {}
    virtual void invalidate_start(GuestMemfd &, uint64_t, uint64_t, unsigned /*kinds*/) {}
    virtual void invalidate_end(GuestMemfd &, uint64_t, uint64_t) {}
    /// kvm_gmem_populate's post-populate callback (SNP LAUNCH_UPDATE, TDX PAGE.ADD):
    /// @index's page was populated, with @token (@has_token) or in place.  (POPULATE)
    virtual void post_populate(GuestMemfd &, uint64_t /*index*/, uint64_t /*pfn*/,
                               bool /*has_token*/, uint64_t /*token*/)
    {
    }
    /// kvm_arch_gmem_invalidate_range: after invalidate_start, "mainline" design only.
    virtual void invalidate_range(GuestMemfd &, uint64_t, uint64_t, unsigned /*kinds*/) {}

    /// Huge folios under the "hugetlb" policy (model notifications, not KVM hooks): the
    /// folio [index, index + 2**order) at @pfn is about to be split into order-0 folios
    /// (SNP: PSMASH its 2 MiB RMP entries; TDX: demote its 2 MiB S-EPT leaves), or its
    /// order-0 pieces were just merged back into one (SNP: 2 MiB RMP entries restored;
    /// TDX: promote).  Neither may fail.
    virtual void split_folio(GuestMemfd &, uint64_t /*index*/, uint64_t /*pfn*/,
                             unsigned /*order*/)
    {
    }
    virtual void merge_folio(GuestMemfd &, uint64_t /*index*/, uint64_t /*pfn*/,
                             unsigned /*order*/)
    {
    }

    /// The model is done handing out ranges for now (end of a conversion's walk, or of a
    /// batch of frees): an arch that defers work across ranges finishes it here.
    virtual void flush(GuestMemfd &) {}
    /// Model notifications, not KVM hooks: the guest mapped a block; attributes changed.
    virtual void guest_mapped(GuestMemfd &, uint64_t, uint64_t, uint64_t, bool /*priv*/) {}
    /// Does guest_mapped() do anything?  A loop of faults skips the call when it does not.
    virtual bool hears_guest_mapped() const { return true; }
    virtual void attributes_set(GuestMemfd &, uint64_t, uint64_t, uint64_t /*attrs*/) {}

    /// True when make_shared and free_folio touch nothing but the arch's own per-PFN state
    /// (the RMP): no page contents, nothing of the file, not even its violations.  A
    /// conversion then changes the contents of its folios in the same walk that hands
    /// out their ranges (no hook can tell), instead of all of them before the first hook.
    /// Blind hooks must also give the same result for ranges that continue one another
    /// handed over merged, as the walk then does: one call per PFN extent, in walk order.
    /// (So an arch that logs its calls is not blind.)
    /// The SNP model says true for itself only: a subclass, which may override a hook (a
    /// Python or C arch always may), says false unless it says otherwise.
    virtual bool range_hooks_blind() const { return false; }

    /// Contract checks: pages about to go back to the free pool; a page the host reaches.
    virtual void check_freed(const GuestMemfd &, uint64_t /*pfn*/, uint64_t /*nr*/,
                             std::vector<Violation> &) const
    {
    }
    virtual void check_host_reach(const GuestMemfd &, uint64_t /*index*/, uint64_t /*pfn*/,
                                  std::vector<Violation> &) const
    {
    }
    /// Contract checks over the arch's own state, for check().
    virtual void check_state(const GuestMemfd &, std::vector<Violation> &) const {}
    /// The contract rule broken when a page's contents differ from what is expected.
    virtual std::string contents_rule() const { return "contents-as-expected"; }

    virtual std::map<std::string, uint64_t> stats() const { return {}; }

    /// Set by the file that adopts this arch; one arch serves one file.
    GuestMemfd *file = nullptr;
    /// Set by a hook that wrote page contents (a scrub; any Python hook, which may): the
    /// conversion then checks the arch kept its promise about contents.
    bool contents_touched = false;
};

/// No gmem hooks at all: KVM_X86_SW_PROTECTED_VM.
class SwProtected : public Arch {
public:
    std::string name() const override { return "sw_protected"; }
    bool hears_guest_mapped() const override { return false; }
};

/*
 * SNP - AMD SEV-SNP: the RMP marks each PFN guest-assigned or not, in 4 KiB entries or
 * 2 MiB ones.  prepare assigns (RMPUPDATE); make_shared and free_folio give the pages
 * back (PSMASH first where a 2 MiB entry is only partly covered), one cache flush per
 * entry.  Conversion garbles contents: the page is read through the other key.
 */
class SNP : public Arch {
public:
    enum : uint64_t { RMP_SHARED = 0, RMP_4K = 1, RMP_2M = 2 };
    std::string name() const override { return "snp"; }
    unsigned config() const override
    {
        return CONFIG_CONVERT | CONFIG_RECLAIM | CONFIG_POPULATE;
    }
    Contents conversion_contents() const override { return Contents::Garble; }
    bool range_hooks_blind() const override { return typeid(*this) == typeid(SNP); }
    /// LAUNCH_UPDATE: the page is assigned in the RMP (4 KiB) and measured into the guest.
    void post_populate(GuestMemfd &f, uint64_t index, uint64_t pfn, bool has_token,
                       uint64_t token) override;
    void prepare(GuestMemfd &f, uint64_t index, uint64_t pfn, uint64_t nr) override;
    void make_shared(GuestMemfd &f, const PfnRange *r, size_t n) override;
    void free_folio(GuestMemfd &f, const PfnRange *r, size_t n) override;
    void flush(GuestMemfd &f) override;
    void split_folio(GuestMemfd &f, uint64_t index, uint64_t pfn, unsigned order) override;
    void merge_folio(GuestMemfd &f, uint64_t index, uint64_t pfn, unsigned order) override;
    void check_freed(const GuestMemfd &f, uint64_t pfn, uint64_t nr,
                     std::vector<Violation> &out) const override;
    void check_host_reach(const GuestMemfd &f, uint64_t index, uint64_t pfn,
                          std::vector<Violation> &out) const override;
    void check_state(const GuestMemfd &f, std::vector<Violation> &out) const override;
    std::map<std::string, uint64_t> stats() const override;

    /// Give [start_pfn, end_pfn) back to the host in the RMP.
    void rmp_make_shared(GuestMemfd &f, uint64_t start_pfn, uint64_t end_pfn);

    uint64_t rmp_updates = 0, psmash = 0, cache_flushes = 0, launch_updates = 0,
             rmp_2m_restores = 0;

private:
    PfnRange pending_{0, 0}; // ranges given back but not yet applied: they continue
};

/*
 * TDX - the TDX module owns private memory; KVM's gmem hooks are not used.  Zapping the
 * private mapping destroys the page: a conversion leaves the pages reading zero.
 *
 * The Secure EPT maps private memory in 4 KiB or 2 MiB leaves; the model keeps the 2 MiB
 * ones (a private guest fault of a 2 MiB block maps one).  A zap that covers a 2 MiB
 * leaf in part, and the split of a huge folio, demote it first (TDH.MEM.PAGE.DEMOTE);
 * a demote can fail with TDX_OPERAND_BUSY while vCPUs run, and KVM retries it with the
 * vCPUs kicked out.  @demote_busy_every makes every n-th attempt fail that way (0: none).
 * A merge of a huge folio promotes its 2 MiB regions (TDH.MEM.PAGE.PROMOTE).
 */
class TDX : public Arch {
public:
    explicit TDX(uint64_t demote_busy_every = 0) : busy_every_(demote_busy_every) {}
    std::string name() const override { return "tdx"; }
    unsigned config() const override { return CONFIG_POPULATE; }
    /// PAGE.ADD: the TDX module copies the page into the TD and measures it.
    void post_populate(GuestMemfd &, uint64_t, uint64_t, bool, uint64_t) override
    {
        pages_added++;
    }
    void guest_mapped(GuestMemfd &f, uint64_t index, uint64_t pfn, uint64_t nr,
                      bool priv) override;
    void invalidate_start(GuestMemfd &f, uint64_t start, uint64_t end, unsigned kinds) override;
    void split_folio(GuestMemfd &f, uint64_t index, uint64_t pfn, unsigned order) override;
    void merge_folio(GuestMemfd &f, uint64_t index, uint64_t pfn, unsigned order) override;
    void check_state(const GuestMemfd &f, std::vector<Violation> &out) const override;
    std::map<std::string, uint64_t> stats() const override;
    Contents conversion_contents() const override { return Contents::Zero; }
    std::string contents_rule() const override { return "converted-page-reads-zero"; }
    uint64_t demote_busy_every() const { return busy_every_; }

    uint64_t pages_added = 0, demotes = 0, demote_busy = 0, promotes = 0;

private:
    uint64_t busy_every_, attempts_ = 0;
    std::set<uint64_t> leaves_2m_; // file index of each 2 MiB S-EPT leaf
    void demote(uint64_t region);
};

/*
 * PKVM - pKVM on arm64: the hypervisor tracks who owns each page (host, guest, or shared
 * by the guest with the host).  Ownership moves when the host records the guest's
 * share/unshare hypercall (set_attributes).  Conversion must keep the page and its
 * contents in place; teardown (free_folio) must scrub the page before the host gets it.
 */
class PKVM : public Arch {
public:
    enum : uint64_t { OWNER_HOST = 0, OWNER_GUEST = 1, OWNER_SHARED = 2 };
    std::string name() const override { return "pkvm"; }
    unsigned config() const override { return CONFIG_FREE; }
    void free_folio(GuestMemfd &f, const PfnRange *r, size_t n) override;
    void guest_mapped(GuestMemfd &f, uint64_t index, uint64_t pfn, uint64_t nr,
                      bool priv) override;
    void attributes_set(GuestMemfd &f, uint64_t start, uint64_t end, uint64_t attrs) override;
    void check_freed(const GuestMemfd &f, uint64_t pfn, uint64_t nr,
                     std::vector<Violation> &out) const override;
    void check_host_reach(const GuestMemfd &f, uint64_t index, uint64_t pfn,
                          std::vector<Violation> &out) const override;
    std::string contents_rule() const override { return "conversion-keeps-guest-data"; }
    std::map<std::string, uint64_t> stats() const override;

    uint64_t pages_scrubbed = 0, pages_donated = 0, pages_shared = 0;

private:
    void set_owner(PhysMem &pm, uint64_t start_pfn, uint64_t end_pfn, uint64_t owner);
};

/// One logged hook call: the hook and its integer arguments (a range hook logs one entry
/// per range).
struct HookCall {
    const char *hook; // a string literal: logging a call allocates nothing
    uint64_t a, b, c;
};

/*
 * Recorder - logs every hook call; does nothing else.  Its config is whatever it is given.
 *
 * The log has a lock of its own: an operation appends to it under the model lock, possibly
 * with the GIL released, while another thread reads or clears it without that lock (the
 * reader may not even know which file the Recorder serves any more).
 */
class Recorder : public Arch {
public:
    explicit Recorder(unsigned config) : config_(config) {}
    std::string name() const override { return "recorder"; }
    unsigned config() const override { return config_; }
    /// Logged under the names of the file's design: make_private and reclaim under
    /// "mainline", prepare and free_folio under "split" and "overloaded".
    void prepare(GuestMemfd &f, uint64_t index, uint64_t pfn, uint64_t nr) override;
    void make_shared(GuestMemfd &, const PfnRange *r, size_t n) override
    {
        log_ranges("make_shared", r, n);
    }
    void free_folio(GuestMemfd &f, const PfnRange *r, size_t n) override;
    void invalidate_start(GuestMemfd &, uint64_t start, uint64_t end, unsigned kinds) override
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        calls_.push_back({"invalidate_start", start, end, kinds});
    }
    void invalidate_end(GuestMemfd &, uint64_t start, uint64_t end) override
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        calls_.push_back({"invalidate_end", start, end, 0});
    }
    void invalidate_range(GuestMemfd &, uint64_t start, uint64_t end, unsigned kinds) override
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        calls_.push_back({"invalidate_range", start, end, kinds});
    }
    void post_populate(GuestMemfd &, uint64_t index, uint64_t pfn, bool has_token,
                       uint64_t token) override
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        calls_.push_back({"post_populate", index, pfn, has_token ? token : NO_PFN});
    }
    std::map<std::string, uint64_t> stats() const override
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        return {{"calls", calls_.size()}};
    }

    /// A copy of the log, taken under its lock.
    std::vector<HookCall> calls() const
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        return calls_;
    }
    void clear()
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        calls_.clear();
    }

private:
    unsigned config_;
    mutable std::mutex log_lock_;
    std::vector<HookCall> calls_;

    void log_ranges(const char *hook, const PfnRange *r, size_t n)
    {
        std::lock_guard<std::mutex> lk(log_lock_);
        for (size_t i = 0; i < n; i++)
            calls_.push_back({hook, r[i].start_pfn, r[i].end_pfn, 0});
    }
};

} // namespace gmem
