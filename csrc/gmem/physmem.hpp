// SPDX-License-Identifier: MIT
// physmem.hpp - PhysMem: modelled physical memory, a buddy allocator plus page contents.
//
// DOC: PhysMem
//
// PFNs [base_pfn, base_pfn + nr_pages) start out free as the largest naturally aligned
// blocks (order <= MAX_ORDER) that tile the range.  The free blocks are always the
// canonical buddy decomposition of the free pages: every maximal naturally aligned run of
// free pages of order <= MAX_ORDER.  alloc(order) is lowest-address first fit: of all free
// blocks of that order or larger, the one at the lowest address; it is split and its
// lowest part handed out, so a run is reproducible from the seed and the call sequence
// alone.  free() coalesces with the buddy while the buddy is free.
//
//     order 2: [ 8 .. 12 )            alloc(0) from an empty range of 16:
//     order 1: [ 2 .. 4 )               hands out 0, leaves 1@0, 2@1, 4@2, 8@3 free
//     order 0: [ 1 ]
//
// Two tiers hold the free blocks.  Blocks of order >= GROUP_ORDER (12: 16 MiB) sit in one
// ordered map per order (runs of blocks at MAX_ORDER, so a 2**52-page PhysMem is one
// entry).  A 2**12-page group that was broken up (a block below order 12 handed out from
// it) and is not all free again has a page bitmap (PageGroup, 600 bytes), and its blocks of
// order < 12 are read off the bitmap.  So memory follows what is fragmented or in use in
// small pieces, not the size of the range, and allocating or freeing a page is a few word
// operations on one bitmap.
//
// Giving back a block as it was handed out (free_unchecked(): the page cache's folios)
// never allocates, so that an undo after the host ran out of memory (fallocate's) and a
// teardown cannot fail half-way: a group keeps its bitmap while it has no free page, each
// group owns the one map node that files it by its largest free order (which serves as
// its order-12 free block when it is all free again), and the top tier's free-list nodes
// come from a NodePool holding a spare for every block of order >= 12 handed out.  What
// can allocate (splitting a block, a new bitmap) is done by the allocating side, before it
// changes anything.
//
// Each PFN also holds a 64-bit content token (0 = zeroed) and the per-PFN state of the
// architecture models (SNP's RMP, pKVM's page ownership), each kept as a run map over the
// PFNs: memory that was never touched, or that is uniformly in one state, is one run, so
// zeroing, garbling or reassigning a 1 GiB folio is one store.  The tokens are a
// ContentMap: where page-by-page writes leave many runs, a group of pages is an array.
// A freed page keeps its token until it is overwritten or scrubbed, which is what makes a
// missing scrub visible.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "content_map.hpp"
#include "interval_map.hpp"
#include "lockable.hpp"

namespace gmem {

constexpr unsigned MAX_ORDER = 18;
/// PFNs fit in 52 bits: 64-bit physical addresses over 4 KiB pages.  The folio cache packs
/// a PFN, its order and flags into one word thanks to it.
constexpr uint64_t PFN_LIMIT = uint64_t(1) << 52;
/// PhysMem.free_blocks() in Python lists at most this many (a 2**52-page PhysMem starts
/// with 2**34 free blocks: nr_free and dump() describe it without listing them all).
constexpr uint64_t FREE_BLOCKS_LISTED = uint64_t(1) << 24;

/// The splitmix64 generator: tiny, and the same bits in C++ and in the Python reference.
struct SplitMix64 {
    uint64_t state;
    uint64_t next()
    {
        uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
};

struct FreeBlock {
    uint64_t pfn;
    unsigned order;
};

/// One node type for every map of the free lists (the value is unused outside runs), so a
/// node can move from one to another without allocating.
using NodeMap = std::map<uint64_t, uint64_t>;
using Node = NodeMap::node_type;

/*
 * NodePool - spare NodeMap nodes, so that freeing pages never allocates.
 *
 * Freeing a block of order >= 12 that was handed out whole inserts one free-list node at
 * most (coalescing erases as many as it inserts); the pool holds at least one spare per
 * such block (owed(); not for PhysMem.alloc/take's, which come back through free(): it
 * reserves its own).  get() pops a spare only above that floor and allocates otherwise,
 * so an operation that is allowed to fail (an allocation) can never spend a spare that a
 * free needs; an operation that takes blocks reserve()s its worst case first, while
 * failing still changes nothing.  put() keeps a node only up to a little over the floor and
 * never grows the vector, so put() cannot fail and memory follows the blocks held.
 */
class NodePool {
public:
    static constexpr uint64_t SLACK = 16; // spares kept above the floor

