// SPDX-License-Identifier: MIT
// guest_memfd.hpp - GuestMemfd: one guest_memfd file, its lifecycle and its conversions.
//
// DOC: GuestMemfd
//
// The inode's state: the page cache (FolioCache), the attribute map (IntervalMap: every
// index shared or PRIVATE), the pins and host mappings of its pages, and, for the
// contract checker, the contents each populated index is expected to hold.  Physical
// memory (PhysMem) may be shared by many files, like the RAM of one host.
//
//     index:   0        512       1024      1536
//     folios:  [ 2 MiB  ][ hole    ][ 2 MiB  ]        cache_ (index -> pfn, order)
//     attrs:   [ PRIVATE           )[ SHARED ]        attrs_ (runs)
//     mapped:                         ^  ^            host-mapped pages
//
// Every operation validates all of its arguments and checks every failure condition
// before it changes anything: a call that raises changes nothing and calls no hook.
// Hooks run after the point of no return; one that fails (a Python exception) cannot
// stop the operation, which completes and records a violation.
//
// Locking: every operation runs under the PhysMem's ModelLock, held exclusively (the
// role of the inode's invalidate lock, widened to the whole machine because the RMP and
// the free pool are shared).  Callers take it; nothing here locks.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "arch.hpp"
#include "folio_cache.hpp"
#include "interval_map.hpp"
#include "page_set.hpp"
#include "physmem.hpp"

namespace gmem {

constexpr uint64_t PAGE_SIZE = 4096;
/// Folios a punch takes out of the page cache at a time (bounds its memory).
constexpr size_t RELEASE_CHUNK = 65536;
/// What one folio costs the page cache in host memory, at least: a request that needs more
/// than the host has available is refused up front instead of exhausting it.
constexpr uint64_t FOLIO_BYTES = 12; // 12.5 in full leaves
/// The largest file (in pages) that gets a PhysMem of its own when none is given.
constexpr uint64_t DEFAULT_PHYSMEM_LIMIT = uint64_t(1) << 40;
enum : uint64_t { FLAG_MMAP = 1, FLAG_INIT_SHARED = 2 };

/// EAGAIN from a to-private conversion: a folio in the range is pinned or mapped elsewhere.
struct ConversionBusy : std::runtime_error {
    ConversionBusy(const std::string &what, uint64_t index)
        : std::runtime_error(what), error_index(index)
    {
    }
    uint64_t error_index;
};

/// A poisoned folio (memory failure): kvm_gmem_get_pfn's -EHWPOISON, and SIGBUS on access.
struct HWPoison : std::runtime_error {
    HWPoison(const std::string &what, uint64_t index) : std::runtime_error(what), index(index) {}
    uint64_t index;
};

/// Host access refused: the mmap fault would raise SIGBUS.
struct SigBus : std::runtime_error {
    SigBus(const std::string &what, uint64_t index) : std::runtime_error(what), index(index) {}
    uint64_t index;
};

/*
 * BulkCall - the progress of one bulk call (get_pfns, guest_read_many, ...): @done counts
 * the elements completed.  @between, if set, is asked after each element (with @arg):
 * true ends the call there, that element done - how an embedder stops a batch whose hook
 * failed, as the single call would have raised after it.
 */
struct BulkCall {
    size_t done = 0;
    bool (*between)(void *arg) = nullptr;
    void *arg = nullptr;
};

/// Which hook set the file runs: the kernel as merged (the default), or the two designs of
/// the June 2026 thread.
enum class HookDesign { Mainline, Split, Overloaded };
const char *design_name(HookDesign d);

/// What a conversion does to a huge folio it covers in part: "none" never splits (round
/// 1, the kernel as merged); "hugetlb" is the guest_memfd HugeTLB series' policy - split on
/// share, merge on unshare, zero on partial punch (docs/model.md, "Huge folios").
enum class HugePolicy { None, HugeTLB };
const char *policy_name(HugePolicy p);

struct GmemStats {
    uint64_t folios_allocated = 0, folios_freed = 0, pages_zeroed = 0, conversions = 0,
             conversions_noop = 0, conversions_busy = 0, pages_converted = 0,
             invalidations = 0, prepare_calls = 0, make_shared_calls = 0, free_calls = 0,
             hook_ranges = 0, invalidate_range_calls = 0, pages_populated = 0,
             memory_failures = 0, folio_splits = 0, folio_merges = 0, merges_blocked = 0,
             pages_punched_zeroed = 0;
    std::vector<std::pair<const char *, uint64_t>> items() const;
};

/// One folio as GuestMemfd::folios() reports it.
struct FolioInfo {
    Folio folio;
    uint32_t pins, mapped;
};

/// Shared ownership (enable_shared_from_this) lets a binding tell a live file from one
/// whose last owner is gone and which is being closed by its deleter.
class GuestMemfd : public std::enable_shared_from_this<GuestMemfd> {
public:
    /// @physmem null: a private PhysMem of the file's size rounded up to whole folios.
    GuestMemfd(uint64_t size, uint64_t flags, unsigned folio_order,
               std::shared_ptr<PhysMem> physmem, std::shared_ptr<Arch> arch,
               HookDesign design, HugePolicy huge_policy = HugePolicy::None);
    ~GuestMemfd();
    GuestMemfd(const GuestMemfd &) = delete;
    GuestMemfd &operator=(const GuestMemfd &) = delete;

