// SPDX-License-Identifier: MIT
// physmem.cpp - the buddy allocator and the sparse content store of PhysMem.
#include "physmem.hpp"

#include <algorithm>
#include <sstream>

#include "errors.hpp"
#include "host.hpp"
#include "interrupt.hpp"

namespace gmem {

static inline uint64_t pages(unsigned order) { return uint64_t(1) << order; }

static uint64_t checked_size(uint64_t nr_pages, uint64_t base_pfn)
{
    if (nr_pages == 0)
        throw invalid("nr_pages", "must be at least 1");
    if (base_pfn >= PFN_LIMIT || nr_pages > PFN_LIMIT - base_pfn)
        throw invalid("nr_pages", "base_pfn + nr_pages must be <= 2**52 (52-bit PFNs), got " +
                                      std::to_string(base_pfn) + " + " +
                                      std::to_string(nr_pages));
    return nr_pages;
}

std::map<uint64_t, uint64_t>::const_iterator FreeList::run_of(uint64_t pfn) const
{
    auto it = runs_.upper_bound(pfn);
    if (it == runs_.begin())
        return runs_.end();
    --it;
    return pfn < it->second ? it : runs_.end();
}

uint64_t FreeList::at_or_after(uint64_t pfn) const
{
    if (!runs_mode_) {
        auto it = set_.lower_bound(pfn);
        return it == set_.end() ? UINT64_MAX : *it;
    }
    auto it = run_of(pfn);
    if (it != runs_.end()) {
        uint64_t p = it->first + (pfn - it->first + block_ - 1) / block_ * block_;
        if (p < it->second)
            return p;
        ++it;
    } else {
        it = runs_.lower_bound(pfn);
    }
    return it == runs_.end() ? UINT64_MAX : it->first;
}

void FreeList::insert(uint64_t pfn, uint64_t n)
{
    if (!runs_mode_) {
        for (uint64_t i = 0; i < n; i++)
            set_.insert(pfn + i * block_);
        nr_blocks_ += n;
        return;
    }
    uint64_t end = pfn + n * block_;
    auto next = runs_.lower_bound(pfn);
    bool join_next = next != runs_.end() && next->first == end;
    if (next != runs_.begin()) {
        auto prev = std::prev(next);
        if (prev->second == pfn) {
            prev->second = join_next ? next->second : end;
            if (join_next)
                runs_.erase(next);
            nr_blocks_ += n;
            return;
        }
    }
    if (join_next) {
        // Re-key the next run to start at pfn: insert first (may throw), then erase.
        uint64_t next_end = next->second;
        runs_.emplace_hint(next, pfn, next_end);
        runs_.erase(next);
    } else {
        runs_.emplace_hint(next, pfn, end);
    }
    nr_blocks_ += n;
}

void FreeList::erase(uint64_t pfn)
{
    if (!runs_mode_) {
        nr_blocks_ -= set_.erase(pfn);
        return;
    }
    auto it = std::prev(runs_.upper_bound(pfn)); // the run holding pfn: callers check
    uint64_t end = it->second;
    if (pfn + block_ < end)
        runs_.emplace_hint(std::next(it), pfn + block_, end); // may throw: nothing changed yet
    if (it->first == pfn)
        runs_.erase(it);
    else
        it->second = pfn;
    nr_blocks_--;
}

uint64_t FreeList::erase_range(uint64_t lo, uint64_t hi)
{
    uint64_t n = 0;
    for (uint64_t p; (p = at_or_after(lo)) < hi; n++)
        erase(p);
    return n;
}

PhysMem::PhysMem(uint64_t nr_pages, uint64_t base_pfn, uint64_t seed)
    : base_(base_pfn), nr_pages_(checked_size(nr_pages, base_pfn)), seed_(seed), rng_{seed},
      tokens_(nr_pages), rmp_(nr_pages), owner_(nr_pages), user_(nr_pages)
{
    for (unsigned o = 0; o <= MAX_ORDER; o++)
        free_[o] = FreeList(pages(o), o == MAX_ORDER);
    add_free_range(base_, base_ + nr_pages_);
}

/* Tile [start, end) with the largest naturally aligned blocks, lowest address first; the
 * top-order blocks of the middle go in as one run, however many. */
void PhysMem::add_free_range(uint64_t start, uint64_t end)
{
    while (start < end) {
        unsigned order = 0;
        while (order < MAX_ORDER && (start & pages(order)) == 0 &&
               start + pages(order + 1) <= end)
            order++;
        uint64_t n = order == MAX_ORDER ? (end - start) >> MAX_ORDER : 1;
        free_[order].insert(start, n);
        nr_free_ += n << order;
        start += n << order;
    }
}

void PhysMem::check_order(unsigned order, const char *arg) const
{
    if (order > MAX_ORDER)
        throw invalid(arg, "must be in 0..18, got " + std::to_string(order));
}

void PhysMem::check_pfn(uint64_t pfn, const char *arg) const
{
    if (pfn < base_ || pfn >= end_pfn())
        throw invalid(arg, "must be in [" + std::to_string(base_) + ", " +
                               std::to_string(end_pfn()) + "), got " + std::to_string(pfn));
}

void PhysMem::check_block(uint64_t pfn, unsigned order) const
{
    check_order(order);
    if (pfn & (pages(order) - 1))
        throw invalid("pfn", "must be aligned to 2**order = " + std::to_string(pages(order)) +
                                 " pages, got " + std::to_string(pfn));
    check_pfn(pfn);
    if (pages(order) > end_pfn() - pfn)
        throw invalid("order", "block [" + std::to_string(pfn) + ", " +
                                   std::to_string(pfn + pages(order)) +
                                   ") runs past the end of physical memory (" +
                                   std::to_string(end_pfn()) + ")");
}

bool PhysMem::try_alloc(unsigned order, uint64_t *pfn)
{
    check_order(order);
    unsigned best = MAX_ORDER + 1;
    uint64_t best_pfn = 0;
    for (unsigned o = order; o <= MAX_ORDER; o++) {
        if (!free_[o].empty() && (best > MAX_ORDER || free_[o].first() < best_pfn)) {
            best = o;
            best_pfn = free_[o].first();
        }
    }
    if (best > MAX_ORDER)
        return false;
    free_[best].erase(best_pfn);
    // Hand out the lowest 2**order pages; the upper halves go back one order at a time.
    for (unsigned o = best; o > order; o--)
        free_[o - 1].insert(best_pfn + pages(o - 1));
    nr_free_ -= pages(order);
    *pfn = best_pfn;
    return true;
}

uint64_t PhysMem::alloc(unsigned order)
{
    uint64_t pfn;
    if (!try_alloc(order, &pfn))
        throw OutOfMemory("PhysMem: no free block of order " + std::to_string(order) + " (" +
                          std::to_string(nr_free_) + " pages free in " +
                          std::to_string(nr_free_blocks()) + " blocks)");
    return pfn;
}

/* The free block that contains all of [pfn, pfn + 2**order), if there is one. */
bool PhysMem::find_free_container(uint64_t pfn, unsigned order, uint64_t *block,
                                  unsigned *block_order) const
{
    for (unsigned o = order; o <= MAX_ORDER; o++) {
        uint64_t b = pfn & ~(pages(o) - 1);
        if (free_[o].contains(b)) {
            *block = b;
            *block_order = o;
            return true;
        }
    }
    return false;
}

bool PhysMem::is_free(uint64_t pfn, unsigned order) const
{
    uint64_t b;
    unsigned bo;
    return find_free_container(pfn, order, &b, &bo);
}

void PhysMem::take(uint64_t pfn, unsigned order)
{
    check_block(pfn, order);
    uint64_t b;
    unsigned bo;
    if (!find_free_container(pfn, order, &b, &bo))
        throw invalid("pfn", "pages [" + std::to_string(pfn) + ", " +
                                 std::to_string(pfn + pages(order)) + ") are not all free");
    free_[bo].erase(b);
    // Split down towards pfn, freeing the half that does not hold it at each level.
    for (unsigned o = bo; o > order; o--) {
        uint64_t half = pages(o - 1);
        if (pfn >= b + half) {
            free_[o - 1].insert(b);
            b += half;
        } else {
            free_[o - 1].insert(b + half);
        }
    }
    nr_free_ -= pages(order);
}

void PhysMem::free(uint64_t pfn, unsigned order)
{
    check_block(pfn, order);
    check_not_free(pfn, order);
    nr_free_ += pages(order);
    while (order < MAX_ORDER) {
        uint64_t buddy = pfn ^ pages(order);
        if (!free_[order].contains(buddy))
            break;
        free_[order].erase(buddy);
        pfn &= ~pages(order);
        order++;
    }
    free_[order].insert(pfn);
}

/* No part of the block may be free: a larger free block around it, or a smaller one in it. */
void PhysMem::check_not_free(uint64_t pfn, unsigned order) const
{
    uint64_t end = pfn + pages(order), b;
    unsigned bo;
    bool overlap = find_free_container(pfn, order, &b, &bo);
    for (unsigned o = 0; o < order && !overlap; o++)
        overlap = free_[o].at_or_after(pfn) < end;
    if (overlap)
        throw invalid("pfn", "pages [" + std::to_string(pfn) + ", " + std::to_string(end) +
                                 ") are already free (double free)");
}

// The mark's store is reserved before the block changes hands: it cannot fail after.
uint64_t PhysMem::user_alloc(unsigned order)
{
    user_.reserve_stores(1);
    uint64_t pfn = alloc(order);
    user_.store(pfn - base_, pfn - base_ + pages(order), 1);
    return pfn;
}

void PhysMem::user_take(uint64_t pfn, unsigned order)
{
    user_.reserve_stores(1);
    take(pfn, order);
    user_.store(pfn - base_, pfn - base_ + pages(order), 1);
}

void PhysMem::user_free(uint64_t pfn, unsigned order)
{
    check_block(pfn, order);
    uint64_t end = pfn + pages(order);
    // Pages kept by fragment() may be given back too (kept_ is sorted).
    auto k0 = std::lower_bound(kept_.begin(), kept_.end(), pfn);
    auto k1 = std::lower_bound(k0, kept_.end(), end);
    if (uint64_t(k1 - k0) == pages(order)) {
        free(pfn, order);
        kept_.erase(k0, k1);
        return;
    }
    if (!user_.range_has(pfn - base_, end - base_, 1)) {
        check_not_free(pfn, order);
        throw invalid("pfn", "pages [" + std::to_string(pfn) + ", " + std::to_string(end) +
                                 ") are held by a guest_memfd file; only pages from "
                                 "PhysMem.alloc, take or fragment can be freed here");
    }
    user_.reserve_stores(1);
    free(pfn, order);
    user_.store(pfn - base_, end - base_, 0);
}

std::vector<FreeBlock> PhysMem::free_blocks(size_t limit) const
{
    std::vector<FreeBlock> v;
    v.reserve(size_t(std::min<uint64_t>(limit, nr_free_blocks())));
    for_each_free_block([&](const FreeBlock &fb) {
        v.push_back(fb);
        return v.size() < limit;
    });
    return v;
}

uint64_t PhysMem::nr_free_blocks() const
{
    uint64_t n = 0;
    for (const auto &s : free_)
        n += s.size();
    return n;
}

/*
 * fragment - keep a random @fraction of the free pages as order-0 blocks.
 *
 * Free blocks are visited in PFN order and each page is kept with probability @fraction
 * (one splitmix64 draw per page, compared in 53-bit fixed point so that the Python
 * reference draws the same pages).  What stays free of a block is re-tiled with the
 * largest aligned blocks.  O(free pages): meant for set-up, not for hot paths.
 *
 * All or nothing: the pages are drawn first with a copy of the generator, changing
 * nothing, and may be interrupted there; then applied, and undone if host memory runs out.
 * A draw whose kept pages could not fit in the host's memory is refused up front.
 */
void PhysMem::fragment(double fraction)
{
    if (!(fraction >= 0.0 && fraction <= 1.0))
        throw invalid("fraction", "must be in [0, 1], got " + std::to_string(fraction));
    const uint64_t threshold = uint64_t(fraction * 9007199254740992.0); // * 2**53
    // Each kept page costs its entry in kept_ and up to two free-list nodes (~100 bytes).
    const double need = double(nr_free_) * fraction * 100.0;
    if (need > double(SMALL_REQUEST) && need > double(host_memory_available()))
        throw OutOfMemory("fragment: keeping " + std::to_string(fraction) + " of " +
                          std::to_string(nr_free_) + " free pages needs about " +
                          std::to_string(uint64_t(need) >> 20) +
                          " MiB, more than the host has available; nothing changed");
    SplitMix64 rng = rng_;
    std::vector<uint64_t> taken;
    std::vector<std::pair<FreeBlock, size_t>> hit; // blocks that lose pages, and how many
    InterruptCheck interrupted;
    for_each_free_block([&](const FreeBlock &fb) {
        size_t before = taken.size();
        for (uint64_t p = fb.pfn; p < fb.pfn + pages(fb.order); p++) {
            if (interrupted())
                throw Interrupted("fragment: interrupted; nothing changed");
            if ((rng.next() >> 11) < threshold)
                taken.push_back(p);
        }
        if (taken.size() > before)
            hit.push_back({fb, taken.size() - before});
        return true;
    });
    kept_.reserve(kept_.size() + taken.size());
    size_t done = 0, next = 0; // blocks applied; their first taken page
    try {
        for (; done < hit.size(); done++) {
            const FreeBlock &fb = hit[done].first;
            free_[fb.order].erase(fb.pfn);
            nr_free_ -= pages(fb.order);
            uint64_t from = fb.pfn;
            for (size_t k = next; k < next + hit[done].second; k++) {
                add_free_range(from, taken[k]);
                from = taken[k] + 1;
            }
            add_free_range(from, fb.pfn + pages(fb.order));
            next += hit[done].second;
        }
    } catch (...) {
        // Give back the pages of the blocks already split (free() coalesces them into
        // the blocks they came from); the block being split may be half-done: its pages
        // are re-tiled whole, since none of them was handed out.
        for (size_t k = 0; k < next; k++)
            free(taken[k], 0);
        if (done < hit.size()) {
            const FreeBlock &fb = hit[done].first;
            for (unsigned o = 0; o <= MAX_ORDER; o++)
                nr_free_ -= pages(o) * free_[o].erase_range(fb.pfn, fb.pfn + pages(fb.order));
            free_[fb.order].insert(fb.pfn);
            nr_free_ += pages(fb.order);
        }
        throw;
    }
    rng_ = rng;
    size_t old = kept_.size();
    kept_.insert(kept_.end(), taken.begin(), taken.end()); // reserved: cannot throw
    std::inplace_merge(kept_.begin(), kept_.begin() + ptrdiff_t(old), kept_.end());
}

uint64_t PhysMem::read(uint64_t pfn) const
{
    check_pfn(pfn);
    return tokens_.load(pfn - base_);
}

void PhysMem::write(uint64_t pfn, uint64_t token)
{
    check_pfn(pfn);
    tokens_.store(pfn - base_, pfn - base_ + 1, token);
}

void PhysMem::fill(uint64_t pfn, uint64_t nr, uint64_t token)
{
    tokens_.store(pfn - base_, pfn - base_ + nr, token);
}

std::vector<Run> PhysMem::contents(uint64_t pfn, uint64_t nr) const
{
    std::vector<Run> runs = tokens_.runs(pfn - base_, pfn - base_ + nr);
    for (Run &r : runs) {
        r.start += base_;
        r.end += base_;
    }
    return runs;
}

std::string PhysMem::dump() const
{
    std::ostringstream os;
    os << "PhysMem(pfns=[" << base_ << ", " << end_pfn() << "), free=" << nr_free_
       << " pages in " << nr_free_blocks() << " blocks, kept=" << kept_.size()
       << ", content runs=" << tokens_.nr_runs() << ")";
    size_t shown = 0;
    for (const FreeBlock &fb : free_blocks(33)) {
        if (shown++ == 32) {
            os << "\n  ...";
            break;
        }
        os << "\n  free [" << fb.pfn << ", " << fb.pfn + pages(fb.order) << ") order "
           << fb.order;
    }
    return os.str();
}

} // namespace gmem