    NodePool() { nodes_.reserve(SLACK); }
    uint64_t size() const { return nodes_.size(); }
    uint64_t owed() const { return owed_; }
    /// A node holding (@key, @value): a spare above the floor, else a new one (may throw).
    Node get(uint64_t key, uint64_t value)
    {
        if (nodes_.size() <= owed_)
            return make(key, value);
        Node n = std::move(nodes_.back());
        nodes_.pop_back();
        n.key() = key;
        n.mapped() = value;
        return n;
    }
    /// Keep @n as a spare if the pool is short of its floor plus SLACK; never allocates.
    void put(Node &&n)
    {
        if (nodes_.size() < owed_ + SLACK && nodes_.size() < nodes_.capacity())
            nodes_.push_back(std::move(n));
        // else @n is freed as it goes out of scope
    }
    /// Make sure the next @extra get()s cannot allocate; throws with nothing changed.
    void reserve(uint64_t extra)
    {
        uint64_t want = owed_ + extra;
        if (nodes_.size() >= want)
            return;
        // Grown geometrically: one reserve per new block of a fallocate, sized exactly,
        // moved every handle each time (64 TiB of 1 GiB folios: 13.6 s, quadratic).
        if (nodes_.capacity() < want + SLACK)
            nodes_.reserve(size_t(std::max<uint64_t>(want + SLACK, 2 * nodes_.capacity())));
        while (nodes_.size() < want)
            nodes_.push_back(make(0, 0));
    }
    /// @n blocks of order >= 12 were handed out (reserve()d for first).
    void owe(uint64_t n) { owed_ += n; }
    /// ... but they come back through free(), which reserves for itself.
    void disown(uint64_t n) { owed_ -= std::min(owed_, n); }
    /// @n such blocks (or several, merged, as one) came back; at most @limit are still out.
    void repaid(uint64_t n, uint64_t limit)
    {
        owed_ = std::min(owed_ - std::min(owed_, n), limit);
        while (nodes_.size() > owed_ + 4 * SLACK) // memory follows the blocks held
            nodes_.pop_back();
    }

private:
    std::vector<Node> nodes_;
    uint64_t owed_ = 0;

    static Node make(uint64_t key, uint64_t value)
    {
        NodeMap m;
        m.emplace(key, value);
        return m.extract(m.begin());
    }
};

/*
 * FreeList - the free blocks of one order, sorted by PFN.  Runs of consecutive blocks
 * (first PFN -> end PFN) rather than one node per block: a fresh PhysMem of 2**52 pages is
 * 2**34 free blocks of the top order but one run, so memory follows what was touched.
 * (Below the top order, buddies coalesce, so runs are at most two blocks long.)
 */
class FreeList {
public:
    /// @runs: keep runs (the top order); else one node per block (buddies coalesce, so a
    /// run below the top order is at most two blocks: a set is simpler and faster).  Nodes
    /// come from and go back to @pool.
    explicit FreeList(uint64_t block_pages = 1, bool runs = false, NodePool *pool = nullptr)
        : block_(block_pages), runs_mode_(runs), pool_(pool)
    {
    }