    uint64_t size() const { return nr_pages_ * PAGE_SIZE; }
    uint64_t nr_pages() const { return nr_pages_; }
    uint64_t flags() const { return flags_; }
    unsigned folio_order() const { return folio_order_; }
    unsigned config() const { return config_; }
    HookDesign hook_design() const { return design_; }
    HugePolicy huge_policy() const { return policy_; }
    /// Under "hugetlb": the huge block (2**folio_order pages) holding @index.
    uint64_t huge_block(uint64_t index) const
    {
        return index & ~((uint64_t(1) << folio_order_) - 1);
    }
    bool closed() const { return closed_; }
    PhysMem &physmem() { return *pm_; }
    const PhysMem &physmem() const { return *pm_; }
    const std::shared_ptr<PhysMem> &physmem_ptr() const { return pm_; }
    Arch &arch() { return *arch_; }
    const std::shared_ptr<Arch> &arch_ptr() const { return arch_; }
    const GmemStats &stats() const { return stats_; }
    const IntervalMap &attrs() const { return attrs_; }
    const FolioCache &cache() const { return cache_; }
    /// True while an operation that changes this file runs (its hooks may only read it).
    bool in_operation() const { return in_operation_; }
    void set_in_operation(bool on) { in_operation_ = on; }

    void fallocate(uint64_t start, uint64_t end);
    void punch_hole(uint64_t start, uint64_t end);
    void close();
    void add_folio(uint64_t index, unsigned order, uint64_t pfn);

    /// Guest fault: the page's PFN and the order of the block KVM may map (and prepare).
    std::pair<uint64_t, unsigned> get_pfn(uint64_t index);
    /// Host mmap fault: the page's PFN; throws SigBus where the host may not go.
    uint64_t host_fault(uint64_t index);
    uint64_t guest_read(uint64_t index);
    void guest_write(uint64_t index, uint64_t token);
    uint64_t host_read(uint64_t index);
    void host_write(uint64_t index, uint64_t token);
    uint64_t pin(uint64_t index);
    void unpin(uint64_t index);
    void unpin_pfn(uint64_t pfn);
    /// kvm_gmem_populate: fill a private page without zeroing or make_private; @token, or
    /// (has_token false) in place; then the arch's post_populate (POPULATE).
    void populate(uint64_t index, bool has_token, uint64_t token);
    /// error_remove_folio: poison the folio holding @index until it is punched out.
    void memory_failure(uint64_t index);

    void set_attributes(uint64_t start, uint64_t end, uint64_t attrs);
    void set_memory_attributes2(uint64_t offset, uint64_t size, uint64_t attributes,
                                uint64_t flags);
    uint64_t get_attributes(uint64_t index) const;

