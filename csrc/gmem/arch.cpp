// SPDX-License-Identifier: MIT
// arch.cpp - the SNP and pKVM models: RMP updates, ownership, scrubbing, their contracts.
#include "arch.hpp"

#include <algorithm>

#include "errors.hpp"
#include "guest_memfd.hpp"

namespace gmem {

static constexpr uint64_t PMD_PAGES = 512; // one 2 MiB RMP entry

/*
 * SNP::prepare - RMPUPDATE the block private.  A block of at least 2 MiB gets 2 MiB
 * entries where the aligned 2 MiB is wholly unassigned; everything else gets 4 KiB
 * entries, and pages already assigned are left alone.
 */
void SNP::prepare(GuestMemfd &f, uint64_t, uint64_t pfn, uint64_t nr)
{
    PhysMem &pm = f.physmem();
    IntervalMap &rmp = pm.rmp();
    const uint64_t base = pm.base_pfn();
    for (uint64_t p = pfn; p < pfn + nr;) {
        if (nr >= PMD_PAGES && p % PMD_PAGES == 0 && p + PMD_PAGES <= pfn + nr &&
            rmp.range_has(p - base, p - base + PMD_PAGES, RMP_SHARED)) {
            rmp.store(p - base, p - base + PMD_PAGES, RMP_2M);
            rmp_updates++;
            p += PMD_PAGES;
            continue;
        }
        uint64_t stop = std::min(pfn + nr, (p / PMD_PAGES + 1) * PMD_PAGES);
        uint64_t unassigned = 0;
        rmp.for_each_run(p - base, stop - base, [&](uint64_t a, uint64_t b, uint64_t v) {
            unassigned += v == RMP_SHARED ? b - a : 0;
        });
        if (unassigned == stop - p) {
            rmp.store(p - base, stop - base, RMP_4K);
        } else if (unassigned) {
            for (const Run &r : rmp.runs(p - base, stop - base))
                if (r.value == RMP_SHARED)
                    rmp.store(r.start, r.end, RMP_4K);
        }
        rmp_updates += unassigned;
        p = stop;
    }
}

void SNP::rmp_make_shared(GuestMemfd &f, uint64_t start_pfn, uint64_t end_pfn)
{
    PhysMem &pm = f.physmem();
    IntervalMap &rmp = pm.rmp();
    const uint64_t base = pm.base_pfn();
    // A 2 MiB entry the range covers only in part is split into 4 KiB entries first
    // (an edge on a 2 MiB boundary cannot cut one).
    for (uint64_t edge : {start_pfn, end_pfn - 1}) {
        if (edge == start_pfn ? start_pfn % PMD_PAGES == 0 : end_pfn % PMD_PAGES == 0)
            continue;
        uint64_t region = edge & ~(PMD_PAGES - 1);
        bool partial = region < start_pfn || region + PMD_PAGES > end_pfn;
        if (partial && region >= base && region + PMD_PAGES <= pm.end_pfn() &&
            rmp.range_has(region - base, region - base + PMD_PAGES, RMP_2M)) {
            rmp.store(region - base, region - base + PMD_PAGES, RMP_4K);
            psmash++;
        }
    }
    uint64_t entries = 0;
    rmp.for_each_run(start_pfn - base, end_pfn - base, [&](uint64_t a, uint64_t b, uint64_t v) {
        if (v == RMP_4K)
            entries += b - a;
        else if (v == RMP_2M)
            entries += (b - a) / PMD_PAGES;
    });
    rmp_updates += entries;
    cache_flushes += entries;
    rmp.store(start_pfn - base, end_pfn - base, RMP_SHARED);
}

/*
 * The kernel calls these once per folio.  Ranges that continue one another are given back
 * in one step, across batches, until a gap or flush(): a 2 MiB RMP entry never spans two
 * folios (it is only made for a block of a folio of at least 2 MiB), so merging changes
 * no count, and a conversion of contiguous folios costs O(extents) RMP updates.
 */
void SNP::make_shared(GuestMemfd &f, const PfnRange *r, size_t n)
{
    // A batch of 31 (the built-in model gets merged extents; a subclass gets batches)
    // usually continues the pending range throughout: found with compares that do not
    // wait for one another, then one extension.
    if (n && pending_.end_pfn > pending_.start_pfn && pending_.end_pfn == r[0].start_pfn) {
        uint64_t gaps = 0;
        for (size_t i = 1; i < n; i++)
            gaps |= r[i].start_pfn ^ r[i - 1].end_pfn;
        if (!gaps) {
            pending_.end_pfn = r[n - 1].end_pfn;
            return;
        }
    }
    for (size_t i = 0; i < n;) {
        // The ranges that continue the pending one extend it, in a tight loop.
        uint64_t from = pending_.start_pfn, to = pending_.end_pfn;
        while (i < n && to > from && to == r[i].start_pfn)
            to = r[i++].end_pfn;
        pending_.end_pfn = to;
        if (i < n) {
            flush(f);
            pending_ = r[i++];
        }
    }
}

void SNP::free_folio(GuestMemfd &f, const PfnRange *r, size_t n) { make_shared(f, r, n); }

void SNP::flush(GuestMemfd &f)
{
    if (pending_.end_pfn > pending_.start_pfn)
        rmp_make_shared(f, pending_.start_pfn, pending_.end_pfn);
    pending_ = PfnRange{0, 0};
}

void SNP::check_freed(const GuestMemfd &f, uint64_t pfn, uint64_t nr,
                      std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    pm.rmp().for_each_run(pfn - pm.base_pfn(), pfn + nr - pm.base_pfn(),
                          [&](uint64_t a, uint64_t b, uint64_t v) {
                              if (v != RMP_SHARED)
                                  out.push_back(Violation{
                                      name(), "free-pool-page-unassigned", NO_PFN,
                                      a + pm.base_pfn(),
                                      std::to_string(b - a) +
                                          " pages go back to the free pool still assigned "
                                          "in the RMP"});
                          });
}

void SNP::check_host_reach(const GuestMemfd &f, uint64_t index, uint64_t pfn,
                           std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    if (pm.rmp().load(pfn - pm.base_pfn()) != RMP_SHARED)
        out.push_back(Violation{name(), "host-reaches-unassigned-pages", index, pfn,
                                "the host maps a page assigned in the RMP (RMP fault)"});
}

void SNP::post_populate(GuestMemfd &f, uint64_t, uint64_t pfn, bool, uint64_t)
{
    PhysMem &pm = f.physmem();
    if (pm.rmp().load(pfn - pm.base_pfn()) == RMP_SHARED) {
        pm.rmp().store(pfn - pm.base_pfn(), pfn - pm.base_pfn() + 1, RMP_4K);
        rmp_updates++;
    }
    launch_updates++;
}

/* A huge folio is split: its 2 MiB RMP entries become 512 4 KiB ones each (PSMASH). */
void SNP::split_folio(GuestMemfd &f, uint64_t, uint64_t pfn, unsigned order)
{
    PhysMem &pm = f.physmem();
    const uint64_t base = pm.base_pfn();
    for (uint64_t p = pfn; p + PMD_PAGES <= pfn + (uint64_t(1) << order); p += PMD_PAGES)
        if (pm.rmp().range_has(p - base, p - base + PMD_PAGES, RMP_2M)) {
            pm.rmp().store(p - base, p - base + PMD_PAGES, RMP_4K);
            psmash++;
        }
}

/*
 * Pieces merged back into a huge folio, wholly private: each 2 MiB region of it is made
 * one assigned 2 MiB entry again (one RMPUPDATE), the pages converted back included -
 * the private fault that follows maps the block at 2 MiB and finds it assigned.
 */
void SNP::merge_folio(GuestMemfd &f, uint64_t, uint64_t pfn, unsigned order)
{
    PhysMem &pm = f.physmem();
    const uint64_t base = pm.base_pfn();
    for (uint64_t p = pfn; p + PMD_PAGES <= pfn + (uint64_t(1) << order); p += PMD_PAGES)
        if (!pm.rmp().range_has(p - base, p - base + PMD_PAGES, RMP_2M)) {
            pm.rmp().store(p - base, p - base + PMD_PAGES, RMP_2M);
            rmp_updates++;
            rmp_2m_restores++;
        }
}

/* No assigned 2 MiB RMP entry may cover a page of the file that is shared. */
void SNP::check_state(const GuestMemfd &f, std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    const uint64_t base = pm.base_pfn();
    f.cache().walk_extents(0, f.nr_pages(), [&](uint64_t index, uint64_t pfn, uint64_t nr, bool) {
        pm.rmp().for_each_run(pfn - base, pfn + nr - base, [&](uint64_t a, uint64_t b, uint64_t v) {
            uint64_t i0 = index + (a + base - pfn), i1 = index + (b + base - pfn);
            if (v == RMP_2M && !f.attrs().range_has(i0, i1, ATTR_PRIVATE))
                out.push_back(Violation{name(), "rmp-2m-covers-shared-page", i0, a + base,
                                        "an assigned 2 MiB RMP entry covers a shared page of "
                                        "[" + std::to_string(i0) + ", " + std::to_string(i1) +
                                        ")"});
        });
    });
}

std::map<std::string, uint64_t> SNP::stats() const
{
    return {{"rmp_updates", rmp_updates},
            {"psmash", psmash},
            {"cache_flushes", cache_flushes},
            {"launch_updates", launch_updates},
            {"rmp_2m_restores", rmp_2m_restores}};
}

/* A private fault of a 2 MiB (or larger) block maps it with 2 MiB leaves. */
void TDX::guest_mapped(GuestMemfd &, uint64_t index, uint64_t, uint64_t nr, bool priv)
{
    if (!priv || nr < PMD_PAGES)
        return;
    for (uint64_t r = index; r + PMD_PAGES <= index + nr; r += PMD_PAGES)
        leaves_2m_.insert(r);
}

/* TDH.MEM.PAGE.DEMOTE of the 2 MiB leaf at @region, retried once after a BUSY. */
void TDX::demote(uint64_t region)
{
    if (busy_every_ && ++attempts_ % busy_every_ == 0)
        demote_busy++; // TDX_OPERAND_BUSY: KVM kicks the vCPUs out and tries again
    demotes++;
    leaves_2m_.erase(region);
}

/* A zap of private mappings: 2 MiB leaves inside go, ones the range cuts are demoted. */
void TDX::invalidate_start(GuestMemfd &, uint64_t start, uint64_t end, unsigned kinds)
{
    if (!(kinds & FILTER_PRIVATE))
        return;
    auto it = leaves_2m_.lower_bound(start >= PMD_PAGES ? start - PMD_PAGES + 1 : 0);
    while (it != leaves_2m_.end() && *it < end) {
        uint64_t r = *it++;
        if (r < start || r + PMD_PAGES > end)
            demote(r);
        else
            leaves_2m_.erase(r);
    }
}

void TDX::split_folio(GuestMemfd &, uint64_t index, uint64_t, unsigned order)
{
    auto it = leaves_2m_.lower_bound(index);
    while (it != leaves_2m_.end() && *it < index + (uint64_t(1) << order))
        demote(*it++);
}

void TDX::merge_folio(GuestMemfd &, uint64_t index, uint64_t, unsigned order)
{
    for (uint64_t r = index; r + PMD_PAGES <= index + (uint64_t(1) << order); r += PMD_PAGES) {
        leaves_2m_.insert(r);
        promotes++;
    }
}

/* A 2 MiB leaf maps only private pages, all in one folio of at least 2 MiB. */
void TDX::check_state(const GuestMemfd &f, std::vector<Violation> &out) const
{
    for (uint64_t r : leaves_2m_) {
        Folio folio;
        if (!f.attrs().range_has(r, r + PMD_PAGES, ATTR_PRIVATE))
            out.push_back(Violation{name(), "sept-2m-covers-shared-page", r, NO_PFN,
                                    "a 2 MiB Secure EPT leaf maps a shared page"});
        else if (!f.cache().lookup(r, &folio) || folio.nr_pages() < PMD_PAGES)
            out.push_back(Violation{name(), "sept-2m-within-one-folio", r, NO_PFN,
                                    "a 2 MiB Secure EPT leaf maps pages of smaller folios"});
    }
}

std::map<std::string, uint64_t> TDX::stats() const
{
    return {{"pages_added", pages_added},
            {"demotes", demotes},
            {"demote_busy", demote_busy},
            {"promotes", promotes}};
}

void PKVM::set_owner(PhysMem &pm, uint64_t start_pfn, uint64_t end_pfn, uint64_t owner)
{
    uint64_t a = start_pfn - pm.base_pfn(), b = end_pfn - pm.base_pfn();
    pm.owner().for_each_run(a, b, [&](uint64_t s, uint64_t e, uint64_t v) {
        if (v != owner)
            (owner == OWNER_GUEST ? pages_donated : pages_shared) += e - s;
    });
    pm.owner().store(a, b, owner);
}

/* pKVM teardown: scrub the pages, then hand them back to the host. */
void PKVM::free_folio(GuestMemfd &f, const PfnRange *r, size_t n)
{
    PhysMem &pm = f.physmem();
    PfnRange merged[FOLIO_BATCH_SIZE];
    for (size_t first = 0; first < n; first += FOLIO_BATCH_SIZE) {
        size_t m = coalesce(r + first, std::min<size_t>(FOLIO_BATCH_SIZE, n - first), merged);
        contents_touched = true;
        for (size_t i = 0; i < m; i++) {
            uint64_t nr = merged[i].end_pfn - merged[i].start_pfn;
            pm.fill(merged[i].start_pfn, nr, 0);
            pm.owner().store(merged[i].start_pfn - pm.base_pfn(),
                             merged[i].end_pfn - pm.base_pfn(), OWNER_HOST);
            pages_scrubbed += nr;
        }
    }
}

void PKVM::guest_mapped(GuestMemfd &f, uint64_t, uint64_t pfn, uint64_t nr, bool priv)
{
    set_owner(f.physmem(), pfn, pfn + nr, priv ? OWNER_GUEST : OWNER_SHARED);
}

/* The host records the guest's share/unshare hypercall: ownership follows attributes. */
void PKVM::attributes_set(GuestMemfd &f, uint64_t start, uint64_t end, uint64_t attrs)
{
    uint64_t owner = (attrs & ATTR_PRIVATE) ? OWNER_GUEST : OWNER_SHARED;
    f.cache().walk_extents(start, end, [&](uint64_t, uint64_t pfn, uint64_t nr, bool) {
        set_owner(f.physmem(), pfn, pfn + nr, owner);
    });
}

void PKVM::check_freed(const GuestMemfd &f, uint64_t pfn, uint64_t nr,
                       std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    for (const Run &r : pm.contents(pfn, nr)) // a freed folio holds few runs
        if (r.value != 0)
            out.push_back(Violation{name(), "free-pool-page-scrubbed", NO_PFN, r.start,
                                    std::to_string(r.end - r.start) +
                                        " pages go back to the free pool holding " +
                                        hex(r.value)});
    for (const Run &r : pm.owner().runs(pfn - pm.base_pfn(), pfn + nr - pm.base_pfn()))
        if (r.value != OWNER_HOST)
            out.push_back(Violation{name(), "free-pool-page-host-owned", NO_PFN,
                                    r.start + pm.base_pfn(),
                                    std::to_string(r.end - r.start) +
                                        " pages go back to the free pool not owned by the "
                                        "host"});
}

void PKVM::check_host_reach(const GuestMemfd &f, uint64_t index, uint64_t pfn,
                            std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    if (pm.owner().load(pfn - pm.base_pfn()) == OWNER_GUEST)
        out.push_back(Violation{name(), "host-never-reaches-guest-pages", index, pfn,
                                "the host maps a page the guest owns"});
}

void Recorder::prepare(GuestMemfd &f, uint64_t index, uint64_t pfn, uint64_t nr)
{
    std::lock_guard<std::mutex> lk(log_lock_);
    calls_.push_back({f.hook_design() == HookDesign::Mainline ? "make_private" : "prepare", index,
                      pfn, nr});
}

void Recorder::free_folio(GuestMemfd &f, const PfnRange *r, size_t n)
{
    log_ranges(f.hook_design() == HookDesign::Mainline ? "reclaim" : "free_folio", r, n);
}

std::map<std::string, uint64_t> PKVM::stats() const
{
    return {{"pages_scrubbed", pages_scrubbed},
            {"pages_donated", pages_donated},
            {"pages_shared", pages_shared}};
}

} // namespace gmem