    bool empty() const { return nr_blocks_ == 0; }
    uint64_t size() const { return nr_blocks_; }
    uint64_t first() const { return runs_mode_ ? runs_.begin()->first : set_.begin()->first; }
    bool contains(uint64_t pfn) const
    {
        if (!runs_mode_)
            return set_.count(pfn) != 0;
        auto it = run_of(pfn);
        return it != runs_.end() && (pfn - it->first) % block_ == 0;
    }
    /// The first free block at or after @pfn, or UINT64_MAX.
    uint64_t at_or_after(uint64_t pfn) const;
    /// Add the @n consecutive blocks from @pfn, all of them free now.
    void insert(uint64_t pfn, uint64_t n = 1);
    void erase(uint64_t pfn);
    /// erase(@pfn) if it is a free block; returns whether it was.
    bool erase_if_free(uint64_t pfn);
    /// Erase every block in [lo, hi); returns how many.
    uint64_t erase_range(uint64_t lo, uint64_t hi);
    /// fn(pfn) for each block in order, until fn returns false.
    template <class Fn>
    void for_each(Fn &&fn) const
    {
        if (!runs_mode_) {
            for (const auto &p : set_)
                if (!fn(p.first))
                    return;
            return;
        }
        for (const auto &r : runs_)
            for (uint64_t p = r.first; p < r.second; p += block_)
                if (!fn(p))
                    return;
    }

private:
    uint64_t block_, nr_blocks_ = 0;
    bool runs_mode_;
    NodePool *pool_;
    NodeMap set_; // block -> unused
    NodeMap runs_;
    NodeMap::const_iterator run_of(uint64_t pfn) const;
};

/// Blocks below this order live in per-group page bitmaps (PageGroup), the rest in FreeLists.
constexpr unsigned GROUP_ORDER = 12;
constexpr uint64_t GROUP_PAGES = uint64_t(1) << GROUP_ORDER;

/*
 * PageGroup - the free pages of one naturally aligned 2**12-page group that is partly
 * free: one bit per page (1 = free) and, for each order o <= 6, a summary word whose bit j
 * says that word j holds a free naturally aligned block of order o (sum[6]: word j is all
 * free).  Orders 7..11 are read off sum[6].  A block of order o is free exactly when its
 * bits are, so the lowest free block of order o is two count-trailing-zeros away.
 */
struct PageGroup {
    uint64_t bits[64];
    uint64_t sum[7];
    mutable int32_t nr_blocks = -1; // canonical free blocks, -1: not counted since a change
    int32_t max_order = -1;         // largest order with a free block; -1: none free
    Node node; // the group's by_max_ node (key: the group) while it is not filed there

    static constexpr uint64_t M[6] = {0x5555555555555555ULL, 0x1111111111111111ULL,
                                      0x0101010101010101ULL, 0x0001000100010001ULL,
                                      0x0000000100000001ULL, 0x0000000000000001ULL};
    /// The bits of @w that start a free naturally aligned block of order @o (o <= 6).
    static uint64_t fold(uint64_t w, unsigned o)
    {
        for (unsigned k = 0; k < o; k++)
            w &= (w >> (1u << k)) & M[k];
        return w;
    }
    /// Recompute the summaries of word @j after its bits changed; returns the largest
    /// order of a free block inside the word (-1: none).
    int32_t update_word(unsigned j)
    {
        uint64_t w = bits[j], bit = uint64_t(1) << j, keep = ~bit;
        sum[0] = (sum[0] & keep) | (w ? bit : 0);
        w &= (w >> 1) & M[0];
        sum[1] = (sum[1] & keep) | (w ? bit : 0);
        w &= (w >> 2) & M[1];
        sum[2] = (sum[2] & keep) | (w ? bit : 0);
        w &= (w >> 4) & M[2];
        sum[3] = (sum[3] & keep) | (w ? bit : 0);
        w &= (w >> 8) & M[3];
        sum[4] = (sum[4] & keep) | (w ? bit : 0);
        w &= (w >> 16) & M[4];
        sum[5] = (sum[5] & keep) | (w ? bit : 0);
        sum[6] = (sum[6] & keep) | (bits[j] == ~uint64_t(0) ? bit : 0);
        nr_blocks = -1;
        if (bits[j] == ~uint64_t(0))
            return 6;
        int32_t top = -1; // the summaries nest: sum[o + 1] is a subset of sum[o]
        for (unsigned o = 0; o <= 5 && (sum[o] & bit); o++)
            top = int32_t(o);
        return top;
    }
    /// Offset of the lowest free block of order @o (< 12) in the group, or -1.
    int64_t find_first(unsigned o) const;
    /// Recompute max_order; returns it.
    int32_t compute_max_order();
    /// Set (free) or clear (allocate) the bits of pages [lo, hi) of the group.
    void set_range(unsigned lo, unsigned hi, bool free);
    /// Are all pages [lo, hi) free / none of them?
    bool all_free(unsigned lo, unsigned hi) const;
    bool any_free(unsigned lo, unsigned hi) const;
    /// fn(offset, order) for each canonical free block in offset order, until fn is false;
    /// returns false if fn stopped it.
    template <class Fn>
    bool for_each_block(Fn &&fn) const
    {
        for (unsigned p = 0; p < GROUP_PAGES;) {
            unsigned j = p >> 6;
            uint64_t w = bits[j] >> (p & 63);
            if (!w) {
                p = (j + 1) << 6;
                continue;
            }
            p += unsigned(__builtin_ctzll(w));
            unsigned o = 0;
            while (o + 1 < GROUP_ORDER && (p & ((2u << o) - 1)) == 0 &&
                   all_free(p, p + (2u << o)))
                o++;
            if (!fn(p, o))
                return false;
            p += 1u << o;
        }
        return true;
    }
    uint64_t count_blocks() const;
};

class PhysMem : public Lockable {
public:
    PhysMem(uint64_t nr_pages, uint64_t base_pfn = 0, uint64_t seed = 0);

