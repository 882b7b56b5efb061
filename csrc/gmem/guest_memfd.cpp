// SPDX-License-Identifier: MIT
// guest_memfd.cpp - GuestMemfd operations: faults, fallocate, punch, conversion, teardown.
#include "guest_memfd.hpp"

#include <algorithm>
#include <sstream>
#include <tuple>


#include "errors.hpp"
#include "host.hpp"
#include "interrupt.hpp"

#define GMEM_UNLIKELY(x) __builtin_expect(!!(x), 0)

namespace gmem {

// The kernel's branch hints: the hot loops of a conversion lay out their usual case
// straight through (a fifth of a to-shared conversion's time, measured).
#if defined(__GNUC__)
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#else
#define likely(x) (x)
#define unlikely(x) (x)
#endif

static inline uint64_t pages(unsigned order) { return uint64_t(1) << order; }


const char *design_name(HookDesign d)
{
    switch (d) {
    case HookDesign::Mainline:
        return "mainline";
    case HookDesign::Split:
        return "split";
    default:
        return "overloaded";
    }
}

std::vector<std::pair<const char *, uint64_t>> GmemStats::items() const
{
    return {{"folios_allocated", folios_allocated},
            {"folios_freed", folios_freed},
            {"pages_zeroed", pages_zeroed},
            {"conversions", conversions},
            {"conversions_noop", conversions_noop},
            {"conversions_busy", conversions_busy},
            {"pages_converted", pages_converted},
            {"invalidations", invalidations},
            {"prepare_calls", prepare_calls},
            {"make_shared_calls", make_shared_calls},
            {"free_calls", free_calls},
            {"hook_ranges", hook_ranges},
            {"invalidate_range_calls", invalidate_range_calls},
            {"pages_populated", pages_populated},
            {"memory_failures", memory_failures},
            {"folio_splits", folio_splits},
            {"folio_merges", folio_merges},
            {"merges_blocked", merges_blocked},
            {"pages_punched_zeroed", pages_punched_zeroed}};
}

static uint64_t checked_nr_pages(uint64_t size, uint64_t flags, unsigned folio_order,
                                 const Arch *arch, HugePolicy policy)
{
    if (size == 0)
        throw invalid("size", "must be > 0");
    if (size % PAGE_SIZE)
        throw invalid("size", "must be a multiple of PAGE_SIZE (4096), got " +
                                  std::to_string(size));
    if (flags & ~uint64_t(FLAG_MMAP | FLAG_INIT_SHARED))
        throw invalid("flags", "unknown bits " + hex(flags & ~uint64_t(3)) +
                                   "; allowed: FLAG_MMAP (1) | FLAG_INIT_SHARED (2)");
    if (folio_order > MAX_ORDER)
        throw invalid("folio_order", "must be in 0..18, got " + std::to_string(folio_order));
    if (!arch)
        throw invalid("arch", "must be an Arch");
    if (arch->file)
        throw invalid("arch", "this Arch already serves another file; create one per file");
    if (policy == HugePolicy::HugeTLB) {
        if (folio_order == 0)
            throw invalid("folio_order", "huge_policy 'hugetlb' needs huge folios: must be in "
                                         "1..18, got 0");
        uint64_t huge = PAGE_SIZE << folio_order;
        if (size % huge)
            throw invalid("size", "under huge_policy 'hugetlb' must be a multiple of the folio "
                                  "size (" + std::to_string(huge) + " bytes), got " +
                                      std::to_string(size));
    }
    return size / PAGE_SIZE;
}

static std::shared_ptr<PhysMem> default_physmem(uint64_t nr_pages, unsigned folio_order)
{
    // Its free lists start with one block per 1 GiB: beyond 4 PiB that is millions.
    if (nr_pages > DEFAULT_PHYSMEM_LIMIT)
        throw invalid("physmem", "a file of " + std::to_string(nr_pages) +
                                     " pages needs an explicit PhysMem (the default one is "
                                     "the file's size, up to 2**40 pages)");
    uint64_t nr = pages(folio_order);
    return std::make_shared<PhysMem>((nr_pages + nr - 1) & ~(nr - 1));
}

GuestMemfd::GuestMemfd(uint64_t size, uint64_t flags, unsigned folio_order,
                       std::shared_ptr<PhysMem> physmem, std::shared_ptr<Arch> arch,
                       HookDesign design, HugePolicy huge_policy)
    : nr_pages_(checked_nr_pages(size, flags, folio_order, arch.get(), huge_policy)),
      flags_(flags), folio_order_(folio_order), config_(arch->config()), design_(design),
      policy_(huge_policy),
      pm_(physmem ? std::move(physmem) : default_physmem(nr_pages_, folio_order)),
      arch_(std::move(arch)), attrs_(nr_pages_, (flags & FLAG_INIT_SHARED) ? 0 : ATTR_PRIVATE),
      expected_(nr_pages_, 0), mapped_(nr_pages_), hears_mapped_(arch_->hears_guest_mapped())
{
    arch_->file = this;
}

GuestMemfd::~GuestMemfd()
{
    try {
        close();
    } catch (...) {
        // A destructor must not throw; close() only fails through a hook, already recorded.
    }
    if (arch_->file == this)
        arch_->file = nullptr;
}

Violation GuestMemfd::violation(const std::string &rule, uint64_t index, uint64_t pfn,
                                const std::string &detail) const
{
    return Violation{arch_->name(), rule, index, pfn, detail};
}

std::string Violation::str() const
{
    std::ostringstream os;
    os << arch << ": " << rule << " at index ";
    if (index == NO_PFN)
        os << "-";
    else
        os << index;
    os << ", pfn ";
    if (pfn == NO_PFN)
        os << "-";
    else
        os << hex(pfn);
    os << ": " << detail;
    return os.str();
}

void GuestMemfd::check_open() const
{
    if (closed_)
        throw invalid("self", "operation on a closed guest_memfd");
}

void GuestMemfd::check_index(uint64_t index) const
{
    if (index >= nr_pages_)
        throw invalid("index", "must be < nr_pages (" + std::to_string(nr_pages_) + "), got " +
                                   std::to_string(index));
}

void GuestMemfd::check_range(uint64_t start, uint64_t end) const
{
    if (start >= end)
        throw invalid("start", "must be < end, got start=" + std::to_string(start) +
                                   " end=" + std::to_string(end));
    if (end > nr_pages_)
        throw invalid("end", "must be <= nr_pages (" + std::to_string(nr_pages_) + "), got " +
                                 std::to_string(end));
}

uint64_t GuestMemfd::pins_in(uint64_t pfn, uint64_t nr) const
{
    uint64_t n = 0;
    for (auto it = pins_.lower_bound(pfn); it != pins_.end() && it->first < pfn + nr; ++it)
        n += it->second;
    return n;
}

uint64_t GuestMemfd::mapped_in(uint64_t start, uint64_t end) const
{
    return mapped_.count(start, end);
}

/*
 * alloc_folio - allocate the folio for the hole at @index: the naturally aligned block of
 * folio_order around it, or the largest smaller order whose block fits in the file,
 * overlaps no folio and can be had from PhysMem.  Sets *oom when not even one page can.
 * Under "hugetlb" only the huge block will do, and it is split at once if a page of it is
 * shared.  Host memory running out (bad_alloc) changes nothing: the PFN goes back.
 */
Folio GuestMemfd::alloc_folio(uint64_t index, bool *oom)
{
    // A HugeTLB pool hands out huge pages only: no smaller fallback.
    for (int o = int(folio_order_), lowest = hugetlb() ? o : 0; o >= lowest; o--) {
        uint64_t block = index & ~(pages(unsigned(o)) - 1);
        if (block + pages(unsigned(o)) > nr_pages_ ||
            cache_.count(block, block + pages(unsigned(o))))
            continue;
        uint64_t pfn;
        if (pm_->try_alloc(unsigned(o), &pfn)) {
            Folio f{block, pfn, unsigned(o), false};
            try {
                cache_.add(block, unsigned(o), pfn);
                try {
                    if (hugetlb())
                        split_if_shared(f);
                } catch (...) {
                    cache_.remove(block);
                    throw;
                }
            } catch (...) {
                pm_->free_unchecked(pfn, unsigned(o)); // the block as handed out: no allocation
                throw;
            }
            stats_.folios_allocated++;
            *oom = false;
            return f;
        }
    }
    *oom = true;
    return Folio{};
}

/* The folio of @index, allocated if it is a hole; OutOfMemory changes nothing. */
Folio GuestMemfd::fault_in(uint64_t index)
{
    Folio f;
    if (cache_.lookup(index, &f))
        return f;
    bool oom;
    f = alloc_folio(index, &oom);
    if (oom)
        throw OutOfMemory("guest_memfd: no free page for index " + std::to_string(index));
    if (hugetlb())
        cache_.lookup(index, &f); // it may have been split

    return f;
}

/*
 * fault_in - the folio of @index, allocated if it is a hole (OutOfMemory changes
 * nothing), as a reference into @m's window.  A call walking forward fetches the next
 * AHEAD folios with one search (refill), so a run of neighbouring faults costs one search
 * per AHEAD folios instead of one per fault.
 */
inline Folio &GuestMemfd::fault_in(uint64_t index, FaultMemo &m)
{
    if (m.pre) { // found ahead: good while uptodate (nothing clears that, or removes it)
        uint64_t v = *m.pre;
        m.pre = nullptr;
        if (v & 1) {
            unsigned order = unsigned(v >> 1) & 31;
            m.found = Folio{index & ~(pages(order) - 1), v >> 8, order, true};
            return m.found;
        }
    }
    while (m.pos < m.n && m.window[m.pos].end() <= index)
        m.pos++;
    if (m.pos < m.n && m.window[m.pos].index <= index)
        return m.window[m.pos];
    return refill(index, m);
}

[[gnu::noinline]] Folio &GuestMemfd::refill(uint64_t index, FaultMemo &m)
{
    // Just past the window: the call walks forward, fetch ahead.  Else one lookup.
    bool forward = m.n && index >= m.window[m.n - 1].end() &&
                   index - m.window[m.n - 1].end() < FaultMemo::AHEAD;
    m.pos = 0;
    if (forward) {
        // The folios of the next AHEAD pages, straight off the leaves: at most AHEAD.
        size_t n = 0;
        cache_.for_each_clamped(index, std::min(nr_pages_, index + FaultMemo::AHEAD),
                                [&](const Folio &f, const PfnRange &) { m.window[n++] = f; });
        m.n = n;
        if (m.n && m.window[0].index <= index)
            return m.window[0];
    } else if (cache_.lookup(index, &m.window[0])) {
        m.n = 1;
        return m.window[0];
    }
    m.n = 0; // a hole: the window no longer starts at the index
    bool oom;
    Folio f = alloc_folio(index, &oom);
    if (oom)
        throw OutOfMemory("guest_memfd: no free page for index " + std::to_string(index));
    if (hugetlb())
        cache_.lookup(index, &f); // it may have been split
    m.window[0] = f;
    m.n = 1;
    return m.window[0];
}

/* The attribute run holding @index, from @m while the index stays inside it. */
inline const Run &GuestMemfd::attr_run(uint64_t index, FaultMemo &m) const
{
    if (index < m.run.start || index >= m.run.end)
        m.run = attrs_.run_at(index);
    return m.run;
}

/* First touch: zero the folio and mark it uptodate. */
[[gnu::noinline]] void GuestMemfd::zero_folio(Folio &f)
{
    if (f.uptodate)
        return;
    pm_->fill(f.pfn, f.nr_pages(), 0);
    cache_.set_uptodate(f.index, true);
    f.uptodate = true;
    expected_.store(f.index, f.end(), 0);
    stats_.pages_zeroed += f.nr_pages();
}

/*
 * The largest naturally aligned block around @index, inside @f, of one attribute: inside
 * @run, the attribute run holding @index (runs are maximal).
 */
inline unsigned GuestMemfd::max_order(const Folio &f, uint64_t index, const Run &run,
                                      uint64_t *block) const
{
    for (unsigned o = f.order; o > 0; o--) {
        uint64_t b = index & ~(pages(o) - 1);
        if (b >= run.start && b + pages(o) <= run.end) {
            *block = b;
            return o;
        }
    }
    *block = index;
    return 0;
}

/* A poisoned folio's pages fail every access until it is punched out. */
void GuestMemfd::check_poison(uint64_t index) const
{
    auto it = poisoned_.upper_bound(index);
    if (it != poisoned_.begin() && index < std::prev(it)->second)
        throw HWPoison("index " + std::to_string(index) +
                           ": the folio had a memory failure (EHWPOISON); punch it out",
                       index);
}

/*
 * fault_guest - one guest fault, through @m.  Inline in the bulk loops: the common case (a
 * present, uptodate folio of the window, no poison, the attribute run remembered) is a
 * few compares and the arch's guest_mapped call; the rest is out of line.
 */
/* What a guest fault tells the arch about the block it maps: guest_mapped, and prepare. */
inline void GuestMemfd::guest_fault_hooks(uint64_t block, uint64_t block_pfn, unsigned order,
                                          bool priv)
{
    if (hears_mapped_)
        arch_->guest_mapped(*this, block, block_pfn, pages(order), priv);
    if (priv && (config_ & CONFIG_PREPARE)) {
        stats_.prepare_calls++;
        arch_->prepare(*this, block, block_pfn, pages(order));
    }
}

inline std::pair<uint64_t, unsigned> GuestMemfd::fault_guest(uint64_t index, FaultMemo &m)
{
    if (GMEM_UNLIKELY(closed_ || index >= nr_pages_)) {
        check_open();
        check_index(index);
    }
    if (GMEM_UNLIKELY(!poisoned_.empty()))
        check_poison(index);
    Folio &f = fault_in(index, m);
    if (GMEM_UNLIKELY(!f.uptodate))
        zero_folio(f);
    if (GMEM_UNLIKELY(!punched_.empty()))
        touch(index, index + 1);
    const Run &run = attr_run(index, m);
    uint64_t block = index;
    unsigned order = f.order ? max_order(f, index, run, &block) : 0;
    bool priv = run.value & ATTR_PRIVATE;
    guest_fault_hooks(block, f.file_pfn(block), order, priv);
    return {f.file_pfn(index), order};
}

std::pair<uint64_t, unsigned> GuestMemfd::get_pfn(uint64_t index)
{
    FaultMemo m;
    return fault_guest(index, m);
}

/* The SIGBUS of a host fault the mapping refuses (fault_host's cold end). */
[[gnu::noinline, gnu::cold]] static void host_fault_refused(uint64_t index, uint64_t nr_pages,
                                                            bool mmap)
{
    if (index >= nr_pages)
        throw SigBus("host fault at index " + std::to_string(index) +
                         ": at or past the end of the file (" + std::to_string(nr_pages) +
                         " pages)",
                     index);
    if (!mmap)
        throw SigBus("host fault at index " + std::to_string(index) +
                         ": the file was created without FLAG_MMAP",
                     index);
    throw SigBus("host fault at index " + std::to_string(index) + ": the page is private",
                 index);
}

/*
 * map_host - record that the host maps @index.  A loop over pages mapped already (the
 * common case of a loop of host accesses) asks the set once per run of them.
 */
inline void GuestMemfd::map_host(uint64_t index, FaultMemo &m) { mapped_.insert(index, m.mapped); }

inline uint64_t GuestMemfd::fault_host(uint64_t index, FaultMemo &m)
{
    if (GMEM_UNLIKELY(closed_))
        check_open();
    if (GMEM_UNLIKELY(index >= nr_pages_ || !(flags_ & FLAG_MMAP)))
        host_fault_refused(index, nr_pages_, flags_ & FLAG_MMAP);
    if (GMEM_UNLIKELY(attr_run(index, m).value & ATTR_PRIVATE))
        host_fault_refused(index, nr_pages_, true);
    if (GMEM_UNLIKELY(!poisoned_.empty()))
        check_poison(index);
    Folio &f = fault_in(index, m);
    if (GMEM_UNLIKELY(!f.uptodate))
        zero_folio(f);
    if (GMEM_UNLIKELY(!punched_.empty()))
        touch(index, index + 1);
    map_host(index, m);
    return f.file_pfn(index);
}

uint64_t GuestMemfd::host_fault(uint64_t index)
{
    FaultMemo m;
    return fault_host(index, m);
}

uint64_t GuestMemfd::guest_read(uint64_t index) { return pm_->read(get_pfn(index).first); }

void GuestMemfd::guest_write(uint64_t index, uint64_t token)
{
    pm_->write(get_pfn(index).first, token);
    expected_.store(index, index + 1, token);
}

uint64_t GuestMemfd::host_read(uint64_t index) { return pm_->read(host_fault(index)); }

void GuestMemfd::host_write(uint64_t index, uint64_t token)
{
    pm_->write(host_fault(index), token);
    expected_.store(index, index + 1, token);
}

uint64_t GuestMemfd::pin(uint64_t index)
{
    uint64_t pfn = host_fault(index);
    pins_[pfn]++;
    return pfn;
}

void GuestMemfd::unpin(uint64_t index)
{
    check_open();
    check_index(index);
    Folio f;
    if (!cache_.lookup(index, &f) || !pins_.count(f.file_pfn(index)))
        throw invalid("index", "page " + std::to_string(index) + " is not pinned");
    uint64_t pfn = f.file_pfn(index);
    if (--pins_[pfn] == 0)
        pins_.erase(pfn);
}

void GuestMemfd::unpin_pfn(uint64_t pfn)
{
    check_open();
    auto it = pins_.find(pfn);
    if (it == pins_.end())
        throw invalid("pfn", hex(pfn) + " is not pinned by this file");
    if (--it->second)
        return;
    pins_.erase(it);
    // The last pin of a piece punched out while pinned: now it can be freed.
    auto o = orphans_.upper_bound(pfn);
    if (o == orphans_.begin())
        return;
    --o;
    if (pfn >= o->first + pages(o->second) || pins_in(o->first, pages(o->second)))
        return;
    Folio piece{NO_PFN, o->first, o->second, true};
    orphans_.erase(o);
    give_back(piece); // reclaimed when it left the page cache
}

/* The pinned pages of [pfn, pfn + nr) as the arch models see them: contents, RMP, owner. */
std::vector<uint64_t> GuestMemfd::pinned_state(uint64_t pfn, uint64_t nr) const
{
    std::vector<uint64_t> out;
    for (auto it = pins_.lower_bound(pfn); it != pins_.end() && it->first < pfn + nr; ++it) {
        uint64_t at = it->first - pm_->base_pfn();
        out.insert(out.end(), {it->first, pm_->read(it->first), pm_->rmp().load(at),
                               pm_->owner().load(at)});
    }
    return out;
}

/*
 * reclaim - folios that just left the page cache: the free hook (gated by FREE), one
 * call per folio in batches of up to FOLIO_BATCH_SIZE, as filemap_free_folio() calls
 * free_folio when a folio is removed - even one a pin still holds.  Unpinned folios go
 * back to the PhysMem; a pinned one waits for its last unpin_pfn().  A reclaim that
 * changes a pinned page (a scrub, an RMP update) is a reclaimed-while-pinned violation,
 * one per page: the device holding the pin still reads and writes it.
 */
void GuestMemfd::reclaim(const Folio *folios, size_t n)
{
    PfnRange ranges[FOLIO_BATCH_SIZE];
    for (size_t first = 0; first < n; first += FOLIO_BATCH_SIZE) {
        size_t m = std::min<size_t>(FOLIO_BATCH_SIZE, n - first);
        const Folio *batch = folios + first;
        std::vector<std::pair<size_t, std::vector<uint64_t>>> pinned;
        for (size_t i = 0; i < m; i++) {
            ranges[i] = PfnRange{batch[i].pfn, batch[i].pfn + batch[i].nr_pages()};
            if (!pins_.empty() && pins_in(batch[i].pfn, batch[i].nr_pages()))
                pinned.push_back({i, pinned_state(batch[i].pfn, batch[i].nr_pages())});
        }
        if (config_ & CONFIG_FREE) {
            stats_.free_calls += m;
            stats_.hook_ranges += m;
            arch_->free_folio(*this, ranges, m);
            arch_->flush(*this); // the pages are checked and go back right after
        }
        for (const auto &pp : pinned) {
            const Folio &f = batch[pp.first];
            std::vector<uint64_t> now = pinned_state(f.pfn, f.nr_pages());
            for (size_t k = 0; k < now.size(); k += 4)
                if (!std::equal(now.begin() + ptrdiff_t(k), now.begin() + ptrdiff_t(k + 4),
                                pp.second.begin() + ptrdiff_t(k)))
                    violations_.push_back(violation(
                        "reclaimed-while-pinned", NO_PFN, now[k],
                        "the reclaim hook changed a page (contents, RMP or owner) that a pin "
                        "still holds"));
            orphans_[f.pfn] = f.order; // back to the PhysMem at its last unpin_pfn()
        }
        // The rest go back to the PhysMem, checked by the arch first, each run of
        // physically contiguous folios in one call.
        uint64_t run = 0, nr = 0;
        for (size_t i = 0, k = 0; i < m; i++) {
            if (k < pinned.size() && pinned[k].first == i) {
                k++;
                continue;
            }
            const Folio &f = batch[i];
            arch_->check_freed(*this, f.pfn, f.nr_pages(), violations_);
            stats_.folios_freed++;
            if (nr && f.pfn == run + nr) {
                nr += f.nr_pages();
                continue;
            }
            if (nr)
                pm_->free_range_unchecked(run, nr);
            run = f.pfn;
            nr = f.nr_pages();
        }
        if (nr)
            pm_->free_range_unchecked(run, nr);
    }
}

/* A reclaimed folio's pages go back to the PhysMem, checked first. */
void GuestMemfd::give_back(const Folio &f)
{
    arch_->check_freed(*this, f.pfn, f.nr_pages(), violations_);
    pm_->free_unchecked(f.pfn, f.order); // the page cache held it: no double-free check
    stats_.folios_freed++;
}

/*
 * release_range - truncate_inode_pages_range(): take the folios of [start, end), which
 * all lie inside it, out of the page cache (RELEASE_CHUNK folios at a time; a whole-file
 * teardown empties the cache at once) and reclaim them, in batches of up to 31 (under
 * "hugetlb", the pieces of a split block as the one huge folio they were).  Pinned
 * folios are reclaimed too and wait for their last unpin; @with_orphans (teardown: the
 * pins are gone) gives every waiting folio back.  Memory stays bounded however many folios.
 */
void GuestMemfd::release_range(uint64_t start, uint64_t end, bool with_orphans,
                               std::vector<Folio> *buffer)
{
    std::vector<Folio> batch;
    batch.reserve(FOLIO_BATCH_SIZE);
    Folio block{};
    auto release = [&](Folio f) {
        if (f.order < folio_order_ && hugetlb()) {
            // The pieces of a split huge folio come in order: reclaimed whole, once.
            if (f.index == huge_block(f.index))
                block = Folio{f.index, f.pfn, folio_order_, f.uptodate};
            if (f.end() != block.end())
                return;
            f = block;
        }
        batch.push_back(f);
        if (batch.size() == FOLIO_BATCH_SIZE) {
            reclaim(batch.data(), batch.size());
            batch.clear();
        }
    };
    if (start == 0 && end == nr_pages_) {
        FolioCache taken;
        cache_.move_all_to(taken);
        if (hugetlb()) // split pieces are put back together on the way
            taken.for_each_clamped(0, nr_pages_, [&](const Folio &f, const PfnRange &) {
                release(f);
            });
        else // in bulk: the walk's own batches of 31 go straight to reclaim
            taken.walk_batches(0, nr_pages_,
                               [&](const Folio *folios, const PfnRange *, unsigned n) {
                                   reclaim(folios, n);
                               });
    } else {
        std::vector<Folio> local;
        std::vector<Folio> &chunk = buffer ? *buffer : local;
        if (!buffer)
            chunk.resize(std::min<uint64_t>(RELEASE_CHUNK, cache_.nr_folios()));
        for (size_t n; !chunk.empty() && (n = cache_.folios(start, end, chunk.data(), chunk.size()));) {
            cache_.remove_consecutive(chunk.data(), n);
            for (size_t i = 0; i < n; i++)
                release(chunk[i]);
        }
    }
    if (!batch.empty())
        reclaim(batch.data(), batch.size());
    if (with_orphans) {
        for (const auto &o : orphans_)
            give_back(Folio{NO_PFN, o.first, o.second, true});
        orphans_.clear();
    }
}

/*
 * fallocate - every hole of [start, end) gets the folios alloc_folio() would give it one
 * index at a time, in one walk: the cache is read a batch of folios at a time to find the
 * holes, a hole's run of full-size folios comes from PhysMem::alloc_many() (the same
 * blocks, lowest address first) and is appended to the page cache with no overlap search
 * per folio; only the edges of a hole, where alignment forces smaller folios, and a
 * PhysMem out of full-size blocks go one folio at a time.  All or nothing: OutOfMemory,
 * Interrupted or a host allocation failure gives back everything this call allocated.
 */
void GuestMemfd::fallocate(uint64_t start, uint64_t end)
{
    check_open();
    check_range(start, end);
    // Folios this call may add, at worst: one per 2**folio_order pages (two more at the
    // edges), and never more than PhysMem has free pages.
    uint64_t most = std::min(((end - start) >> folio_order_) + 2, pm_->nr_free());
    if (most > SMALL_REQUEST / FOLIO_BYTES && most > host_memory_available() / FOLIO_BYTES)
        throw OutOfMemory("fallocate: [" + std::to_string(start) + ", " + std::to_string(end) +
                          ") may need " + std::to_string(most) + " folios (" +
                          std::to_string(most * FOLIO_BYTES >> 20) +
                          " MiB of page cache), more than the host has available (" +
                          std::to_string(host_memory_available() >> 20) +
                          " MiB); nothing was allocated");
    // What this call allocated, as runs of index-contiguous new folios: O(holes) memory
    // even for 2**28 folios, and enough to give them all back.
    std::vector<std::pair<uint64_t, uint64_t>> got;
    uint64_t allocated = 0, splits = stats_.folio_splits;
    // The undo runs when the host may just have run out of memory, and allocates nothing:
    // the page cache only shrinks, and PhysMem never allocates to take back blocks it
    // handed out (a group keeps its bitmap while none of it is free; spare nodes for the
    // blocks of order >= 12).
    auto give_back = [&] {
        // The buddy allocator's free state depends only on which pages are free, so
        // freeing in any order restores it exactly.  Each run is tiled by this call's
        // folios; physically contiguous ones go back together, so that the pieces of a
        // huge folio split for shared pages ("hugetlb") go back as the block they were
        // handed out as (a piece alone would need a bitmap).
        Folio chunk[1024];
        uint64_t pfn = 0, nr = 0;
        for (const auto &run : got) {
            for (uint64_t at = run.first; at < run.second;) {
                size_t n = cache_.folios(at, run.second, chunk, 1024);
                if (!n)
                    break;
                cache_.remove_consecutive(chunk, n);
                for (size_t i = 0; i < n; i++) {
                    if (nr && chunk[i].pfn == pfn + nr) {
                        nr += chunk[i].nr_pages();
                        continue;
                    }
                    if (nr)
                        pm_->free_range_unchecked(pfn, nr);
                    pfn = chunk[i].pfn;
                    nr = chunk[i].nr_pages();
                }
                at = chunk[n - 1].end();
            }
        }
        if (nr)
            pm_->free_range_unchecked(pfn, nr);
        stats_.folios_allocated -= allocated;
        stats_.folio_splits = splits; // new huge folios split for shared pages: gone again
    };
    try {
        fill_holes(start, end, got, allocated);
    } catch (...) {
        give_back();
        throw;
    }
    touch(start, end);
}

/*
 * fill_holes - fallocate's walk.  A folio for an index i >= start reaches back at most to
 * i rounded down to 2**folio_order and forward to i rounded up, so the holes are found
 * over that wider range; in a hole [a, b) the folio at i is the largest aligned block
 * around i inside it (a moves up as folios are placed), of the largest order PhysMem can
 * supply - alloc_folio()'s choice, without its cache searches.  Under "hugetlb" (huge
 * pages only, split where shared) it goes index by index through alloc_folio().
 */
void GuestMemfd::fill_holes(uint64_t start, uint64_t end,
                            std::vector<std::pair<uint64_t, uint64_t>> &got,
                            uint64_t &allocated)
{
    InterruptCheck interrupted;
    if (hugetlb()) {
        // Huge pages only, each split at once where a page of it is shared: index by index
        // through alloc_folio(), which knows both rules.
        for (uint64_t i = start; i < end;) {
            Folio f;
            if (cache_.lookup(i, &f)) {
                i = f.end();
                continue;
            }
            if (interrupted())
                throw Interrupted("fallocate: interrupted at index " + std::to_string(i) +
                                  "; nothing was allocated");
            bool oom;
            f = alloc_folio(i, &oom);
            if (oom)
                throw OutOfMemory("fallocate: physical memory ran out at index " +
                                  std::to_string(i) + "; nothing was allocated");
            allocated++;
            if (!got.empty() && got.back().second == f.index) {
                got.back().second = f.end();
            } else {
                try {
                    got.push_back({f.index, f.end()});
                } catch (...) {
                    // The folio (or the pieces it was split into) goes back whole.
                    cache_.remove_tiling(f.index, f.end());
                    pm_->free_unchecked(f.pfn, f.order);
                    stats_.folios_allocated--;
                    allocated--;
                    throw;
                }
            }
            i = f.end();
        }
        return;
    }
    const unsigned k = folio_order_;
    const uint64_t K = pages(k), lo = start & ~(K - 1);
    const uint64_t hi = std::min(nr_pages_, (end + K - 1) & ~(K - 1));
    constexpr size_t CHUNK = 1024;
    uint64_t pfns[CHUNK];
    bool full_size_left = true; // PhysMem only loses free blocks during the walk
    auto record = [&](uint64_t index) { // before a folio at @index is added
        if (got.empty() || got.back().second != index)
            got.push_back({index, index});
    };
    auto add = [&](uint64_t index, unsigned order, uint64_t pfn) { // cannot fail after
        cache_.add_unchecked(index, order, pfn);
        got.back().second = index + pages(order);
        allocated++;
        stats_.folios_allocated++;
    };
    auto fill = [&](uint64_t a, uint64_t b) {
        for (uint64_t i = std::max(a, start); i < std::min(b, end);) {
            if (interrupted())
                throw Interrupted("fallocate: interrupted at index " + std::to_string(i) +
                                  "; nothing was allocated");
            unsigned o = k;
            uint64_t blk = i & ~(K - 1);
            while (o && (blk < a || blk + pages(o) > b))
                blk = i & ~(pages(--o) - 1);
            if (o == k && full_size_left) {
                uint64_t count = std::min({(b - blk) >> k, (end - blk + K - 1) >> k,
                                           uint64_t(CHUNK)});
                record(blk);
                size_t n = pm_->alloc_many(k, count, pfns);
                for (size_t j = 0; j < n; j++) {
                    try {
                        add(blk + (j << k), k, pfns[j]);
                    } catch (...) {
                        for (; j < n; j++) // host memory ran out: these go back
                            pm_->free_unchecked(pfns[j], k);
                        throw;
                    }
                }
                full_size_left = n == count;
                if (n)
                    i = a = blk + (n << k);
                continue;
            }
            uint64_t pfn;
            for (;; blk = i & ~(pages(--o) - 1)) {
                if (pm_->try_alloc(o, &pfn))
                    break;
                if (o == 0)
                    throw OutOfMemory("fallocate: physical memory ran out at index " +
                                      std::to_string(i) + "; nothing was allocated");
            }
            try {
                record(blk);
                add(blk, o, pfn);
            } catch (...) {
                pm_->free_unchecked(pfn, o);
                throw;
            }
            i = a = blk + pages(o);
        }
    };
    Folio seen[64];
    for (uint64_t cur = lo;;) {
        size_t n = cache_.folios(cur, hi, seen, 64);
        for (size_t s = 0; s < n; s++) {
            if (seen[s].index > cur)
                fill(cur, seen[s].index);
            cur = std::max(cur, seen[s].end());
        }
        if (n < 64) {
            if (cur < hi)
                fill(cur, hi);
            return;
        }
    }
}

void GuestMemfd::add_folio(uint64_t index, unsigned order, uint64_t pfn)
{
    check_open();
    if (order > MAX_ORDER)
        throw invalid("order", "must be in 0..18, got " + std::to_string(order));
    cache_.check_new(index, order, pfn);
    if (index + pages(order) > nr_pages_)
        throw invalid("index", "folio [" + std::to_string(index) + ", " +
                                   std::to_string(index + pages(order)) +
                                   ") runs past the end of the file (" +
                                   std::to_string(nr_pages_) + " pages)");
    if (hugetlb() && order != folio_order_)
        throw invalid("order", "under huge_policy 'hugetlb' a folio is a huge page: must be " +
                                   std::to_string(folio_order_) + ", got " +
                                   std::to_string(order));
    pm_->check_block(pfn, order);
    if (!pm_->is_free(pfn, order))
        throw invalid("pfn", "pages [" + std::to_string(pfn) + ", " +
                                 std::to_string(pfn + pages(order)) +
                                 ") are not free in the file's PhysMem");
    pm_->take(pfn, order);
    try {
        cache_.add(index, order, pfn, false);
        try {
            if (hugetlb())
                split_if_shared(Folio{index, pfn, order, false});
        } catch (...) {
            cache_.remove(index);
            throw;
        }
    } catch (...) {
        pm_->free_unchecked(pfn, order); // host memory ran out: the block goes back as taken
        throw;
    }
    stats_.folios_allocated++;
}

void GuestMemfd::punch_hole(uint64_t start, uint64_t end)
{
    check_open();
    if (start >= end)
        throw invalid("start", "must be < end, got start=" + std::to_string(start) +
                                   " end=" + std::to_string(end));
    end = std::min(end, nr_pages_); // truncate_inode_pages_range stops at EOF
    if (start >= end)
        return;
    if (hugetlb())
        return punch_huge(start, end);
    // What the steps after the point of no return store, reserved first: the pieces of the
    // (at most two) folios that straddle the range's edges (a cut makes at most 2 * order
    // of them), the expected contents, and the buffer the release works through.
    size_t pieces = 0;
    Folio edge;
    if (cache_.lookup(start, &edge) && edge.index < start)
        pieces += 2 * edge.order;
    if (cache_.lookup(end - 1, &edge) && edge.end() > end)
        pieces += 2 * edge.order;
    cache_.reserve(pieces);
    expected_.reserve_stores(1);
    std::vector<Folio> chunk(std::min<uint64_t>(RELEASE_CHUNK, cache_.count(start, end) + pieces));
    invalidate_begin(start, end, FILTER_SHARED | FILTER_PRIVATE);
    mapped_.erase(mapped_.lower_bound(start), mapped_.lower_bound(end));
    cache_.split_range(start, end);
    expected_.store(start, end, 0);
    release_range(start, end, false, &chunk);
    unpoison(start, end);
    arch_->invalidate_end(*this, start, end);
}

/*
 * populate - kvm_gmem_populate (SNP LAUNCH_UPDATE, TDX PAGE.ADD): the index must be
 * private (else EINVAL); its folio is taken without zeroing and without make_private,
 * and becomes uptodate; @token sets the page's contents, or the page keeps them (in
 * place).  The arch's post_populate hook then runs (POPULATE).
 */
void GuestMemfd::populate(uint64_t index, bool has_token, uint64_t token)
{
    check_open();
    check_index(index);
    if (!(attrs_.load(index) & ATTR_PRIVATE))
        throw invalid("index", "populate needs a private page (EINVAL), page " +
                                   std::to_string(index) + " is shared");
    check_poison(index);
    Folio f = fault_in(index);
    touch(index, index + 1);
    uint64_t pfn = f.file_pfn(index);
    if (!f.uptodate) {
        // The populated page is not zeroed (its contents are the launch image); the rest of
        // a larger folio is, as the first touch would, so that no stale page becomes
        // reachable (the kernel populates order-0 folios; gmem's may be larger).
        uint64_t keep = pm_->read(pfn);
        zero_folio(f);
        pm_->write(pfn, keep);
        expected_.store(index, index + 1, keep);
        stats_.pages_zeroed--;
    }
    if (has_token) {
        pm_->write(pfn, token);
        expected_.store(index, index + 1, token);
    }
    stats_.pages_populated++;
    if (config_ & CONFIG_POPULATE)
        arch_->post_populate(*this, index, pfn, has_token, token);
}

/*
 * memory_failure - error_remove_folio: the folio holding @index is poisoned.  The host's
 * mappings of it go, KVM invalidates both kinds over it, nothing is truncated; every
 * access to it then fails with HWPoison until a punch takes it out of the page cache.
 */
void GuestMemfd::memory_failure(uint64_t index)
{
    check_open();
    check_index(index);
    Folio f;
    if (!cache_.lookup(index, &f))
        throw invalid("index", "page " + std::to_string(index) +
                                   " is a hole: no memory there to fail");
    // A folio lies inside a poisoned range or outside them all (folios only split): a
    // piece of a poisoned folio failing again changes nothing.
    auto in = poisoned_.upper_bound(f.index);
    if (in == poisoned_.begin() || std::prev(in)->second <= f.index)
        poisoned_[f.index] = f.end(); // first: the steps below cannot fail
    stats_.memory_failures++;
    mapped_.erase(mapped_.lower_bound(f.index), mapped_.lower_bound(f.end()));
    invalidate_begin(f.index, f.end(), FILTER_SHARED | FILTER_PRIVATE);
    arch_->invalidate_end(*this, f.index, f.end());
}

/*
 * close - kvm_gmem_release(): KVM invalidates both kinds over the whole file, start and
 * end, and the folios are reclaimed afterwards, when the inode is evicted - so every
 * reclaim comes after invalidate_end.
 */
void GuestMemfd::close()
{
    if (closed_)
        return;
    invalidate_begin(0, nr_pages_, FILTER_SHARED | FILTER_PRIVATE);
    mapped_.clear();
    arch_->invalidate_end(*this, 0, nr_pages_);
    pins_.clear(); // the pinning devices go away with the VM
    release_range(0, nr_pages_, true);
    poisoned_.clear();
    punched_.clear();
    scratch_ = {};
    closed_ = true;
}

/*
 * invalidate_begin - KVM's invalidate_start for [start, end) and @kinds; under the
 * "mainline" design kvm_arch_gmem_invalidate_range follows it, with its arguments
 * (gated by INVALIDATE: the model's file is one binding, one memslot).
 */
void GuestMemfd::invalidate_begin(uint64_t start, uint64_t end, unsigned kinds)
{
    stats_.invalidations++;
    arch_->invalidate_start(*this, start, end, kinds);
    if (design_ == HookDesign::Mainline && (config_ & CONFIG_INVALIDATE)) {
        stats_.invalidate_range_calls++;
        arch_->invalidate_range(*this, start, end, kinds);
    }
}

/*
 * DOC: The conversion walk
 *
 * What a conversion does to its folios, past its point of no return: the pages whose
 * attribute changes get the arch's contents (kept, zeroed by TDX, garbled by SNP), and
 * on the way to shared the arch gets each folio's clamped PFN range, in batches of up to
 * FOLIO_BATCH_SIZE (make_shared, or free_folio under the "overloaded" design).  Where
 * the arch's range hooks are blind to contents (Arch::range_hooks_blind) both are done
 * in one walk of the folios, convert_fused(), which hands the ranges over merged into
 * PFN extents (the stats still count one per folio); otherwise no hook may see a page not yet
 * converted, and the contents go first (convert_contents(): each run of pages that
 * changes walked on its own), the hooks second (hook_walk()).
 *
 * The contents change an extent at a time - pages contiguous in the file and in physical
 * memory, inside one attribute run - in index order, so a file populated front to back
 * costs a handful of stores however many folios it has.
 */

/*
 * ContentsChange - the contents side of a conversion walk of [.., @end): the attribute
 * run of the pages being looked at (looked up again only where it ends) and the extent
 * being gathered, [index, hot.index_end) at @pfn, set to @token once it can grow no more.
 * The walk's loop keeps Hot in registers and settles most folios itself - one that ends
 * by hot.limit and either continues the extent or lies in a run that does not change
 * (@skip); any other goes through piece().
 */
struct GuestMemfd::ContentsChange {
    struct Hot {
        uint64_t index_end, pfn_end; // index_end NO_PFN: no extent
        uint64_t limit;              // the end of the run, or of the walk if sooner
        bool skip;                   // the run is already of the new kind
    };
    GuestMemfd &file;
    const uint64_t attrs, token, end;
    Run run;
    uint64_t index = 0, pfn = 0;

