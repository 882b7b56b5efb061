// SPDX-License-Identifier: MIT
// folio_cache.hpp - FolioCache: the page cache of one guest_memfd, and the PFN-range walk.
//
// DOC: FolioCache
//
// Folios keyed by their first index.  A folio of order o covers 2**o pages, starts at an
// index that is a multiple of 2**o and is backed by 2**o contiguous PFNs starting at a
// multiple of 2**o, so the PFN of any index inside it is
//
//     folio_file_pfn(folio, i) = folio.pfn + (i & (2**o - 1))
//
// Each folio is 12 bytes in the tree's leaves: its index as the key (a 32-bit offset from
// the leaf's base), and one packed word
//
//     bit 63..58  57        56..52   51..0
//         unused  uptodate  order    pfn
//
// Pins and host mappings are rare, so the guest_memfd keeps them beside the cache rather
// than in every folio.
//
// The walk (pfn_ranges, walk_batches) is the hot loop of every conversion and teardown:
// it visits the folios that overlap [start, end) in index order, clamps each to the range
// and emits one [start_pfn, end_pfn) per folio, exactly as __kvm_gmem_set_attributes does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "physmem.hpp"
#include "lockable.hpp"
#include "u64tree.hpp"

namespace gmem {

constexpr uint64_t NO_PFN = ~uint64_t(0);
constexpr unsigned FOLIO_BATCH_SIZE = 31; // PAGEVEC_SIZE - 1, as struct folio_batch

struct Folio {
    uint64_t index;
    uint64_t pfn;
    unsigned order;
    bool uptodate;

    uint64_t nr_pages() const { return uint64_t(1) << order; }
    uint64_t end() const { return index + nr_pages(); }
    uint64_t file_pfn(uint64_t i) const { return pfn + (i & (nr_pages() - 1)); }
};

/// One folio clamped to a range: pages [start, end) of the file, PFNs [start_pfn, end_pfn).
struct PfnRange {
    uint64_t start_pfn, end_pfn;
};

class FolioCache : public Lockable {
    using Tree = U64Tree<>;

public:
    size_t nr_folios() const { return tree_.size(); }
    uint64_t nr_pages() const { return nr_pages_; }

    /// Validate a new folio: order 0..18, index and pfn aligned, pfn < 2**52, no overlap.
    void check_new(uint64_t index, unsigned order, uint64_t pfn) const;
    void add(uint64_t index, unsigned order, uint64_t pfn, bool uptodate = false);
    /// Add a folio its caller placed itself (valid, in a hole): no search for overlap, so
    /// a front-to-back fill costs the tree's insert alone.
    void add_unchecked(uint64_t index, unsigned order, uint64_t pfn)
    {
        tree_.insert(index, pack(pfn, order, false));
        nr_pages_ += uint64_t(1) << order;
    }
    /// Add many folios at once: sorted by index and disjoint (check_folio_layout), none
    /// overlapping a folio already here.  All are validated before the first is added.
    void add_many(const uint64_t *index, const uint64_t *order, const uint64_t *pfn, size_t n);
    /// The folio that covers @index, if any.
    bool lookup(uint64_t index, Folio *out) const;
    /// Remove the folio that starts at @index (which must exist) and return it.
    Folio remove(uint64_t index);
    void set_uptodate(uint64_t index, bool uptodate);
    /// Remove the folios of [start, end), which tile it exactly: one erase, no search per
    /// folio (fallocate's undo).
    void remove_tiling(uint64_t start, uint64_t end)
    {
        tree_.erase_range(start, end);
        nr_pages_ -= end - start;
    }
    /// Remove @n folios that are consecutive in the cache (as folios() returned them).
    void remove_consecutive(const Folio *folios, size_t n);
    /// Move every folio into @into (which must be empty), leaving this cache empty: O(1).
    void move_all_to(FolioCache &into)
    {
        std::swap(tree_, into.tree_);
        std::swap(nr_pages_, into.nr_pages_);
    }