    uint64_t nr_pages() const { return nr_pages_; }
    uint64_t base_pfn() const { return base_; }
    uint64_t end_pfn() const { return base_ + nr_pages_; }
    uint64_t seed() const { return seed_; }
    uint64_t nr_free() const { return nr_free_; }
    uint64_t nr_kept() const { return kept_.size(); }

    /// Lowest-address first fit; throws OutOfMemory when no block of @order is free.
    uint64_t alloc(unsigned order);
    /// Like alloc() but returns false instead of throwing.
    bool try_alloc(unsigned order, uint64_t *pfn);
    /// try_alloc(@order) @n times at once: the same blocks in the same order into @out;
    /// returns how many: fewer than @n only when no block of @order is left, or when the
    /// host ran out of memory after some were taken (the next try_alloc() then throws).
    size_t alloc_many(unsigned order, size_t n, uint64_t *out);
    /// Give back [pfn, pfn + 2**order); none of it may be free already.
    void free(uint64_t pfn, unsigned order);
    /// free() without the checks, for blocks whose holder's own bookkeeping says they are
    /// held (the page cache's folios): a block that is partly free corrupts the allocator.
    /// Never allocates for a block handed out as it is, so an undo cannot fail.
    void free_unchecked(uint64_t pfn, unsigned order);
    /// free_unchecked() of the pages [pfn, pfn + nr), as the largest aligned blocks; never
    /// allocates when the range is a union of blocks handed out whole.
    void free_range_unchecked(uint64_t pfn, uint64_t nr);
    /// Is all of [pfn, pfn + 2**order) free?  (the block must be valid: see check_block)
    bool is_free(uint64_t pfn, unsigned order) const;
    /// Take the specific block [pfn, pfn + 2**order), which must be free.
    void take(uint64_t pfn, unsigned order);
    /// The same, for blocks held through the public API (PhysMem.alloc/take/free in
    /// Python): they are marked, and user_free() frees only marked pages, never a page
    /// that a file holds.
    uint64_t user_alloc(unsigned order);
    void user_take(uint64_t pfn, unsigned order);
    void user_free(uint64_t pfn, unsigned order);
    /// Keep a seeded random @fraction (0..1) of the free pages as order-0 blocks.
    void fragment(double fraction);

    uint64_t read(uint64_t pfn) const;
    void write(uint64_t pfn, uint64_t token);
    /// The same, for a loop of them: @c remembers where the last one went.
    uint64_t read(uint64_t pfn, ContentMap::Cursor &c) const
    {
        if (pfn - base_ >= nr_pages_)
            check_pfn(pfn);
        return tokens_.load(pfn - base_, c);
    }
    void write(uint64_t pfn, uint64_t token, ContentMap::Cursor &c)
    {
        if (pfn - base_ >= nr_pages_)
            check_pfn(pfn);
        tokens_.store_one(pfn - base_, token, c);
    }
    /// Set every page of [pfn, pfn + nr) to @token; O(runs), not O(nr).
    void fill(uint64_t pfn, uint64_t nr, uint64_t token);
    /// Content runs over [pfn, pfn + nr): (start_pfn, end_pfn, token).
    std::vector<Run> contents(uint64_t pfn, uint64_t nr) const;

    /// Per-PFN arch state, indexed by pfn - base_pfn(): SNP's RMP and pKVM's ownership.
    IntervalMap &rmp() { return rmp_; }
    const IntervalMap &rmp() const { return rmp_; }
    IntervalMap &owner() { return owner_; }
    const IntervalMap &owner() const { return owner_; }

