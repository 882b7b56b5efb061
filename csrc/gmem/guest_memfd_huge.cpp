// SPDX-License-Identifier: MIT
// guest_memfd_huge.cpp - the "hugetlb" policy: huge folios split on share, merged on
// unshare, zeroed on a partial punch and reclaimed whole.
//
// DOC: HugePolicy
//
// Under "hugetlb" (the guest_memfd HugeTLB series; docs/model.md, "Huge folios") every
// folio of the file is a huge page of 2**folio_order pages or one order-0 piece of one,
// and a huge block is in the page cache whole or not at all:
//
//     block:   [ 2 MiB folio, all PRIVATE ]   [ 512 order-0 pieces, PFNs base + i ]
//     share:   split first, so the host maps and pins 4 KiB pages one by one
//     unshare: the block wholly private again, none of it poisoned -> merged back
//     punch:   pages of a block zeroed and kept; the block reclaimed whole when the
//              whole of it has been punched
//
// Invariant (check_huge): no shared page lives in a huge folio, and the pieces of a
// split block are its pages, physically contiguous and aligned, all present.
#include <algorithm>

#include "errors.hpp"
#include "guest_memfd.hpp"
#include "host.hpp"

namespace gmem {

const char *policy_name(HugePolicy p) { return p == HugePolicy::HugeTLB ? "hugetlb" : "none"; }

/* Remove [start, end) from a map of disjoint ranges (start -> end). */
static void erase_ranges(std::map<uint64_t, uint64_t> &m, uint64_t start, uint64_t end)
{
    auto it = m.upper_bound(start);
    if (it != m.begin() && std::prev(it)->second > start)
        --it;
    while (it != m.end() && it->first < end) {
        uint64_t a = it->first, b = it->second;
        it = m.erase(it);
        if (a < start)
            m[a] = start;
        if (b > end)
            m[end] = b;
    }
}

/* Pages of [start, end) covered by a map of disjoint ranges. */
static uint64_t covered(const std::map<uint64_t, uint64_t> &m, uint64_t start, uint64_t end)
{
    uint64_t n = 0;
    auto it = m.upper_bound(start);
    if (it != m.begin() && std::prev(it)->second > start)
        --it;
    for (; it != m.end() && it->first < end; ++it)
        n += std::min(end, it->second) - std::max(start, it->first);
    return n;
}

void GuestMemfd::unpoison(uint64_t start, uint64_t end) { erase_ranges(poisoned_, start, end); }

bool GuestMemfd::poisoned_in(uint64_t start, uint64_t end) const
{
    return covered(poisoned_, start, end) != 0;
}

/* A page the file uses again (a fault, populate, fallocate) is no longer punched. */
void GuestMemfd::touch(uint64_t start, uint64_t end)
{
    if (!punched_.empty())
        erase_ranges(punched_, start, end);
}

/* Split a huge folio into order-0 pieces: the arch first (PSMASH, demote), then the cache. */
void GuestMemfd::split_huge(const Folio &f)
{
    arch_->split_folio(*this, f.index, f.pfn, f.order);
    stats_.folio_splits++;
}

/*
 * split_if_shared - a huge folio just added (a fault, fallocate, add_folio) over a block
 * with a shared page is split at once, as kvm_gmem_get_folio() does after allocating.
 * All or nothing: host memory running out leaves the folio whole and throws.
 */
void GuestMemfd::split_if_shared(const Folio &f)
{
    if (f.order == 0 || attrs_.range_has(f.index, f.end(), ATTR_PRIVATE))
        return;
    cache_.split_to_pages(f.index);
    split_huge(f);
}

/*
 * split_for_share - step 3 of a to-shared conversion under "hugetlb": every huge folio
 * the range touches is split into order-0 folios (kvm_gmem_restructure_folios_in_range,
 * RFC v2 splits to PAGE_SIZE, 1 GiB folios included), so no shared page stays in a huge
 * folio.  The page cache is split first, undone on failure; the arch models hear of each
 * split once nothing can fail any more, before the zap (TDX demotes before it zaps).
 */
std::vector<Folio> GuestMemfd::split_for_share(uint64_t start, uint64_t end)
{
    std::vector<Folio> huge;
    uint64_t pieces = 0;
    for (uint64_t b = huge_block(start); b < end; b += huge_pages()) {
        Folio f;
        if (cache_.lookup(b, &f) && f.order > 0) {
            huge.push_back(f);
            pieces += f.nr_pages();
        }
    }
    if (pieces > SMALL_REQUEST / FOLIO_BYTES && pieces > host_memory_available() / FOLIO_BYTES)
        throw OutOfMemory("set_attributes: splitting " + std::to_string(huge.size()) +
                          " huge folios needs " + std::to_string(pieces * FOLIO_BYTES >> 20) +
                          " MiB of page cache, more than the host has available; nothing "
                          "was converted");
    size_t done = 0;
    try {
        for (; done < huge.size(); done++)
            cache_.split_to_pages(huge[done].index);
    } catch (...) {
        while (done--)
            cache_.merge(huge[done].index, huge[done].order, huge[done].uptodate);
        throw;
    }
    return huge;
}

/*
 * merge_after_unshare - after a to-private conversion under "hugetlb": each split block
 * the range touches that is now wholly private is merged back into one huge folio (the
 * RFC's kvm_gmem_try_merge_folio_in_filemap).  Pieces never touched since the split are
 * zeroed first when others were, so the merged folio is uptodate as a whole.  A block
 * with a poisoned page cannot be merged: the merge is counted as blocked and tried again
 * by the next to-private conversion over the block; the poison, and so the block, stays
 * until the whole block leaves the file.
 */
void GuestMemfd::merge_after_unshare(uint64_t start, uint64_t end)
{
    for (uint64_t b = huge_block(start); b < end; b += huge_pages()) {
        Folio f;
        if (!cache_.lookup(b, &f) || f.order == folio_order_ ||
            !attrs_.range_has(b, b + huge_pages(), ATTR_PRIVATE))
            continue;
        if (poisoned_in(b, b + huge_pages())) {
            stats_.merges_blocked++;
            continue;
        }
        // The pieces, walked in place (no buffer: nothing here may allocate).
        uint64_t base = f.pfn, n = 0;
        bool whole = base % huge_pages() == 0, any_up = false, all_up = true;
        cache_.for_each_clamped(b, b + huge_pages(), [&](const Folio &p, const PfnRange &) {
            whole &= p.order == 0 && p.index == b + n && p.pfn == base + n;
            any_up |= p.uptodate;
            all_up &= p.uptodate;
            n++;
        });
        if (!whole || n != huge_pages()) { // never merge what is not one huge page
            violations_.push_back(violation("split-block-contiguous", b, base,
                                            "the pieces of a split huge folio are not its "
                                            "pages, contiguous and aligned"));
            continue;
        }
        if (any_up && !all_up)
            cache_.for_each_clamped(b, b + huge_pages(), [&](const Folio &p, const PfnRange &) {
                if (p.uptodate)
                    return;
                pm_->fill(p.pfn, 1, 0);
                expected_.store(p.index, p.index + 1, 0);
                stats_.pages_zeroed++;
            });
        cache_.merge(b, folio_order_, any_up);
        stats_.folio_merges++;
        arch_->merge_folio(*this, b, base, folio_order_);
    }
}

/*
 * punch_huge - fallocate(PUNCH_HOLE) under "hugetlb" (the RFC's
 * kvm_gmem_truncate_inode_range): the pages of a block the range covers in part are
 * zeroed and stay in the page cache, marked punched; a block the punches have covered
 * whole - in this call or with earlier ones - is taken out and reclaimed once, as one
 * huge folio, even if it was split.
 */
void GuestMemfd::punch_huge(uint64_t start, uint64_t end)
{
    // Blocks to release: those [start, end) covers, and an edge block whose other pages
    // were all punched before.
    uint64_t lo = (start + huge_pages() - 1) & ~(huge_pages() - 1), hi = huge_block(end);
    auto whole_after = [&](uint64_t b) {
        uint64_t in = std::min(end, b + huge_pages()) - std::max(start, b);
        return covered(punched_, b, b + huge_pages()) + in -
                   covered(punched_, std::max(start, b), std::min(end, b + huge_pages())) ==
               huge_pages();
    };
    if (lo > hi) { // start and end inside one block
        lo = hi = huge_block(start);
        if (whole_after(lo))
            hi = lo + huge_pages();
    } else {
        if (lo > start && whole_after(huge_block(start)))
            lo = huge_block(start);
        if (hi < end && whole_after(hi))
            hi += huge_pages();
    }
    std::vector<Folio> chunk(std::min<uint64_t>(RELEASE_CHUNK, cache_.count(lo, hi) + 1));
    expected_.reserve_stores(1);
    invalidate_begin(start, end, FILTER_SHARED | FILTER_PRIVATE);
    mapped_.erase(mapped_.lower_bound(start), mapped_.lower_bound(end));
    // Zero and mark the pages outside the released blocks that are in the page cache.
    for (auto part : {std::make_pair(start, std::min(end, lo)),
                      std::make_pair(std::max(start, hi), end)}) {
        if (part.first >= part.second)
            continue;
        cache_.walk_extents(part.first, part.second, [&](uint64_t index, uint64_t pfn,
                                                         uint64_t nr, bool) {
            pm_->fill(pfn, nr, 0);
            stats_.pages_punched_zeroed += nr;
            auto it = punched_.lower_bound(index);
            uint64_t a = index, b = index + nr;
            if (it != punched_.begin() && std::prev(it)->second >= a)
                a = (--it)->first;
            while (it != punched_.end() && it->first <= b) {
                b = std::max(b, it->second);
                it = punched_.erase(it);
            }
            punched_[a] = b;
        });
    }
    expected_.store(start, end, 0);
    if (lo < hi) {
        release_range(lo, hi, false, &chunk);
        erase_ranges(punched_, lo, hi);
        unpoison(lo, hi);
    }
    arch_->invalidate_end(*this, start, end);
}

/*
 * check_huge - the policy's invariants in the current state: a huge folio holds only
 * private pages the host neither maps nor pins; the pieces of a split block are its
 * pages (physically contiguous, aligned) and all present.
 */
void GuestMemfd::check_huge(std::vector<Violation> &out) const
{
    uint64_t block = NO_PFN, base = 0, seen = 0;
    auto close_block = [&] {
        if (block != NO_PFN && seen != huge_pages())
            out.push_back(violation("split-block-complete", block, base,
                                    std::to_string(seen) + " of the " +
                                        std::to_string(huge_pages()) +
                                        " pages of a split huge folio are in the page cache"));
        block = NO_PFN;
    };
    cache_.for_each_clamped(0, nr_pages_, [&](const Folio &f, const PfnRange &) {
        if (f.order == folio_order_) {
            close_block();
            if (!attrs_.range_has(f.index, f.end(), ATTR_PRIVATE) ||
                mapped_in(f.index, f.end()) || pins_in(f.pfn, f.nr_pages()))
                out.push_back(violation("huge-folio-holds-only-private-pages", f.index, f.pfn,
                                        "a huge folio holds a page that is shared, or that "
                                        "the host maps or pins"));
            return;
        }
        if (f.order != 0) {
            out.push_back(violation("hugetlb-folio-order", f.index, f.pfn,
                                    "a folio of order " + std::to_string(f.order) +
                                        " under the hugetlb policy"));
            return;
        }
        if (huge_block(f.index) != block) {
            close_block();
            block = huge_block(f.index);
            base = f.pfn - (f.index - block);
            seen = 0;
        }
        seen++;
        if (f.pfn != base + (f.index - block) || base % huge_pages())
            out.push_back(violation("split-block-contiguous", f.index, f.pfn,
                                    "a piece of a split huge folio is not the block's page "
                                    "(pfns not contiguous or not aligned)"));
    });
    close_block();
}

} // namespace gmem
