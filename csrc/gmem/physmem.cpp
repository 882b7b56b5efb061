// SPDX-License-Identifier: MIT
// physmem.cpp - the buddy allocator and the sparse content store of PhysMem.
#include "physmem.hpp"

#include <algorithm>
#include <cstring>
#include <new>
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

NodeMap::const_iterator FreeList::run_of(uint64_t pfn) const
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
        return it == set_.end() ? UINT64_MAX : it->first;
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
        for (uint64_t i = 0; i < n; i++) {
            set_.insert(set_.end(), pool_->get(pfn + i * block_, 0));
            nr_blocks_++;
        }
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
                pool_->put(runs_.extract(next));
            nr_blocks_ += n;
            return;
        }
    }
    if (join_next) {
        // Re-key the next run to start at pfn: the same node, moved.
        Node node = runs_.extract(next++);
        node.key() = pfn;
        runs_.insert(next, std::move(node));
    } else {
        runs_.insert(next, pool_->get(pfn, end));
    }
    nr_blocks_ += n;
}

void FreeList::erase(uint64_t pfn)
{
    if (!runs_mode_) {
        erase_if_free(pfn);
        return;
    }
    auto it = std::prev(runs_.upper_bound(pfn)); // the run holding pfn: callers check
    uint64_t end = it->second;
    if (pfn + block_ < end)
        runs_.insert(std::next(it), pool_->get(pfn + block_, end)); // may throw: no change yet
    if (it->first == pfn)
        pool_->put(runs_.extract(it));
    else
        it->second = pfn;
    nr_blocks_--;
}

bool FreeList::erase_if_free(uint64_t pfn)
{
    if (runs_mode_) {
        if (!contains(pfn))
            return false;
        erase(pfn);
        return true;
    }
    Node node = set_.extract(pfn);
    if (node.empty())
        return false;
    pool_->put(std::move(node));
    nr_blocks_--;
    return true;
}

uint64_t FreeList::erase_range(uint64_t lo, uint64_t hi)
{
    uint64_t n = 0;
    for (uint64_t p; (p = at_or_after(lo)) < hi; n++)
        erase(p);
    return n;
}

/* ---- PageGroup: the bitmap of one partly free 2**12-page group ---- */

static inline uint64_t word_mask(unsigned a, unsigned b) // bits [a, b) of a word, a < b <= 64
{
    return (b - a == 64 ? ~uint64_t(0) : ((uint64_t(1) << (b - a)) - 1)) << a;
}

int64_t PageGroup::find_first(unsigned o) const
{
    if (o <= 6) {
        if (!sum[o])
            return -1;
        unsigned j = unsigned(__builtin_ctzll(sum[o]));
        return int64_t(j << 6) + __builtin_ctzll(fold(bits[j], o));
    }
    uint64_t m = fold(sum[6], o - 6);
    return m ? int64_t(__builtin_ctzll(m)) << 6 : -1;
}

int32_t PageGroup::compute_max_order()
{
    int32_t m = -1;
    if (uint64_t w = sum[6]) {
        for (m = 6; m < 12 && w; m++) // order 6 + k: k + 1 folds of the all-free words
            w &= (w >> (1u << (m - 6))) & M[m - 6];
        m = w ? 12 : m - 1; // 12: the whole group is free
    } else {
        while (m < 5 && sum[m + 1])
            m++;
    }
    return max_order = m;
}

void PageGroup::set_range(unsigned lo, unsigned hi, bool free)
{
    for (unsigned j = lo >> 6; j << 6 < hi; j++) {
        unsigned a = std::max(lo, j << 6) - (j << 6), b = std::min(hi, (j + 1) << 6) - (j << 6);
        uint64_t m = word_mask(a, b);
        bits[j] = free ? bits[j] | m : bits[j] & ~m;
        update_word(j);
    }
}