    /// Free blocks sorted by PFN: the first @limit of them.
    std::vector<FreeBlock> free_blocks(size_t limit = SIZE_MAX) const;
    /// fn(block) for each free block in PFN order, until fn returns false; O(1) memory.
    template <class Fn>
    void for_each_free_block(Fn &&fn) const
    {
        uint64_t at[MAX_ORDER + 1];
        for (unsigned o = GROUP_ORDER; o <= MAX_ORDER; o++)
            at[o] = free_[o].at_or_after(0);
        auto g = groups_.begin();
        for (;;) {
            unsigned lo = GROUP_ORDER;
            for (unsigned o = GROUP_ORDER + 1; o <= MAX_ORDER; o++)
                lo = at[o] < at[lo] ? o : lo;
            if (g != groups_.end() && (g->first << GROUP_ORDER) < at[lo]) {
                uint64_t base = g->first << GROUP_ORDER;
                if (g->second.max_order >= 0 && !g->second.for_each_block([&](unsigned off, unsigned o) {
                        return fn(FreeBlock{base + off, o});
                    }))
                    return;
                ++g;
                continue;
            }
            if (at[lo] == UINT64_MAX || !fn(FreeBlock{at[lo], lo}))
                return;
            at[lo] = free_[lo].at_or_after(at[lo] + (uint64_t(1) << lo));
        }
    }
    uint64_t nr_free_blocks() const;
    std::string dump() const;
    /// The allocator's invariants, for tests: "" or the first one broken.  O(groups +
    /// free blocks), memory O(1).
    std::string check() const;
    /// Spare free-list nodes, and how many the blocks handed out may need (<= spares).
    uint64_t nr_spare_nodes() const { return pool_.size(); }
    uint64_t nr_owed_nodes() const { return pool_.owed(); }

    void check_order(unsigned order, const char *arg = "order") const;
    void check_pfn(uint64_t pfn, const char *arg = "pfn") const;
    /// @pfn aligned to 2**@order, the whole block inside this memory.
    void check_block(uint64_t pfn, unsigned order) const;

private:
    uint64_t base_, nr_pages_, seed_, nr_free_ = 0;
    SplitMix64 rng_;
    NodePool pool_;                            // spare nodes for free_ (see NodePool)
    std::array<FreeList, MAX_ORDER + 1> free_; // orders >= GROUP_ORDER only
    std::map<uint64_t, PageGroup> groups_;     // broken-up groups, by pfn >> GROUP_ORDER
    std::array<NodeMap, GROUP_ORDER> by_max_;  // groups_ keys by max_order (0..11)
    unsigned by_max_used_ = 0;                           // bit m: by_max_[m] is not empty
    PageGroup *last_ = nullptr;                // the group free_unchecked() used last
    uint64_t last_gid_ = UINT64_MAX;
    ContentMap tokens_;               // indexed by pfn - base_
    IntervalMap rmp_, owner_;         // indexed by pfn - base_
    IntervalMap user_;                 // 1: held through the public API
    std::vector<uint64_t> kept_;       // pages kept by fragment(), sorted

    void add_free_range(uint64_t start, uint64_t end);
    void check_not_free(uint64_t pfn, unsigned order) const;
    bool find_free_container(uint64_t pfn, unsigned order, uint64_t *block,
                             unsigned *block_order) const;
    PageGroup *group(uint64_t gid);
    const PageGroup *group(uint64_t gid) const;
    PageGroup &new_group(uint64_t gid);
    void group_changed(uint64_t gid, PageGroup &g);
    bool lowest_block(unsigned order, uint64_t *pfn, unsigned *bo, bool *is_group) const;
    void split_top(uint64_t block, unsigned bo, uint64_t pfn, unsigned order);
    std::map<uint64_t, PageGroup>::iterator dissolve(std::map<uint64_t, PageGroup>::iterator it);
    void free_top(uint64_t pfn, unsigned order);
    void free_big(uint64_t pfn, unsigned order, bool owed);
    void give_back(uint64_t pfn, unsigned order, bool owed);
    void set_free(uint64_t start, uint64_t end, bool free);
    uint64_t clear_free(uint64_t lo, uint64_t hi);
};

} // namespace gmem