    /*
     * Bulk forms (DOC: Bulk operations in guest_memfd.cpp): element k has exactly the
     * effect of the single call on element k, in order.  An element that throws leaves
     * the elements before it applied and changes nothing itself; the rest do not run.
     * call.done says how many completed, also when the call is Interrupted between two.
     */
    void get_pfns(const uint64_t *index, size_t n, uint64_t *pfn, uint8_t *order,
                  BulkCall &call);
    void guest_read_many(const uint64_t *index, size_t n, uint64_t *token, BulkCall &call);
    void guest_write_many(const uint64_t *index, const uint64_t *token, size_t n,
                          BulkCall &call);
    void host_read_many(const uint64_t *index, size_t n, uint64_t *token, BulkCall &call);
    void host_write_many(const uint64_t *index, const uint64_t *token, size_t n,
                         BulkCall &call);
    void set_attributes_many(const uint64_t *start, const uint64_t *end, const uint64_t *attrs,
                             size_t n, BulkCall &call);

    std::vector<FolioInfo> folios(uint64_t start, uint64_t end) const;
    std::vector<Violation> check() const;
    void record(Violation v) { violations_.push_back(std::move(v)); }
    std::string dump() const;

    /// Argument checks (ValueError in Python), shared with the bindings.
    void check_open() const;
    void check_index(uint64_t index) const;
    void check_range(uint64_t start, uint64_t end) const;
    uint64_t pins_in(uint64_t pfn, uint64_t nr) const;
    uint64_t mapped_in(uint64_t start, uint64_t end) const;

private:
    uint64_t nr_pages_, flags_;
    unsigned folio_order_, config_;
    HookDesign design_;
    HugePolicy policy_;
    std::shared_ptr<PhysMem> pm_;
    std::shared_ptr<Arch> arch_;
    IntervalMap attrs_;
    ContentMap expected_; // the token each populated index should hold
    FolioCache cache_;
    std::map<uint64_t, uint32_t> pins_;  // pfn -> pin count
    PageSet mapped_;                     // host-mapped indexes
    std::map<uint64_t, unsigned> orphans_; // pfn -> order: punched out while pinned
    std::map<uint64_t, uint64_t> poisoned_; // start -> end: file pages of poisoned folios
    std::map<uint64_t, uint64_t> punched_;  // start -> end: "hugetlb" pages punched, kept
    std::vector<Violation> violations_;
    GmemStats stats_;
    bool closed_ = false, in_operation_ = false;
    bool hears_mapped_; // arch_->hears_guest_mapped(), asked once
    // Bulk calls over scattered indexes sort and look up through this, kept from one call
    // to the next (at most 24 bytes a chunk element; freed by close()): fresh memory each
    // call cost a page fault every 4 KiB, about 8 ns an index.
    std::vector<uint64_t> scratch_;

    /*
     * FaultMemo - what the faults of one call may reuse from one another: a window of
     * copies of the folios at and after the last index faulted, and the attribute run
     * holding it.  Nothing a fault does invalidates either: it only adds folios in holes
     * and marks folios uptodate (through the window's own copy), and its hooks may not
     * change the file.  A memo lives for one call.
     */
    struct FaultMemo {
        static constexpr size_t AHEAD = 64; // folios fetched at once when walking forward
        Folio window[AHEAD];
        size_t n = 0, pos = 0;
        Run run{0, 0, 0};
        PageSet::Hint mapped; // the run of mapped_ host_fault saw last
        const uint64_t *pre = nullptr; // the next fault's folio, found ahead (bulk_faults)
        Folio found;                   // ... unpacked
    };
    /// Bulk calls over scattered indexes find their folios a chunk at a time, in order.
    static constexpr size_t SCATTER_CHUNK = size_t(1) << 20;
    /// A run of consecutive indexes goes as one block of at most this many elements.
    static constexpr size_t RUN_MAX = 4096;