bool PageGroup::all_free(unsigned lo, unsigned hi) const
{
    for (unsigned j = lo >> 6; j << 6 < hi; j++) {
        unsigned a = std::max(lo, j << 6) - (j << 6), b = std::min(hi, (j + 1) << 6) - (j << 6);
        uint64_t m = word_mask(a, b);
        if ((bits[j] & m) != m)
            return false;
    }
    return true;
}

bool PageGroup::any_free(unsigned lo, unsigned hi) const
{
    for (unsigned j = lo >> 6; j << 6 < hi; j++) {
        unsigned a = std::max(lo, j << 6) - (j << 6), b = std::min(hi, (j + 1) << 6) - (j << 6);
        if (bits[j] & word_mask(a, b))
            return true;
    }
    return false;
}

uint64_t PageGroup::count_blocks() const
{
    if (nr_blocks < 0) {
        int32_t n = 0;
        for_each_block([&](unsigned, unsigned) {
            n++;
            return true;
        });
        nr_blocks = n;
    }
    return uint64_t(nr_blocks);
}

/* ---- PhysMem: FreeLists for orders >= 12, PageGroups below ---- */

PhysMem::PhysMem(uint64_t nr_pages, uint64_t base_pfn, uint64_t seed)
    : base_(base_pfn), nr_pages_(checked_size(nr_pages, base_pfn)), seed_(seed), rng_{seed},
      tokens_(nr_pages), rmp_(nr_pages), owner_(nr_pages), user_(nr_pages)
{
    for (unsigned o = 0; o <= MAX_ORDER; o++)
        free_[o] = FreeList(pages(o), o == MAX_ORDER, &pool_);
    add_free_range(base_, base_ + nr_pages_);
}

PageGroup *PhysMem::group(uint64_t gid)
{
    if (gid == last_gid_)
        return last_;
    auto it = groups_.find(gid);
    if (it == groups_.end())
        return nullptr;
    last_gid_ = gid;
    return last_ = &it->second;
}

const PageGroup *PhysMem::group(uint64_t gid) const
{
    auto it = groups_.find(gid);
    return it == groups_.end() ? nullptr : &it->second;
}

/* A group with no free page yet, and its node (not in by_max_ until group_changed() says
 * so).  The only allocations of a group: may throw, with nothing changed. */
PageGroup &PhysMem::new_group(uint64_t gid)
{
    Node node = pool_.get(gid, 0);
    // Groups mostly appear in address order: the hint makes that O(1).  Value-initialised:
    // all bits clear.
    PageGroup &g = groups_.try_emplace(groups_.end(), gid)->second;
    g.node = std::move(node);
    last_gid_ = gid;
    return *(last_ = &g);
}

/*
 * The bits of group @gid changed: file it under its new largest free order, moving its
 * own node (no allocation).  A group with no free page keeps its bitmap, so that freeing
 * into it later needs nothing new; one that is all free becomes an order-12 block.
 */
void PhysMem::group_changed(uint64_t gid, PageGroup &g)
{
    int32_t old = g.max_order, m = g.compute_max_order();
    if (m == old)
        return;
    if (old >= 0) { // (a group is never filed at 12: it is dissolved)
        g.node = by_max_[unsigned(old)].extract(gid);
        if (by_max_[unsigned(old)].empty())
            by_max_used_ &= ~(1u << old);
    }
    if (m < 0)
        return;
    if (m < int32_t(GROUP_ORDER)) {
        by_max_[unsigned(m)].insert(std::move(g.node));
        by_max_used_ |= 1u << m;
        return;
    }
    dissolve(groups_.find(gid)); // (max_order is 12: its node is out of by_max_ already)
    free_top(gid << GROUP_ORDER, GROUP_ORDER); // the group's node, from the pool
    pool_.repaid(0, (nr_pages_ - nr_free_) >> GROUP_ORDER); // a bound on the blocks out
}

/* Group @it is all free (or given back whole): it goes, its node to the pool (for the top
 * tier's block that replaces it).  Returns the next group. */