    /// Split the folio covering @index into 2**(order - new_order) folios of @new_order.
    void split(uint64_t index, unsigned new_order);
    /// Split the folio that starts at @index into order-0 folios, PFNs unchanged.  All or
    /// nothing: host memory running out (bad_alloc) leaves the folio as it was.
    void split_to_pages(uint64_t index);
    /// Merge the order-0 folios of [index, index + 2**order), which the caller has checked
    /// are all present with PFNs first.pfn + i, into one folio.  Allocates nothing.
    void merge(uint64_t index, unsigned order, bool uptodate);
    /// Split the folios that cross @start or @end into the largest aligned pieces that do
    /// not, so that [start, end) is made of whole folios.  Returns how many were split.
    size_t split_range(uint64_t start, uint64_t end);

    /// Number of folios overlapping [start, end).
    size_t count(uint64_t start, uint64_t end) const;
    /// Folios overlapping [start, end), unclamped, in index order.
    size_t folios(uint64_t start, uint64_t end, Folio *out, size_t cap) const;
    std::vector<Folio> folios(uint64_t start, uint64_t end) const;
    /// The hot loop: one clamped PFN range per folio overlapping [start, end) into @out,
    /// which has room for count(start, end) ranges; returns how many were written.
    size_t pfn_ranges(uint64_t start, uint64_t end, PfnRange *out) const;
    /// One PFN per page of [start, end), NO_PFN for holes: the ground truth for the walk.
    void page_pfns(uint64_t start, uint64_t end, uint64_t *out) const;

    /*
     * walk_batches - the kernel's filemap_get_folios() loop over [start, end): gathers up
     * to FOLIO_BATCH_SIZE folios at a time and calls fn(folios, ranges, n) with each folio
     * and its clamped PFN range.
     */
    template <class Fn>
    void walk_batches(uint64_t start, uint64_t end, Fn &&fn) const
    {
        Folio folios[FOLIO_BATCH_SIZE];
        PfnRange ranges[FOLIO_BATCH_SIZE];
        unsigned n = 0;
        for_each_clamped(start, end, [&](const Folio &f, const PfnRange &r) {
            folios[n] = f;
            ranges[n] = r;
            if (++n == FOLIO_BATCH_SIZE) {
                fn(folios, ranges, n);
                n = 0;
            }
        });
        if (n)
            fn(folios, ranges, n);
    }

    /// fn(folio, clamped range) for each folio overlapping [start, end), straight over
    /// the leaf arrays: the one loop every walk (pfn_ranges, batches, extents,
    /// conversions) is made of.  Only the first folio can start before @start, and only
    /// a leaf whose last folio reaches past @end holds folios that cross it or lie
    /// beyond, so the end is tested once per leaf and the folios of every leaf in
    /// between go to @fn unclamped.  (The first folio is taken inside the loop, behind a
    /// flag: hoisted out of it, the walk measured 6-8% slower.)
    template <class Fn>
    void for_each_clamped(uint64_t start, uint64_t end, Fn &&fn) const
    {
        if (start >= end)
            return;
        auto p = first_overlapping(start);
        if (p == tree_.end())
            return;
        uint32_t s = p.slot;
        bool first = true;
        for (const Tree::Leaf *l = p.leaf; l; l = Tree::next_leaf(l), s = 0) {
            const uint64_t base = Tree::leaf_base(l), *vals = Tree::leaf_vals(l);
            const uint32_t *offs = Tree::leaf_offs(l);
            const uint32_t cnt = Tree::leaf_size(l);
            if (first) {
                first = false;
                Folio f = unpack(base + offs[s], vals[s]);
                if (f.index >= end)
                    return;
                fn(f, clamp(f, start, end));
                s++;
            }
            if (s >= cnt)
                continue;
            if (base + offs[cnt - 1] + (uint64_t(1) << ((vals[cnt - 1] >> ORDER_SHIFT) & 31)) <=
                end) {
                for (; s < cnt; s++) {
                    Folio f = unpack(base + offs[s], vals[s]);
                    fn(f, PfnRange{f.pfn, f.pfn + f.nr_pages()});
                }
                continue;
            }
            for (; s < cnt; s++) { // the leaf that reaches past @end: the last one
                if (base + offs[s] >= end)
                    return;
                Folio f = unpack(base + offs[s], vals[s]);
                fn(f, clamp(f, start, end));
            }
            return;
        }
    }

