// SPDX-License-Identifier: MIT
// physmem.hpp - PhysMem: modelled physical memory, a buddy allocator plus page contents.
//
// DOC: PhysMem
//
// PFNs [base_pfn, base_pfn + nr_pages) start out free as the largest naturally aligned
// blocks (order <= MAX_ORDER) that tile the range.  Free blocks sit in one ordered set per
// order.  alloc(order) is lowest-address first fit: of all free blocks of that order or
// larger, the one at the lowest address; it is split and its lowest part handed out, so a
// run is reproducible from the seed and the call sequence alone.  free() coalesces with
// the buddy while the buddy is free.
//
//     order 2: [ 8 .. 12 )            alloc(0) from an empty range of 16:
//     order 1: [ 2 .. 4 )               hands out 0, leaves 1@0, 2@1, 4@2, 8@3 free
//     order 0: [ 1 ]
//
// Each PFN also holds a 64-bit content token (0 = zeroed) and the per-PFN state of the
// architecture models (SNP's RMP, pKVM's page ownership), each kept as a run map over the
// PFNs: memory that was never touched, or that is uniformly in one state, is one run, so
// zeroing, garbling or reassigning a 1 GiB folio is one store.  A freed page keeps its
// token until it is overwritten or scrubbed, which is what makes a missing scrub visible.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

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

/*
 * FreeList - the free blocks of one order, sorted by PFN.  Runs of consecutive blocks
 * (first PFN -> end PFN) rather than one node per block: a fresh PhysMem of 2**52 pages is
 * 2**34 free blocks of the top order but one run, so memory follows what was touched.
 * (Below the top order, buddies coalesce, so runs are at most two blocks long.)
 */
class FreeList {
public:
    /// @runs: keep runs (the top order); else one set node per block (buddies coalesce,
    /// so a run below the top order is at most two blocks: a set is simpler and faster).
    explicit FreeList(uint64_t block_pages = 1, bool runs = false)
        : block_(block_pages), runs_mode_(runs)
    {
    }

    bool empty() const { return nr_blocks_ == 0; }
    uint64_t size() const { return nr_blocks_; }
    uint64_t first() const { return runs_mode_ ? runs_.begin()->first : *set_.begin(); }
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
    /// Erase every block in [lo, hi); returns how many.
    uint64_t erase_range(uint64_t lo, uint64_t hi);
    /// fn(pfn) for each block in order, until fn returns false.
    template <class Fn>
    void for_each(Fn &&fn) const
    {
        if (!runs_mode_) {
            for (uint64_t p : set_)
                if (!fn(p))
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
    std::set<uint64_t> set_;
    std::map<uint64_t, uint64_t> runs_;
    std::map<uint64_t, uint64_t>::const_iterator run_of(uint64_t pfn) const;
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
    /// Give back [pfn, pfn + 2**order); none of it may be free already.
    void free(uint64_t pfn, unsigned order);
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
        for (unsigned o = 0; o <= MAX_ORDER; o++)
            at[o] = free_[o].at_or_after(0);
        for (;;) {
            unsigned lo = 0;
            for (unsigned o = 1; o <= MAX_ORDER; o++)
                lo = at[o] < at[lo] ? o : lo;
            if (at[lo] == UINT64_MAX || !fn(FreeBlock{at[lo], lo}))
                return;
            at[lo] = free_[lo].at_or_after(at[lo] + (uint64_t(1) << lo));
        }
    }
    uint64_t nr_free_blocks() const;
    std::string dump() const;

    void check_order(unsigned order, const char *arg = "order") const;
    void check_pfn(uint64_t pfn, const char *arg = "pfn") const;
    /// @pfn aligned to 2**@order, the whole block inside this memory.
    void check_block(uint64_t pfn, unsigned order) const;

private:
    uint64_t base_, nr_pages_, seed_, nr_free_ = 0;
    SplitMix64 rng_;
    std::array<FreeList, MAX_ORDER + 1> free_;
    IntervalMap tokens_, rmp_, owner_; // indexed by pfn - base_
    IntervalMap user_;                 // 1: held through the public API
    std::vector<uint64_t> kept_;       // pages kept by fragment(), sorted

    void add_free_range(uint64_t start, uint64_t end);
    void check_not_free(uint64_t pfn, unsigned order) const;
    bool find_free_container(uint64_t pfn, unsigned order, uint64_t *block,
                             unsigned *block_order) const;
};

} // namespace gmem