    Folio alloc_folio(uint64_t index, bool *oom);
    void fill_holes(uint64_t start, uint64_t end,
                    std::vector<std::pair<uint64_t, uint64_t>> &got, uint64_t &allocated);
    Folio fault_in(uint64_t index);
    Folio &fault_in(uint64_t index, FaultMemo &m);
    Folio &refill(uint64_t index, FaultMemo &m);
    const Run &attr_run(uint64_t index, FaultMemo &m) const;
    std::pair<uint64_t, unsigned> fault_guest(uint64_t index, FaultMemo &m);
    void guest_fault_hooks(uint64_t block, uint64_t block_pfn, unsigned order, bool priv);
    uint64_t fault_host(uint64_t index, FaultMemo &m);
    void map_host(uint64_t index, FaultMemo &m);
    template <class Fn>
    void bulk(size_t n, BulkCall &call, Fn &&element);
    template <class Fn, class RunFn>
    void bulk_faults(const uint64_t *index, size_t n, BulkCall &call, FaultMemo &m,
                     Fn &&element, RunFn &&run);
    template <class Op>
    bool guest_run(const uint64_t *index, size_t k, size_t limit, const uint64_t *pre,
                   FaultMemo &m, size_t &done, Op &&op);
    template <class Op>
    bool host_run(const uint64_t *index, size_t k, size_t limit, const uint64_t *pre,
                  FaultMemo &m, size_t &done, Op &&op);
    template <class Op>
    bool guest_scattered(const uint64_t *index, size_t k, size_t limit, const uint64_t *pre,
                         FaultMemo &m, size_t &done, Op &&op);
    template <class Op>
    bool host_scattered(const uint64_t *index, size_t k, size_t limit, const uint64_t *pre,
                        FaultMemo &m, size_t &done, Op &&op);
    void find_folios(const uint64_t *index, size_t n, uint64_t *out, uint64_t *key,
                     uint64_t *tmp) const;
    void zero_folio(Folio &f);
    unsigned max_order(const Folio &f, uint64_t index, const Run &run, uint64_t *block) const;
    void reclaim(const Folio *folios, size_t n);
    void give_back(const Folio &f);
    std::vector<uint64_t> pinned_state(uint64_t pfn, uint64_t nr) const;
    void release_range(uint64_t start, uint64_t end, bool with_orphans,
                       std::vector<Folio> *buffer = nullptr);
    struct ContentsChange;
    void convert_contents(uint64_t start, uint64_t end, uint64_t attrs, uint64_t token);
    void hook_walk(uint64_t start, uint64_t end);
    void convert_fused(uint64_t start, uint64_t end, uint64_t attrs, uint64_t token);
    void count_hook_ranges(uint64_t n, bool free_hook);
    void bad_hook_range(uint64_t index, uint64_t pfn);
    void check_hook_ranges(uint64_t start, uint64_t end);
    void deliver_ranges(const PfnRange *ranges, unsigned n, bool free_hook);
    void convert_walk(uint64_t start, uint64_t end, uint64_t attrs, bool hooked);
    void invalidate_begin(uint64_t start, uint64_t end, unsigned kinds);
    void check_poison(uint64_t index) const;
    void unpoison(uint64_t start, uint64_t end);
    bool poisoned_in(uint64_t start, uint64_t end) const;
    // The "hugetlb" policy (guest_memfd_huge.cpp).
    bool hugetlb() const { return policy_ == HugePolicy::HugeTLB; }
    uint64_t huge_pages() const { return uint64_t(1) << folio_order_; }
    void split_huge(const Folio &f);
    std::vector<Folio> split_for_share(uint64_t start, uint64_t end);
    void merge_after_unshare(uint64_t start, uint64_t end);
    void split_if_shared(const Folio &f);
    void punch_huge(uint64_t start, uint64_t end);
    void touch(uint64_t start, uint64_t end);
    void check_huge(std::vector<Violation> &out) const;
    void check_contents(uint64_t start, uint64_t end, std::vector<Violation> &out) const;
    Violation violation(const std::string &rule, uint64_t index, uint64_t pfn,
                        const std::string &detail) const;
};

} // namespace gmem