    /*
     * for_each_present - fn(folio) for the folios that hold @start, @start + 1, ... up to
     * @end, in order, until a hole or until fn returns false: the walk of a bulk call's
     * run of consecutive indexes (one search, then straight over the leaves).
     */
    template <class Fn>
    void for_each_present(uint64_t start, uint64_t end, Fn &&fn) const
    {
        if (start >= end)
            return;
        auto p = first_overlapping(start);
        uint64_t at = start; // the next index wanted
        uint32_t s = p.slot;
        for (const Tree::Leaf *l = p.leaf; l; l = Tree::next_leaf(l), s = 0) {
            const uint64_t base = Tree::leaf_base(l), *vals = Tree::leaf_vals(l);
            const uint32_t *offs = Tree::leaf_offs(l);
            for (const uint32_t cnt = Tree::leaf_size(l); s < cnt; s++) {
                if (base + offs[s] > at)
                    return; // a hole
                Folio f = unpack(base + offs[s], vals[s]);
                if (!fn(f))
                    return;
                at = f.end();
                if (at >= end)
                    return;
            }
        }
    }

    /*
     * lookup_sorted - fn(j, folio) for each j < @n whose index, keys[j] >> @shift, a folio
     * holds; the keys sorted.  The leaves are walked from the first index's, a leaf at a
     * time while the next index is within about two leaves, else one search to its leaf:
     * a batch of scattered indexes costs a pass over the leaves that hold them, not over
     * their folios, nor a search per index.  Each leaf's successor is fetched ahead while
     * the leaf is read.  (Cut into several walks taken in turns, so that more leaves come
     * from memory at once, a batch of 2 * 10**5 random pages of 16 GiB ran 25% slower.)
     * Inside a leaf the slot is guessed from the first folio's order (exact where the
     * folios are of one size and follow one another, as in a file filled front to back)
     * and checked, else searched.
     */
    template <class Fn>
    void lookup_sorted(const uint64_t *keys, size_t n, unsigned shift, Fn &&fn) const
    {
        const Tree::Leaf *l = nullptr;
        for (size_t j = 0; j < n;)
            lookup_leaf(keys, shift, l, j, n, fn);
    }

    /*
     * walk_extents - the populated pages of [start, end) as maximal extents that are
     * contiguous both in the file and in physical memory and of one uptodate state:
     * fn(index, pfn, nr_pages, uptodate).  A file populated front to back from a fresh
     * PhysMem is a handful of extents, so per-extent work costs O(extents), not O(folios).
     */
    template <class Fn>
    void walk_extents(uint64_t start, uint64_t end, Fn &&fn) const
    {
        uint64_t index = 0, pfn = 0, nr = 0;
        bool uptodate = false;
        for_each_clamped(start, end, [&](const Folio &f, const PfnRange &r) {
            uint64_t first = f.index > start ? f.index : start;
            uint64_t len = r.end_pfn - r.start_pfn;
            if (nr && first == index + nr && r.start_pfn == pfn + nr && f.uptodate == uptodate) {
                nr += len;
                return;
            }
            if (nr)
                fn(index, pfn, nr, uptodate);
            index = first;
            pfn = r.start_pfn;
            nr = len;
            uptodate = f.uptodate;
        });
        if (nr)
            fn(index, pfn, nr, uptodate);
    }

    size_t memory_bytes() const { return tree_.memory_bytes(); }
    /// Make the next @n inserts (new folios, split pieces) allocation-free.
    void reserve(size_t n) { tree_.reserve(n); }
    std::string dump() const;
    void clear()
    {
        tree_.clear();
        nr_pages_ = 0;
    }

    static PfnRange clamp(const Folio &f, uint64_t start, uint64_t end)
    {
        uint64_t s = f.index > start ? f.index : start;
        uint64_t e = f.end() < end ? f.end() : end;
        uint64_t sp = f.file_pfn(s);
        return PfnRange{sp, sp + (e - s)};
    }

private:
    static constexpr uint64_t PFN_MASK = PFN_LIMIT - 1;
    static constexpr unsigned ORDER_SHIFT = 52;
    static constexpr uint64_t UPTODATE = uint64_t(1) << 57;

    Tree tree_;
    uint64_t nr_pages_ = 0;