    Hot hot() const { return Hot{NO_PFN, NO_PFN, std::min(run.end, end), run.value == attrs}; }
    void emit(Hot &h)
    {
        if (h.index_end != NO_PFN) {
            file.pm_->fill(pfn, h.index_end - index, token);
            file.expected_.store(index, h.index_end, token);
        }
        h.index_end = h.pfn_end = NO_PFN;
    }
    Hot piece(Hot h, uint64_t at, uint64_t p, uint64_t len);
};

/* The pages [at, at + len) at @p, split by attribute run (the walk's end bounds them). */
GuestMemfd::ContentsChange::Hot GuestMemfd::ContentsChange::piece(Hot h, uint64_t at,
                                                                  uint64_t p, uint64_t len)
{
    for (uint64_t stop = std::min(at + len, end); at < stop;) {
        if (at >= run.end) {
            emit(h); // an extent ends with its run
            run = file.attrs_.run_at(at);
        }
        uint64_t to = std::min(stop, run.end);
        if (run.value != attrs) {
            if (at != h.index_end || p != h.pfn_end) {
                emit(h);
                index = at;
                pfn = p;
            }
            h.index_end = to;
            h.pfn_end = p + (to - at);
        }
        p += to - at;
        at = to;
    }
    Hot next = hot();
    next.index_end = h.index_end;
    next.pfn_end = h.pfn_end;
    return next;
}

/* A range handed to a hook must lie inside its folio and inside [start, end). */
static inline bool range_inside(const Folio &f, const PfnRange &r, uint64_t stop,
                                uint64_t end)
{
    return r.start_pfn < r.end_pfn && r.start_pfn >= f.pfn &&
           r.end_pfn <= f.pfn + f.nr_pages() && stop <= end;
}

/*
 * convert_contents - the contents of the pages of [start, end) whose attribute is not
 * @attrs become @token, and so does what check() expects of them.
 */
void GuestMemfd::convert_contents(uint64_t start, uint64_t end, uint64_t attrs, uint64_t token)
{
    attrs_.for_each_run(start, end, [&](uint64_t a, uint64_t b, uint64_t value) {
        if (value == attrs)
            return; // already of the new kind: nothing changes for these pages
        ContentsChange cc{*this, attrs, token, b, Run{a, b, value}};
        ContentsChange::Hot h = cc.hot();
        cache_.for_each_clamped(a, b, [&](const Folio &f, const PfnRange &r) {
            uint64_t first = std::max(a, f.index), stop = first + (r.end_pfn - r.start_pfn);
            if (likely(stop <= h.limit && first == h.index_end && r.start_pfn == h.pfn_end)) {
                h.index_end = stop;
                h.pfn_end = r.end_pfn;
            } else {
                h = cc.piece(h, first, r.start_pfn, stop - first);
            }
        });
        cc.emit(h);
    });
}

/*
 * hook_walk - step 5 of a private->shared conversion: the folios of [start, end) in
 * batches, each clamped to the range, handed to make_shared (or, under the overloaded
 * design, free_folio).  Each range is checked against its folio and the range asked.
 */
void GuestMemfd::hook_walk(uint64_t start, uint64_t end)
{
    const bool free_hook = design_ == HookDesign::Overloaded;
    PfnRange ranges[FOLIO_BATCH_SIZE];
    unsigned n = 0;
    cache_.for_each_clamped(start, end, [&](const Folio &f, const PfnRange &r) {
        uint64_t first = std::max(start, f.index), stop = first + (r.end_pfn - r.start_pfn);
        if (unlikely(!range_inside(f, r, stop, end)))
            bad_hook_range(first, r.start_pfn);
        ranges[n++] = r;
        if (n == FOLIO_BATCH_SIZE) {
            count_hook_ranges(n, free_hook);
            deliver_ranges(ranges, n, free_hook);
            n = 0;
        }
    });
    if (n) {
        count_hook_ranges(n, free_hook);
        deliver_ranges(ranges, n, free_hook);
    }
    arch_->flush(*this);
}

/*
 * convert_fused - hook_walk() and convert_contents() in one walk of the folios (DOC
 * above).  A range that ends by hot.limit is inside [start, end) without a test of its
 * own; a range that leaves its folio or the range is recorded once the walk is over, in
 * walk order (the hooks are blind: nothing else records in between).  Blind hooks also
 * take ranges that continue one another as one (Arch::range_hooks_blind), so the walk
 * hands out maximal PFN-contiguous extents instead of batches of 31: one hook call per
 * extent, while the stats count the folio ranges the kernel would have handed out.
 */
void GuestMemfd::convert_fused(uint64_t start, uint64_t end, uint64_t attrs, uint64_t token)
{
    const bool free_hook = design_ == HookDesign::Overloaded;
    PfnRange ext{0, 0}; // the extent being gathered; empty before the first range
    uint64_t nr_ranges = 0;
    ContentsChange cc{*this, attrs, token, end, attrs_.run_at(start)};
    ContentsChange::Hot h = cc.hot();
    bool bad = false;
    cache_.for_each_clamped(start, end, [&](const Folio &f, const PfnRange &r) {
        uint64_t first = std::max(start, f.index), stop = first + (r.end_pfn - r.start_pfn);
        bool inside = stop <= h.limit;
        if (unlikely(!(r.start_pfn < r.end_pfn && r.start_pfn >= f.pfn &&
                       r.end_pfn <= f.pfn + f.nr_pages() && (inside || stop <= end))))
            bad = true;
        if (likely(inside && first == h.index_end && r.start_pfn == h.pfn_end)) {
            h.index_end = stop;
            h.pfn_end = r.end_pfn;
        } else if (inside && h.skip) {
            // a run already of the new kind: nothing changes
        } else {
            h = cc.piece(h, first, r.start_pfn, stop - first);
        }
        if (unlikely(r.start_pfn != ext.end_pfn)) {
            if (ext.end_pfn != ext.start_pfn) {
                count_hook_ranges(nr_ranges, free_hook); // counted before the call, as
                deliver_ranges(&ext, 1, free_hook);      // hook_walk() counts its batches
                nr_ranges = 0;
            }
            ext.start_pfn = r.start_pfn;
        }
        nr_ranges++;
        ext.end_pfn = r.end_pfn;
    });
    if (ext.end_pfn != ext.start_pfn) {
        count_hook_ranges(nr_ranges, free_hook);
        deliver_ranges(&ext, 1, free_hook);
    }
    cc.emit(h);
    arch_->flush(*this);
    if (bad)
        check_hook_ranges(start, end);
}

/* Record each range of [start, end) that leaves its folio or the range. */
void GuestMemfd::check_hook_ranges(uint64_t start, uint64_t end)
{
    cache_.for_each_clamped(start, end, [&](const Folio &f, const PfnRange &r) {
        uint64_t first = std::max(start, f.index), stop = first + (r.end_pfn - r.start_pfn);
        if (!range_inside(f, r, stop, end))
            bad_hook_range(first, r.start_pfn);
    });
}

void GuestMemfd::bad_hook_range(uint64_t index, uint64_t pfn)
{
    violations_.push_back(violation("hook-range-inside-folio-and-range", index, pfn,
                                    "range leaves its folio or range"));
}

/* One batch of a conversion's walk to make_shared, or under "overloaded" free_folio. */
void GuestMemfd::deliver_ranges(const PfnRange *ranges, unsigned n, bool free_hook)
{
    if (free_hook)
        arch_->free_folio(*this, ranges, n);
    else
        arch_->make_shared(*this, ranges, n);
}

/* The stats of @n ranges handed out by a conversion's walk. */
void GuestMemfd::count_hook_ranges(uint64_t n, bool free_hook)
{
    (free_hook ? stats_.free_calls : stats_.make_shared_calls) += n;
    stats_.hook_ranges += n;
}

/* convert_walk - the conversion walk (DOC above) of [start, end) to @attrs. */
void GuestMemfd::convert_walk(uint64_t start, uint64_t end, uint64_t attrs, bool hooked)
{
    Contents policy = arch_->conversion_contents();
    uint64_t token = policy == Contents::Zero ? 0 : GARBLED;
    if (policy != Contents::Keep && hooked && arch_->range_hooks_blind())
        return convert_fused(start, end, attrs, token);
    if (policy != Contents::Keep)
        convert_contents(start, end, attrs, token);
    if (hooked)
        hook_walk(start, end);
}

void GuestMemfd::set_attributes(uint64_t start, uint64_t end, uint64_t attrs)
{
    check_open();
    check_range(start, end);
    if (attrs != 0 && attrs != ATTR_PRIVATE)
        throw invalid("attrs", "must be SHARED (0) or PRIVATE (8), got " + std::to_string(attrs));
    // 1. Nothing to do.
    if (attrs_.range_has(start, end, attrs)) {
        stats_.conversions_noop++;
        return;
    }
    // 3. To private: a folio pinned anywhere, or mapped by the host outside the range, is
    //    busy.  Checked before anything changes, then the range is unmapped.
    if (attrs == ATTR_PRIVATE) {
        uint64_t busy = NO_PFN, busy_folio = 0;
        auto consider = [&](const Folio &f) {
            uint64_t at = std::max(start, f.index);
            if (at < busy && (pins_in(f.pfn, f.nr_pages()) ||
                              mapped_in(f.index, std::max(start, f.index)) ||
                              mapped_in(std::min(end, f.end()), f.end()))) {
                busy = at;
                busy_folio = f.index;
            }
        };
        if (!pins_.empty()) { // a pin anywhere in any folio of the range
            cache_.walk_batches(start, end, [&](const Folio *fs, const PfnRange *, unsigned n) {
                for (unsigned i = 0; i < n && busy == NO_PFN; i++)
                    consider(fs[i]);
            });
        } else if (!mapped_.empty()) { // only a folio crossing start or end has pages outside
            Folio f;
            if (cache_.lookup(start, &f))
                consider(f);
            if (cache_.lookup(end - 1, &f))
                consider(f);
        }
        if (busy != NO_PFN) {
            stats_.conversions_busy++;
            throw ConversionBusy("set_attributes: folio at index " + std::to_string(busy_folio) +
                                     " is pinned or mapped outside the range (EAGAIN)",
                                 busy);
        }
        mapped_.erase(mapped_.lower_bound(start), mapped_.lower_bound(end));
    }
    // What the store at step 6 needs, taken now: past this point nothing may fail.
    attrs_.reserve_stores(1);
    // 3b. To shared under "hugetlb": split the huge folios first (undone if that fails).
    std::vector<Folio> split;
    if (hugetlb() && attrs == 0)
        split = split_for_share(start, end);
    // 4. Point of no return: the arch hears of the splits (SNP PSMASH, TDX demote), then
    //    KVM zaps its mappings of the old kind.
    for (const Folio &f : split)
        split_huge(f);
    invalidate_begin(start, end, attrs == ATTR_PRIVATE ? FILTER_SHARED : FILTER_PRIVATE);
    // 4b. The contents of the pages converted, and 5. to shared: the arch gets the
    //     clamped PFN ranges - one walk of the folios where the arch allows it.
    bool hooked = false;
    if (attrs == 0) {
        if (design_ == HookDesign::Overloaded)
            hooked = config_ & CONFIG_FREE;
        else
            hooked = config_ & CONFIG_FREE_ON_SHARED_CONVERSION;
        arch_->contents_touched = false;
    }
    convert_walk(start, end, attrs, hooked);
    // Did the hooks keep the arch's promise about contents?  Only hooks that wrote pages
    // can have broken it: the model sets the expectation along with its own changes.
    if (hooked && arch_->contents_touched)
        check_contents(start, end, violations_);
    // 6. Store the new attributes, then let KVM map again.
    attrs_.store(start, end, attrs);
    stats_.conversions++;
    stats_.pages_converted += end - start;
    // 7. Under "hugetlb", blocks wholly private again are merged back.
    if (hugetlb() && attrs == ATTR_PRIVATE)
        merge_after_unshare(start, end);
    arch_->attributes_set(*this, start, end, attrs);
    arch_->invalidate_end(*this, start, end);
}

void GuestMemfd::set_memory_attributes2(uint64_t offset, uint64_t size, uint64_t attributes,
                                        uint64_t flags)
{
    check_open();
    if (flags)
        throw invalid("flags", "must be 0, got " + std::to_string(flags));
    if (attributes & ~ATTR_PRIVATE)
        throw invalid("attributes", "unknown bits " + hex(attributes & ~ATTR_PRIVATE) +
                                        "; allowed: KVM_MEMORY_ATTRIBUTE_PRIVATE (8)");
    if (size == 0)
        throw invalid("size", "must be > 0");
    if (offset + size < offset)
        throw invalid("size", "offset + size wraps around");
    if (offset % PAGE_SIZE)
        throw invalid("offset", "must be page aligned, got " + std::to_string(offset));
    if (size % PAGE_SIZE)
        throw invalid("size", "must be page aligned, got " + std::to_string(size));
    if (offset + size > this->size())
        throw invalid("size", "offset + size (" + std::to_string(offset + size) +
                                  ") is past the end of the file (" +
                                  std::to_string(this->size()) + ")");
    set_attributes(offset / PAGE_SIZE, (offset + size) / PAGE_SIZE, attributes);
}

uint64_t GuestMemfd::get_attributes(uint64_t index) const
{
    check_index(index);
    return attrs_.load(index);
}

std::vector<FolioInfo> GuestMemfd::folios(uint64_t start, uint64_t end) const
{
    std::vector<FolioInfo> out;
    for (const Folio &f : cache_.folios(start, end))
        out.push_back(FolioInfo{f, uint32_t(pins_in(f.pfn, f.nr_pages())),
                                uint32_t(mapped_in(f.index, f.end()))});
    return out;
}

/*
 * check - every contract violation: those recorded during calls (hook ranges, pages
 * returned to the free pool, failed hooks) and those in the current state: pages the
 * host can reach, and populated pages whose contents differ from what is expected.
 */
std::vector<Violation> GuestMemfd::check() const
{
    std::vector<Violation> out = violations_;
    mapped_.for_each([&](uint64_t index) {
        Folio f;
        if (!cache_.lookup(index, &f))
            return;
        uint64_t pfn = f.file_pfn(index);
        if (attrs_.load(index) & ATTR_PRIVATE)
            out.push_back(violation("host-reaches-only-shared-pages", index, pfn,
                                    "the host maps a private page"));
        arch_->check_host_reach(*this, index, pfn, out);
    });
    check_contents(0, nr_pages_, out);
    if (hugetlb())
        check_huge(out);
    arch_->check_state(*this, out);
    // A violation recorded during a call may still stand in the current state: once.
    std::set<std::tuple<std::string, uint64_t, uint64_t, std::string>> seen;
    std::vector<Violation> unique;
    for (Violation &v : out)
        if (seen.insert({v.rule, v.index, v.pfn, v.detail}).second)
            unique.push_back(std::move(v));
    return unique;
}

/*
 * check_contents - populated, uptodate pages of [start, end) whose physical contents
 * differ from what the arch's semantics promise, one violation per differing stretch.
 * Compares run by run, so a 1 GiB folio of one token costs one step.
 */
void GuestMemfd::check_contents(uint64_t start, uint64_t end, std::vector<Violation> &out) const
{
    cache_.walk_extents(start, end, [&](uint64_t from, uint64_t pfn, uint64_t nr, bool uptodate) {
        if (!uptodate)
            return; // contents are undefined until the first touch zeroes the folio
        auto want = expected_.runs(from, from + nr);
        auto got = pm_->contents(pfn, nr);
        size_t i = 0, j = 0;
        for (uint64_t at = from; at < from + nr;) {
            uint64_t want_end = want[i].end, got_end = got[j].end - pfn + from;
            uint64_t stop = std::min(want_end, got_end);
            if (want[i].value != got[j].value)
                out.push_back(violation(arch_->contents_rule(), at, pfn + (at - from),
                                        "pages [" + std::to_string(at) + ", " +
                                            std::to_string(stop) + ") hold " +
                                            hex(got[j].value) + ", expected " +
                                            hex(want[i].value)));
            at = stop;
            i += at == want_end;
            j += at == got_end;
        }
    });
}

std::string GuestMemfd::dump() const
{
    std::ostringstream os;
    os << "GuestMemfd(size=" << size() << ", arch=" << arch_->name() << ", hook_design="
       << design_name(design_) << ", huge_policy=" << policy_name(policy_) << ", folios="
       << cache_.nr_folios() << ", attribute runs=" << attrs_.nr_runs()
       << (closed_ ? ", closed" : "") << ")";
    size_t shown = 0;
    Folio first[33];
    size_t n = cache_.folios(0, nr_pages_, first, 33);
    for (size_t k = 0; k < n; k++) {
        FolioInfo fi{first[k], uint32_t(pins_in(first[k].pfn, first[k].nr_pages())),
                     uint32_t(mapped_in(first[k].index, first[k].end()))};
        if (shown++ == 32) {
            os << "\n  ...";
            break;
        }
        const Folio &f = fi.folio;
        os << "\n  folio [" << f.index << ", " << f.end() << ") order " << f.order << " pfn "
           << hex(f.pfn) << (f.uptodate ? " uptodate" : "");
        if (fi.pins)
            os << " pins=" << fi.pins;
        if (fi.mapped)
            os << " mapped=" << fi.mapped;
    }
    for (const Run &r : attrs_.runs(0, nr_pages_))
        os << "\n  attrs [" << r.start << ", " << r.end << ") "
           << (r.value & ATTR_PRIVATE ? "PRIVATE" : "SHARED");
    return os.str();
}

/*
 * DOC: Bulk operations
 *
 * A simulator issues millions of page operations; one call from Python each costs more
 * than the engine's work.  get_pfns, guest_read_many, guest_write_many, host_read_many,
 * host_write_many and set_attributes_many run the single calls' code on each element in
 * order, so state, hooks, stats and errors are exactly those of the single calls:
 *
 *     elements:  [ 0  1  2  3 | 4 | 5  6 ]
 *                  applied      ^   not run
 *                               raises its own error; call.done == 4
 *
 * as a batch of ioctls would.  The faults of one call share a FaultMemo, which is what
 * makes a run of neighbouring indexes cheap.  Between elements the loop checks for an
 * interrupt (Ctrl-C): Interrupted, with the elements before it applied.
 */
template <class Fn>
void GuestMemfd::bulk(size_t n, BulkCall &call, Fn &&element)
{
    InterruptCheck interrupted;
    check_open(); // a closed file refuses even an empty batch, as every call on it
    for (call.done = 0; call.done < n; call.done++) {
        if (call.done && interrupted())
            throw Interrupted("interrupted after " + std::to_string(call.done) + " of " +
                              std::to_string(n) + " elements; those stay applied");
        element(call.done);
        if (call.between && call.between(call.arg)) {
            call.done++;
            return;
        }
    }
}

/*
 * sort_packed - LSD radix sort of the @n words at @v by bits [lo, lo + bits), 11 bits a
 * pass, through @tmp (as many words): a chunk's (index << 20 | position) words sort in two
 * passes for a file of up to 2**22 pages.  Returns where the sorted words are (@v or @tmp).
 */
[[gnu::noinline]] static uint64_t *sort_packed(uint64_t *v, uint64_t *tmp, size_t n, unsigned lo,
                                               unsigned bits)
{
    constexpr unsigned D = 11;
    uint32_t at[size_t(1) << D];
    for (unsigned shift = lo; shift < lo + bits; shift += D) {
        std::fill(std::begin(at), std::end(at), 0);
        for (size_t k = 0; k < n; k++)
            at[(v[k] >> shift) & ((1u << D) - 1)]++;
        uint32_t sum = 0;
        for (uint32_t &c : at) {
            uint32_t here = c;
            c = sum;
            sum += here;
        }
        for (size_t k = 0; k < n; k++)
            tmp[at[(v[k] >> shift) & ((1u << D) - 1)]++] = v[k];
        std::swap(v, tmp);
    }
    return v;
}

/*
 * find_folios - phase 1 of a bulk call over scattered indexes: out[k] is the folio that
 * holds index[k], packed (pfn << 8 | order << 1 | uptodate), or 0 for a hole or an index
 * past the end: 8 bytes, so that the scattered stores of a large batch stay in cache.
 * Found in index order (FolioCache::lookup_sorted: one pass over the leaves that hold
 * them), so the misses of a random batch overlap instead of following one another.
 * @key and @tmp are scratch of @n words each.
 */
[[gnu::noinline]] void GuestMemfd::find_folios(const uint64_t *index, size_t n, uint64_t *out,
                                               uint64_t *key, uint64_t *tmp) const
{
    static_assert(SCATTER_CHUNK <= (size_t(1) << 20), "a position takes 20 bits");
    auto pack = [](const Folio &f) {
        return f.pfn << 8 | uint64_t(f.order) << 1 | uint64_t(f.uptodate);
    };
    size_t m = 0; // the indexes inside the file, as index << 20 | position
    uint64_t hi = 0;
    for (size_t k = 0; k < n; k++) {
        out[k] = 0;
        if (index[k] < nr_pages_) {
            key[m++] = index[k] << 20 | k;
            hi = std::max(hi, index[k]);
        }
    }
    if (!m || hi >= (uint64_t(1) << 44))
        return; // (files past 2**44 pages fault the usual way)
    key = sort_packed(key, tmp, m, 20, 64 - unsigned(__builtin_clzll(hi | 1)));
    constexpr uint64_t POS = (uint64_t(1) << 20) - 1;
    cache_.lookup_sorted(key, m, 20,
                         [&](size_t j, const Folio &f) { out[key[j] & POS] = pack(f); });
}

/*
 * bulk_faults - bulk() for calls that fault each index in.  Over a chunk whose indexes are
 * scattered (more than one in eight steps back), the folios are found first, in index
 * order (find_folios), then the elements run in their own order as always, each fault
 * starting from its folio found ahead.  That changes no effect: a fault only adds folios
 * in holes and marks folios uptodate, so a folio found present and uptodate stays so,
 * and any other element faults the usual way.
 *
 * A run of consecutive indexes (index[k + j] == index[k] + j) goes to @run as one block
 * of up to RUN_MAX elements (guest_run, host_run): the same faults in the same order, with
 * the folios walked straight off the leaves and the per-element bookkeeping of this loop
 * (interrupt check, window, chunk) paid once per block.  So do the elements of a
 * scattered chunk, with their folios found ahead (guest_run, host_run given @pre), up to
 * the first whose folio was not found present and uptodate.  Not with a Python arch, whose
 * hook state is forgotten after each element, nor with poisoned or "hugetlb"-punched
 * pages about (those elements take the single path).
 */
template <class Fn, class RunFn>
void GuestMemfd::bulk_faults(const uint64_t *index, size_t n, BulkCall &call, FaultMemo &m,
                             Fn &&element, RunFn &&run)
{
    InterruptCheck interrupted;
    check_open(); // a closed file refuses even an empty batch, as every call on it
    const uint64_t *ahead = nullptr; // the chunk's folios found ahead, in scratch_
    size_t chunk = 0, chunk_end = 0;
    const bool runs = !call.between;
    for (call.done = 0; call.done < n;) {
        size_t k = call.done;
        if (k && interrupted())
            throw Interrupted("interrupted after " + std::to_string(k) + " of " +
                              std::to_string(n) + " elements; those stay applied");
        if (k >= chunk_end) {
            chunk = k;
            chunk_end = std::min(n, k + SCATTER_CHUNK);
            size_t back = 0;
            for (size_t i = k + 1; i < chunk_end; i++)
                back += index[i] < index[i - 1];
            ahead = nullptr;
            if (size_t c = chunk_end - k; c >= 256 && back * 8 > c) {
                if (scratch_.size() < 3 * c)
                    scratch_.resize(3 * c);
                uint64_t *out = scratch_.data() + 2 * c;
                find_folios(index + k, c, out, scratch_.data(), scratch_.data() + c);
                ahead = out;
            }
        }
        if (runs && poisoned_.empty() && punched_.empty()) {
            if (k + 1 < n && index[k + 1] == index[k] + 1) {
                if (run(k, std::min(n, k + RUN_MAX), nullptr, call.done))
                    continue; // call.done counts the elements it ran
            } else if (ahead && run(k, std::min(chunk_end, k + RUN_MAX), &ahead[k - chunk],
                                    call.done)) {
                continue;
            }
        }
        if (ahead)
            m.pre = &ahead[k - chunk];
        element(k);
        m.pre = nullptr;
        call.done++;
        if (call.between && call.between(call.arg))
            return;
    }
}

/*
 * guest_run - elements @k, @k + 1, ... of a bulk call of guest faults, while their indexes
 * go up by one (index[e] == index[k] + e - k) and e < @limit, as one block: what
 * fault_guest() does for each (zero its folio on first touch, the arch's guest_mapped
 * and prepare calls), then op(e, index, pfn, order), in order, with the attribute run
 * looked up once and the folios walked off the leaves.  Stops at the end of the attribute
 * run and before a hole (a fault there allocates: the single path).  @done counts the
 * elements run, also when one raises; false when it ran none.
 */
template <class Op>
bool GuestMemfd::guest_run(const uint64_t *index, size_t k, size_t limit, const uint64_t *pre,
                           FaultMemo &m, size_t &done, Op &&op)
{
    if (pre)
        return guest_scattered(index, k, limit, pre, m, done, op);
    const uint64_t i = index[k];
    if (i >= nr_pages_)
        return false;
    const Run run = attr_run(i, m);
    const bool priv = run.value & ATTR_PRIVATE;
    const bool prep = priv && (config_ & CONFIG_PREPARE);
    const bool hooks = hears_mapped_ || prep;
    const uint64_t end = std::min(run.end, i + std::min<uint64_t>(limit - k, nr_pages_ - i));
    size_t e = k; // the next element
    try {
        cache_.for_each_present(i, end, [&](const Folio &found) {
            uint64_t at = i + (e - k);
            if (index[e] != at)
                return false;
            Folio f = found;
            if (GMEM_UNLIKELY(!f.uptodate)) {
                zero_folio(f);
                m.n = 0; // the window may hold a copy that still says not uptodate
            }
            if (f.order == 0 && !hooks) { // one page, nothing to call
                op(e++, at, f.pfn, 0u);
                return true;
            }
            for (const uint64_t stop = std::min(f.end(), end); at < stop; at++, e++) {
                if (index[e] != at)
                    return false;
                uint64_t block = at;
                unsigned order = f.order ? max_order(f, at, run, &block) : 0;
                if (hooks)
                    guest_fault_hooks(block, f.file_pfn(block), order, priv);
                op(e, at, f.file_pfn(at), order);
            }
            return true;
        });
    } catch (...) {
        done = e;
        throw;
    }
    done = e;
    return e > k;
}

/*
 * host_run - guest_run() for host faults: each element as fault_host() does it.  Private
 * pages, and a file without FLAG_MMAP, take the single path (which raises).
 */
template <class Op>
bool GuestMemfd::host_run(const uint64_t *index, size_t k, size_t limit, const uint64_t *pre,
                          FaultMemo &m, size_t &done, Op &&op)
{
    if (pre)
        return host_scattered(index, k, limit, pre, m, done, op);
    const uint64_t i = index[k];
    if (i >= nr_pages_ || !(flags_ & FLAG_MMAP))
        return false;
    const Run run = attr_run(i, m);
    if (run.value & ATTR_PRIVATE)
        return false;
    const uint64_t end = std::min(run.end, i + std::min<uint64_t>(limit - k, nr_pages_ - i));
    const bool mapped = mapped_.holds(i, end, m.mapped); // then map_host() would do nothing
    size_t e = k;
    try {
        cache_.for_each_present(i, end, [&](const Folio &found) {
            uint64_t at = i + (e - k);
            if (index[e] != at)
                return false;
            Folio f = found;
            if (GMEM_UNLIKELY(!f.uptodate)) {
                zero_folio(f);
                m.n = 0;
            }
            if (f.order == 0 && mapped) {
                op(e++, at, f.pfn);
                return true;
            }
            for (const uint64_t stop = std::min(f.end(), end); at < stop; at++, e++) {
                if (index[e] != at)
                    return false;
                if (!mapped)
                    map_host(at, m);
                op(e, at, f.file_pfn(at));
            }
            return true;
        });
    } catch (...) {
        done = e;
        throw;
    }
    done = e;
    return e > k;
}

/*
 * guest_scattered - guest_run() over elements @k, @k + 1, ... < @limit of a scattered
 * chunk, pre[e - k] the folio of index[e] found ahead (find_folios), up to the first
 * element whose folio was not found present and uptodate: that one takes the single path
 * (which allocates, zeroes or raises).
 */
template <class Op>
bool GuestMemfd::guest_scattered(const uint64_t *index, size_t k, size_t limit,
                                 const uint64_t *pre, FaultMemo &m, size_t &done, Op &&op)
{
    size_t e = k;
    try {
        for (; e < limit; e++) {
            const uint64_t i = index[e], v = pre[e - k];
            if (!(v & 1))
                break;
            const Run &run = attr_run(i, m);
            const bool priv = run.value & ATTR_PRIVATE;
            const unsigned fo = unsigned(v >> 1) & 31;
            const Folio f{i & ~(pages(fo) - 1), v >> 8, fo, true};
            uint64_t block = i;
            unsigned order = fo ? max_order(f, i, run, &block) : 0;
            if (GMEM_UNLIKELY(hears_mapped_ || (priv && (config_ & CONFIG_PREPARE))))
                guest_fault_hooks(block, f.file_pfn(block), order, priv);
            op(e, i, f.file_pfn(i), order);
        }
    } catch (...) {
        done = e;
        throw;
    }
    done = e;
    return e > k;
}

/* host_scattered - guest_scattered() for host faults; a private page takes the single path. */
template <class Op>
bool GuestMemfd::host_scattered(const uint64_t *index, size_t k, size_t limit,
                                const uint64_t *pre, FaultMemo &m, size_t &done, Op &&op)
{
    if (!(flags_ & FLAG_MMAP))
        return false;
    size_t e = k;
    try {
        for (; e < limit; e++) {
            const uint64_t i = index[e], v = pre[e - k];
            if (!(v & 1) || (attr_run(i, m).value & ATTR_PRIVATE))
                break;
            const unsigned fo = unsigned(v >> 1) & 31;
            map_host(i, m);
            op(e, i, (v >> 8) + (i & (pages(fo) - 1)));
        }
    } catch (...) {
        done = e;
        throw;
    }
    done = e;
    return e > k;
}

void GuestMemfd::get_pfns(const uint64_t *index, size_t n, uint64_t *pfn, uint8_t *order,
                          BulkCall &call)
{
    FaultMemo m;
    auto op = [&](size_t e, uint64_t, uint64_t p, unsigned o) {
        pfn[e] = p;
        order[e] = uint8_t(o);
    };
    bulk_faults(
        index, n, call, m,
        [&](size_t k) {
            auto r = fault_guest(index[k], m);
            op(k, index[k], r.first, r.second);
        },
        [&](size_t k, size_t limit, const uint64_t *pre, size_t &done) {
            return guest_run(index, k, limit, pre, m, done, op);
        });
}

void GuestMemfd::guest_read_many(const uint64_t *index, size_t n, uint64_t *token,
                                 BulkCall &call)
{
    FaultMemo m;
    ContentMap::Cursor pc;
    auto op = [&](size_t e, uint64_t, uint64_t p, unsigned) { token[e] = pm_->read(p, pc); };
    bulk_faults(
        index, n, call, m, [&](size_t k) { op(k, index[k], fault_guest(index[k], m).first, 0); },
        [&](size_t k, size_t limit, const uint64_t *pre, size_t &done) {
            return guest_run(index, k, limit, pre, m, done, op);
        });
}

void GuestMemfd::guest_write_many(const uint64_t *index, const uint64_t *token, size_t n,
                                  BulkCall &call)
{
    FaultMemo m;
    ContentMap::Cursor pc, ec;
    auto op = [&](size_t e, uint64_t at, uint64_t p, unsigned) {
        pm_->write(p, token[e], pc);
        expected_.store_one(at, token[e], ec);
    };
    bulk_faults(
        index, n, call, m, [&](size_t k) { op(k, index[k], fault_guest(index[k], m).first, 0); },
        [&](size_t k, size_t limit, const uint64_t *pre, size_t &done) {
            return guest_run(index, k, limit, pre, m, done, op);
        });
}

void GuestMemfd::host_read_many(const uint64_t *index, size_t n, uint64_t *token,
                                BulkCall &call)
{
    FaultMemo m;
    ContentMap::Cursor pc;
    auto op = [&](size_t e, uint64_t, uint64_t p) { token[e] = pm_->read(p, pc); };
    bulk_faults(
        index, n, call, m, [&](size_t k) { op(k, index[k], fault_host(index[k], m)); },
        [&](size_t k, size_t limit, const uint64_t *pre, size_t &done) {
            return host_run(index, k, limit, pre, m, done, op);
        });
}

void GuestMemfd::host_write_many(const uint64_t *index, const uint64_t *token, size_t n,
                                 BulkCall &call)
{
    FaultMemo m;
    ContentMap::Cursor pc, ec;
    auto op = [&](size_t e, uint64_t at, uint64_t p) {
        pm_->write(p, token[e], pc);
        expected_.store_one(at, token[e], ec);
    };
    bulk_faults(
        index, n, call, m, [&](size_t k) { op(k, index[k], fault_host(index[k], m)); },
        [&](size_t k, size_t limit, const uint64_t *pre, size_t &done) {
            return host_run(index, k, limit, pre, m, done, op);
        });
}

void GuestMemfd::set_attributes_many(const uint64_t *start, const uint64_t *end,
                                     const uint64_t *attrs, size_t n, BulkCall &call)
{
    bulk(n, call, [&](size_t k) { set_attributes(start[k], end[k], attrs[k]); });
}

} // namespace gmem