std::map<uint64_t, PageGroup>::iterator
PhysMem::dissolve(std::map<uint64_t, PageGroup>::iterator it)
{
    uint64_t gid = it->first;
    PageGroup &g = it->second;
    if (g.max_order >= 0 && g.max_order < int32_t(GROUP_ORDER)) {
        g.node = by_max_[unsigned(g.max_order)].extract(gid);
        if (by_max_[unsigned(g.max_order)].empty())
            by_max_used_ &= ~(1u << g.max_order);
    }
    pool_.put(std::move(g.node));
    if (gid == last_gid_) {
        last_gid_ = UINT64_MAX;
        last_ = nullptr;
    }
    return groups_.erase(it);
}

/* Pages [start, end) become free or held, group by group (the top tier is not touched). */
void PhysMem::set_free(uint64_t start, uint64_t end, bool free)
{
    while (start < end) {
        uint64_t gid = start >> GROUP_ORDER, gend = std::min(end, (gid + 1) << GROUP_ORDER);
        PageGroup *g = group(gid);
        if (!g)
            g = &new_group(gid);
        g->set_range(unsigned(start & (GROUP_PAGES - 1)),
                     unsigned(gend - (gid << GROUP_ORDER)), free);
        group_changed(gid, *g);
        start = gend;
    }
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
        if (order >= GROUP_ORDER)
            free_[order].insert(start, n);
        else
            set_free(start, start + pages(order), true);
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

/* The lowest free block of @order or larger: a group's (*is_group) or a top-tier one. */
bool PhysMem::lowest_block(unsigned order, uint64_t *pfn, unsigned *bo, bool *is_group) const
{
    uint64_t best = UINT64_MAX;
    for (unsigned used = order < GROUP_ORDER ? by_max_used_ >> order << order : 0; used;
         used &= used - 1) {
        unsigned m = unsigned(__builtin_ctz(used));
        if ((by_max_[m].begin()->first << GROUP_ORDER) < best) {
            best = by_max_[m].begin()->first << GROUP_ORDER;
            *bo = m;
            *is_group = true;
        }
    }
    for (unsigned o = std::max(order, GROUP_ORDER); o <= MAX_ORDER; o++) {
        if (!free_[o].empty() && free_[o].first() < best) {
            best = free_[o].first();
            *bo = o;
            *is_group = false;
        }
    }
    *pfn = best;
    return best != UINT64_MAX;
}

/*
 * Take [pfn, pfn + 2**order) out of the top-tier block [b, b + 2**bo): the halves that do
 * not hold it go back one order at a time; below order 12 its group gets a bitmap.  What
 * can allocate is had first (nodes: one per half, one for a run the erase splits, and the
 * group's or the spare owed to a block of order >= 12), so failing changes nothing.
 */
void PhysMem::split_top(uint64_t b, unsigned bo, uint64_t pfn, unsigned order)
{
    pool_.reserve(bo - std::max(order, GROUP_ORDER) + 2);
    PageGroup *g = order < GROUP_ORDER ? &new_group(pfn >> GROUP_ORDER) : nullptr;
    free_[bo].erase(b);
    for (unsigned o = bo; o > std::max(order, GROUP_ORDER); o--) {
        uint64_t half = pages(o - 1);
        if (pfn >= b + half) {
            free_[o - 1].insert(b);
            b += half;
        } else {
            free_[o - 1].insert(b + half);
        }
    }
    if (!g) {
        pool_.owe(1);
        return;
    }
    std::memset(g->bits, 0xff, sizeof(g->bits));
    std::memset(g->sum, 0xff, sizeof(g->sum));
    g->set_range(unsigned(pfn - b), unsigned(pfn - b + pages(order)), false);
    group_changed(b >> GROUP_ORDER, *g);
}

/* Free a top-tier block, coalescing with its buddy while the buddy is free: each buddy's
 * node goes to the pool, the block's comes from it. */
void PhysMem::free_top(uint64_t pfn, unsigned order)
{
    while (order < MAX_ORDER && free_[order].erase_if_free(pfn ^ pages(order))) {
        pfn &= ~pages(order);
        order++;
    }
    free_[order].insert(pfn);
}

/*
 * free_big - give back [pfn, pfn + 2**order), order >= 12: a block handed out whole,
 * several merged (free_range_unchecked()), or groups with no free page given back whole.
 * The groups go, their nodes to the pool; the rest was, if @owed, owed a spare (one at
 * least, for merged blocks: the count may stay high, never low, and is capped by the
 * pages held).  Never allocates.
 */
void PhysMem::free_big(uint64_t pfn, unsigned order, bool owed)
{
    const uint64_t g0 = pfn >> GROUP_ORDER, ng = pages(order - GROUP_ORDER);
    uint64_t covered = 0;
    for (auto it = groups_.lower_bound(g0); it != groups_.end() && it->first < g0 + ng;
         covered++)
        it = dissolve(it);
    nr_free_ += pages(order);
    pool_.repaid(owed && covered < ng, (nr_pages_ - nr_free_) >> GROUP_ORDER);
    free_top(pfn, order);
}

bool PhysMem::try_alloc(unsigned order, uint64_t *pfn)
{
    check_order(order);
    uint64_t best;
    unsigned bo;
    bool is_group;
    if (!lowest_block(order, &best, &bo, &is_group))
        return false;
    if (is_group) {
        uint64_t gid = best >> GROUP_ORDER;
        PageGroup &g = *group(gid);
        unsigned off = unsigned(g.find_first(order));
        if (order <= 6) {
            g.bits[off >> 6] &= ~word_mask(off & 63, (off & 63) + unsigned(pages(order)));
            g.update_word(off >> 6);
        } else {
            g.set_range(off, off + unsigned(pages(order)), false);
        }
        group_changed(gid, g);
        best += off;
    } else {
        split_top(best, bo, best, order);
    }
    nr_free_ -= pages(order);
    *pfn = best;
    return true;
}

/*
 * alloc_many - n calls of try_alloc(order) at once.  The lowest free block of the order
 * is the lowest set bit of a bitmap or the start of a top-tier block, and handing it out
 * touches nothing below it, so the next one is the next bit, or the next piece of the
 * same block: each source is drained in one pass.
 */
size_t PhysMem::alloc_many(unsigned order, size_t n, uint64_t *out)
{
    check_order(order);
    size_t got = 0;
    uint64_t best;
    unsigned bo;
    bool is_group;
    while (got < n && lowest_block(order, &best, &bo, &is_group)) {
        if (is_group) {
            uint64_t gid = best >> GROUP_ORDER;
            PageGroup &g = *group(gid);
            size_t before = got;
            if (order <= 6) {
                const uint64_t one = order == 6 ? ~uint64_t(0) : (uint64_t(1) << pages(order)) - 1;
                while (got < n && g.sum[order]) {
                    unsigned j = unsigned(__builtin_ctzll(g.sum[order]));
                    uint64_t f = PageGroup::fold(g.bits[j], order), taken = 0;
                    for (; f && got < n; f &= f - 1) {
                        unsigned b = unsigned(__builtin_ctzll(f));
                        out[got++] = best + (uint64_t(j) << 6) + b;
                        taken |= one << b;
                    }
                    g.bits[j] &= ~taken;
                    g.update_word(j);
                }
            } else {
                for (int64_t off; got < n && (off = g.find_first(order)) >= 0;) {
                    g.set_range(unsigned(off), unsigned(off) + unsigned(pages(order)), false);
                    out[got++] = best + uint64_t(off);
                }
            }
            nr_free_ -= (got - before) << order;
            group_changed(gid, g);
            continue;
        }
        // From a top-tier block: m blocks from its start, the rest re-tiled.  Below order
        // 12 each group they fill gets its bitmap (none free) and the one they end in a
        // bitmap too; at or above it each block is owed a spare node.  All had first:
        // nodes for those, a piece of the rest per order, a run split by the erase.
        const uint64_t m = std::min<uint64_t>(n - got, pages(bo - order));
        const uint64_t end = best + (m << order);
        const uint64_t g0 = best >> GROUP_ORDER, g1 = (end + GROUP_PAGES - 1) >> GROUP_ORDER;
        uint64_t made = g0;
        try {
            pool_.reserve((order < GROUP_ORDER ? g1 - g0 : m) + (bo - GROUP_ORDER) + 1);
            for (; order < GROUP_ORDER && made < g1; made++)
                new_group(made);
        } catch (const std::bad_alloc &) {
            for (uint64_t gid = g0; gid < made; gid++)
                dissolve(groups_.find(gid));
            if (!got)
                throw;
            return got; // the host ran out: the caller's next try_alloc() will say so
        }
        free_[bo].erase(best);
        nr_free_ -= pages(bo);
        for (uint64_t i = 0; i < m; i++)
            out[got++] = best + (i << order);
        add_free_range(end, best + pages(bo)); // into the bitmap of the group end is in
        if (order >= GROUP_ORDER)
            pool_.owe(m);
    }
    return got;
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

/* The top-tier free block that contains all of [pfn, pfn + 2**order), if there is one. */
bool PhysMem::find_free_container(uint64_t pfn, unsigned order, uint64_t *block,
                                  unsigned *block_order) const
{
    for (unsigned o = std::max(order, GROUP_ORDER); o <= MAX_ORDER; o++) {
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
    if (order < GROUP_ORDER) {
        if (const PageGroup *g = group(pfn >> GROUP_ORDER)) {
            unsigned off = unsigned(pfn & (GROUP_PAGES - 1));
            return g->all_free(off, off + unsigned(pages(order)));
        }
    }
    return find_free_container(pfn, order, &b, &bo);
}

void PhysMem::take(uint64_t pfn, unsigned order)
{
    check_block(pfn, order);
    if (!is_free(pfn, order))
        throw invalid("pfn", "pages [" + std::to_string(pfn) + ", " +
                                 std::to_string(pfn + pages(order)) + ") are not all free");
    uint64_t b;
    unsigned bo;
    if (order < GROUP_ORDER && group(pfn >> GROUP_ORDER)) {
        set_free(pfn, pfn + pages(order), false);
    } else {
        find_free_container(pfn, order, &b, &bo);
        split_top(b, bo, pfn, order);
    }
    nr_free_ -= pages(order);
}

void PhysMem::free(uint64_t pfn, unsigned order)
{
    check_block(pfn, order);
    check_not_free(pfn, order);
    // Any block may come back here, a part of one handed out whole too: a node for it.
    // The spares stay for the blocks that come back unchecked.
    pool_.reserve(1);
    give_back(pfn, order, false);
}

/*
 * Never allocates for a block handed out as it is by try_alloc(), alloc_many() or take()
 * (or, for order >= 12, several merged): its group has its bitmap, the top tier a spare
 * node.  Only a piece below order 12 of a block handed out whole above it needs a new
 * bitmap, which may throw, changing nothing.
 */
void PhysMem::free_unchecked(uint64_t pfn, unsigned order)
{
    give_back(pfn, order, true);
}

void PhysMem::give_back(uint64_t pfn, unsigned order, bool owed)
{
    if (order >= GROUP_ORDER) {
        free_big(pfn, order, owed);
        return;
    }
    uint64_t gid = pfn >> GROUP_ORDER;
    PageGroup *g = group(gid);
    if (!g)
        g = &new_group(gid);
    nr_free_ += pages(order);
    unsigned off = unsigned(pfn & (GROUP_PAGES - 1));
    if (order <= 6) {
        g->bits[off >> 6] |= word_mask(off & 63, (off & 63) + unsigned(pages(order)));
        // Freeing only adds free blocks: below order 6 (a word that is not all free) the
        // group's largest order changes only if the word now holds a larger one.
        int32_t in_word = g->update_word(off >> 6);
        if (in_word < 6 && in_word <= g->max_order)
            return;
    } else {
        g->set_range(off, off + unsigned(pages(order)), true);
    }
    group_changed(gid, *g);
}

void PhysMem::free_range_unchecked(uint64_t pfn, uint64_t nr)
{
    while (nr) {
        unsigned o = pfn ? unsigned(__builtin_ctzll(pfn)) : MAX_ORDER;
        o = std::min({o, MAX_ORDER, unsigned(63 - __builtin_clzll(nr))});
        free_unchecked(pfn, o);
        pfn += pages(o);
        nr -= pages(o);
    }
}

/* No part of the block may be free: a larger free block around it, or a smaller one in it. */
void PhysMem::check_not_free(uint64_t pfn, unsigned order) const
{
    uint64_t end = pfn + pages(order), b;
    unsigned bo;
    const PageGroup *g = order < GROUP_ORDER ? group(pfn >> GROUP_ORDER) : nullptr;
    bool overlap;
    if (g) {
        unsigned off = unsigned(pfn & (GROUP_PAGES - 1));
        overlap = g->any_free(off, off + unsigned(pages(order)));
    } else {
        overlap = find_free_container(pfn, order, &b, &bo);
    }
    if (order >= GROUP_ORDER) {
        for (unsigned o = GROUP_ORDER; o < order && !overlap; o++)
            overlap = free_[o].at_or_after(pfn) < end;
        for (auto g = groups_.lower_bound(pfn >> GROUP_ORDER); // a partly free group in it?
             !overlap && g != groups_.end() && g->first < end >> GROUP_ORDER; ++g)
            overlap = g->second.max_order >= 0;
    }
    if (overlap)
        throw invalid("pfn", "pages [" + std::to_string(pfn) + ", " + std::to_string(end) +
                                 ") are already free (double free)");
}

// The mark's store is reserved before the block changes hands: it cannot fail after.
// Such a block comes back through free(), which reserves its own node: none is owed.
uint64_t PhysMem::user_alloc(unsigned order)
{
    user_.reserve_stores(1);
    uint64_t pfn = alloc(order);
    user_.store(pfn - base_, pfn - base_ + pages(order), 1);
    pool_.disown(order >= GROUP_ORDER);
    return pfn;
}

void PhysMem::user_take(uint64_t pfn, unsigned order)
{
    user_.reserve_stores(1);
    take(pfn, order);
    user_.store(pfn - base_, pfn - base_ + pages(order), 1);
    pool_.disown(order >= GROUP_ORDER);
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
    for (unsigned o = GROUP_ORDER; o <= MAX_ORDER; o++)
        n += free_[o].size();
    for (const auto &g : groups_)
        n += g.second.max_order < 0 ? 0 : g.second.count_blocks();
    return n;
}

/* Take every free page of [lo, hi) out of the free lists and bitmaps; returns how many. */
uint64_t PhysMem::clear_free(uint64_t lo, uint64_t hi)
{
    uint64_t n = 0;
    for (unsigned o = GROUP_ORDER; o <= MAX_ORDER; o++)
        n += pages(o) * free_[o].erase_range(lo, hi);
    for (auto it = groups_.lower_bound(lo >> GROUP_ORDER);
         it != groups_.end() && it->first << GROUP_ORDER < hi;) {
        uint64_t gid = it->first, base = gid << GROUP_ORDER;
        PageGroup &g = it->second;
        ++it; // group_changed() may erase the group
        unsigned a = unsigned(std::max(lo, base) - base);
        unsigned b = unsigned(std::min(hi, base + GROUP_PAGES) - base);
        for (unsigned p = a; p < b; p++)
            n += (g.bits[p >> 6] >> (p & 63)) & 1;
        g.set_range(a, b, false);
        group_changed(gid, g);
    }
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
    // Each kept page costs its entry in kept_ and a few free-list nodes (~100 bytes), and
    // each group it breaks a bitmap and its map node (~700 bytes).
    const double kept = double(nr_free_) * fraction;
    const double need = kept * 100.0 + std::min(kept, double(nr_free_ >> GROUP_ORDER) + 2) * 700.0;
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
            if (fb.order >= GROUP_ORDER)
                free_[fb.order].erase(fb.pfn);
            else
                set_free(fb.pfn, fb.pfn + pages(fb.order), false);
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
        // Give back the pages of the blocks already split (freeing coalesces them into
        // the blocks they came from); the block being split may be half-done: its pages
        // are re-tiled whole, since none of them was handed out.  Unlike fallocate's, this
        // undo can allocate: a group kept whole has no bitmap, and re-tiling can split.
        for (size_t k = 0; k < next; k++)
            free_unchecked(taken[k], 0);
        if (done < hit.size()) {
            const FreeBlock &fb = hit[done].first;
            nr_free_ -= clear_free(fb.pfn, fb.pfn + pages(fb.order));
            add_free_range(fb.pfn, fb.pfn + pages(fb.order));
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

/*
 * check - every group's summary, largest order and filing (by_max_, or its own node when
 * it has no free page), no top-tier block over a group, free blocks sorted, disjoint,
 * coalesced and adding up to nr_free(), and a spare node for every one owed.
 */
std::string PhysMem::check() const
{
    std::ostringstream os;
    for (const auto &[gid, g] : groups_) {
        PageGroup copy;
        std::memcpy(copy.bits, g.bits, sizeof(copy.bits));
        for (unsigned j = 0; j < 64; j++)
            copy.update_word(j);
        int32_t m = copy.compute_max_order();
        bool filed = m >= 0 && m < int32_t(GROUP_ORDER) && by_max_[unsigned(m)].count(gid);
        if (std::memcmp(copy.sum, g.sum, sizeof(g.sum)) || m != g.max_order ||
            m == int32_t(GROUP_ORDER) || (m >= 0) != filed || (m >= 0) != g.node.empty() ||
            (m < 0 && g.node.key() != gid))
            os << "group " << gid << ": max_order " << g.max_order << ", bits say " << m
               << (filed ? ", filed" : ", not filed") << (g.node ? ", holds its node" : "")
               << "; ";
        uint64_t b;
        unsigned bo;
        if (find_free_container(gid << GROUP_ORDER, GROUP_ORDER, &b, &bo))
            os << "group " << gid << " inside free block " << b << "; ";
    }
    for (unsigned m = 0; m < GROUP_ORDER; m++) {
        if (by_max_[m].empty() == bool(by_max_used_ & (1u << m)))
            os << "by_max_used_ bit " << m << " wrong; ";
        for (const auto &e : by_max_[m])
            if (!group(e.first))
                os << "by_max_[" << m << "] holds " << e.first << ", no group; ";
    }
    uint64_t sum = 0, end = 0;
    for_each_free_block([&](const FreeBlock &fb) {
        uint64_t buddy = fb.pfn ^ pages(fb.order);
        if (fb.pfn < end || fb.pfn & (pages(fb.order) - 1) || fb.pfn < base_ ||
            fb.pfn + pages(fb.order) > end_pfn() ||
            (fb.order < MAX_ORDER && buddy >= base_ && buddy + pages(fb.order) <= end_pfn() &&
             is_free(buddy, fb.order)))
            os << "free block " << fb.pfn << " order " << fb.order << " misplaced; ";
        sum += pages(fb.order);
        end = fb.pfn + pages(fb.order);
        return os.tellp() < 4096;
    });
    if (sum != nr_free_)
        os << "free blocks hold " << sum << " pages, nr_free " << nr_free_ << "; ";
    if (pool_.size() < pool_.owed())
        os << "spare nodes " << pool_.size() << " < owed " << pool_.owed() << "; ";
    return os.str();
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