    static uint64_t pack(uint64_t pfn, unsigned order, bool uptodate)
    {
        return pfn | (uint64_t(order) << ORDER_SHIFT) | (uptodate ? UPTODATE : 0);
    }
    static constexpr uint32_t LEAF_CAP = 64; // Tree's leaves
    static unsigned order_of(uint64_t v) { return unsigned((v >> ORDER_SHIFT) & 31); }
    static Folio unpack(uint64_t index, uint64_t v)
    {
        return Folio{index, v & PFN_MASK, unsigned((v >> ORDER_SHIFT) & 31),
                     (v & UPTODATE) != 0};
    }
    Tree::Pos first_overlapping(uint64_t start) const;

    /*
     * lookup_leaf - one step of a lookup_sorted() walk: the keys [j, end) that leaf @l
     * (found first when null) may hold, then @l moves to the next leaf, fetched ahead, or
     * to null when the next key is far.
     */
    template <class Fn>
    void lookup_leaf(const uint64_t *keys, unsigned shift, const Tree::Leaf *&l, size_t &j,
                     size_t end, Fn &fn) const
    {
        uint64_t i = keys[j] >> shift;
        if (!l) {
            auto p = tree_.floor(i);
            if (p == tree_.end()) { // before the first folio
                j++;
                return;
            }
            l = p.leaf;
        }
        const uint64_t base = Tree::leaf_base(l), *vals = Tree::leaf_vals(l);
        const uint32_t *offs = Tree::leaf_offs(l);
        const uint32_t cnt = offs[LEAF_CAP - 1] != Tree::NONE32 ? LEAF_CAP : Tree::leaf_size(l);
        const uint64_t first = base + offs[0];
        const uint64_t stop = base + offs[cnt - 1] + (uint64_t(1) << order_of(vals[cnt - 1]));
        const unsigned o = order_of(vals[0]);
        for (; j < end && (i = keys[j] >> shift) < stop; j++) {
            if (i < first)
                continue; // a hole before the leaf's first folio
            uint64_t d = i - base, g = (d - offs[0]) >> o;
            if (g >= cnt)
                g = cnt - 1;
            if (offs[g] > d || (g + 1 < cnt && offs[g + 1] <= d)) {
                auto above = std::upper_bound(offs, offs + cnt, d,
                                              [](uint64_t a, uint32_t b) { return a < b; });
                g = uint64_t(above - offs) - 1;
            }
            Folio f = unpack(base + offs[g], vals[g]);
            if (f.end() > i)
                fn(j, f);
        }
        const Tree::Leaf *next = Tree::next_leaf(l);
        if (j == end || !next) {
            j = end; // (past the last folio: holes)
            return;
        }
        l = i - stop > 2 * (stop - first) ? nullptr : next; // far: search
        if (l)
            for (size_t b = 0; b < sizeof(Tree::Leaf); b += 64)
                __builtin_prefetch(reinterpret_cast<const char *>(l) + b);
    }
    void split_at(const Folio &f, uint64_t cut1, uint64_t cut2);
};

/// Merge ranges that continue one another (end_pfn == next start_pfn) into @out, which
/// has room for @n; returns how many.  For arch models whose per-range work is additive.
inline size_t coalesce(const PfnRange *in, size_t n, PfnRange *out)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (m && out[m - 1].end_pfn == in[i].start_pfn)
            out[m - 1].end_pfn = in[i].end_pfn;
        else
            out[m++] = in[i];
    }
    return m;
}

/*
 * clamp_folio_ranges - the walk as a pure function over a caller's folio layout, given as
 * parallel arrays sorted by index.  count_clamped() finds the folios that overlap
 * [start, end) (first, count) to size the output; clamp_folio_ranges() then validates the
 * whole layout (orders 0..18, index and pfn aligned, sorted, non-overlapping), throwing
 * InvalidArgument naming the first bad folio, and clamps those folios in the same pass.
 */
void check_folio_layout(const uint64_t *index, const uint64_t *order, const uint64_t *pfn,
                        size_t n);
size_t count_clamped(const uint64_t *index, const uint64_t *order, size_t n, uint64_t start,
                     uint64_t end, size_t *first);
void clamp_folio_ranges(const uint64_t *index, const uint64_t *order, const uint64_t *pfn,
                        size_t n, size_t first, size_t count, uint64_t start, uint64_t end,
                        PfnRange *out);

} // namespace gmem
