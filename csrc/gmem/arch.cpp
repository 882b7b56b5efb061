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
        for (const Run &r : rmp.runs(p - base, stop - base))
            if (r.value == RMP_SHARED) {
                rmp.store(r.start, r.end, RMP_4K);
                rmp_updates += r.end - r.start;
            }
        p = stop;
    }
}

void SNP::rmp_make_shared(GuestMemfd &f, uint64_t start_pfn, uint64_t end_pfn)
{
    PhysMem &pm = f.physmem();
    IntervalMap &rmp = pm.rmp();
    const uint64_t base = pm.base_pfn();
    // A 2 MiB entry the range covers only in part is split into 4 KiB entries first.
    for (uint64_t edge : {start_pfn, end_pfn - 1}) {
        uint64_t region = edge & ~(PMD_PAGES - 1);
        bool partial = region < start_pfn || region + PMD_PAGES > end_pfn;
        if (partial && region >= base && region + PMD_PAGES <= pm.end_pfn() &&
            rmp.range_has(region - base, region - base + PMD_PAGES, RMP_2M)) {
            rmp.store(region - base, region - base + PMD_PAGES, RMP_4K);
            psmash++;
        }
    }
    uint64_t entries = 0;
    for (const Run &r : rmp.runs(start_pfn - base, end_pfn - base)) {
        if (r.value == RMP_4K)
            entries += r.end - r.start;
        else if (r.value == RMP_2M)
            entries += (r.end - r.start) / PMD_PAGES;
    }
    rmp_updates += entries;
    cache_flushes += entries;
    rmp.store(start_pfn - base, end_pfn - base, RMP_SHARED);
}

void SNP::make_shared(GuestMemfd &f, const PfnRange *r, size_t n)
{
    for (size_t i = 0; i < n; i++)
        rmp_make_shared(f, r[i].start_pfn, r[i].end_pfn);
}

void SNP::free_folio(GuestMemfd &f, const PfnRange *r, size_t n) { make_shared(f, r, n); }

void SNP::check_freed(const GuestMemfd &f, uint64_t pfn, uint64_t nr,
                      std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    for (const Run &r : pm.rmp().runs(pfn - pm.base_pfn(), pfn + nr - pm.base_pfn()))
        if (r.value != RMP_SHARED)
            out.push_back(Violation{name(), "free-pool-page-unassigned", NO_PFN,
                                    r.start + pm.base_pfn(),
                                    std::to_string(r.end - r.start) +
                                        " pages go back to the free pool still assigned "
                                        "in the RMP"});
}

void SNP::check_host_reach(const GuestMemfd &f, uint64_t index, uint64_t pfn,
                           std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    if (pm.rmp().load(pfn - pm.base_pfn()) != RMP_SHARED)
        out.push_back(Violation{name(), "host-reaches-unassigned-pages", index, pfn,
                                "the host maps a page assigned in the RMP (RMP fault)"});
}

std::map<std::string, uint64_t> SNP::stats() const
{
    return {{"rmp_updates", rmp_updates}, {"psmash", psmash}, {"cache_flushes", cache_flushes}};
}

/* pKVM teardown: scrub the pages, then hand them back to the host. */
void PKVM::free_folio(GuestMemfd &f, const PfnRange *r, size_t n)
{
    PhysMem &pm = f.physmem();
    for (size_t i = 0; i < n; i++) {
        uint64_t nr = r[i].end_pfn - r[i].start_pfn;
        pm.fill(r[i].start_pfn, nr, 0);
        pm.owner().store(r[i].start_pfn - pm.base_pfn(), r[i].end_pfn - pm.base_pfn(),
                         OWNER_HOST);
        pages_scrubbed += nr;
    }
}

void PKVM::guest_mapped(GuestMemfd &f, uint64_t, uint64_t pfn, uint64_t nr, bool priv)
{
    PhysMem &pm = f.physmem();
    uint64_t owner = priv ? OWNER_GUEST : OWNER_SHARED;
    for (const Run &r : pm.owner().runs(pfn - pm.base_pfn(), pfn + nr - pm.base_pfn()))
        if (r.value != owner)
            (priv ? pages_donated : pages_shared) += r.end - r.start;
    pm.owner().store(pfn - pm.base_pfn(), pfn + nr - pm.base_pfn(), owner);
}

/* The host records the guest's share/unshare hypercall: ownership follows attributes. */
void PKVM::attributes_set(GuestMemfd &f, uint64_t start, uint64_t end, uint64_t attrs)
{
    PhysMem &pm = f.physmem();
    uint64_t owner = (attrs & ATTR_PRIVATE) ? OWNER_GUEST : OWNER_SHARED;
    f.cache().walk_batches(start, end, [&](const Folio *, const PfnRange *rs, unsigned n) {
        for (unsigned i = 0; i < n; i++) {
            uint64_t a = rs[i].start_pfn - pm.base_pfn(), b = rs[i].end_pfn - pm.base_pfn();
            for (const Run &r : pm.owner().runs(a, b))
                if (r.value != owner)
                    (owner == OWNER_GUEST ? pages_donated : pages_shared) += r.end - r.start;
            pm.owner().store(a, b, owner);
        }
    });
}

void PKVM::check_freed(const GuestMemfd &f, uint64_t pfn, uint64_t nr,
                       std::vector<Violation> &out) const
{
    const PhysMem &pm = f.physmem();
    for (const Run &r : pm.contents(pfn, nr))
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

std::map<std::string, uint64_t> PKVM::stats() const
{
    return {{"pages_scrubbed", pages_scrubbed},
            {"pages_donated", pages_donated},
            {"pages_shared", pages_shared}};
}

} // namespace gmem
