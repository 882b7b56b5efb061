// SPDX-License-Identifier: MIT
// content_map.hpp - ContentMap: a token for every page, as runs where few, as arrays where many.
//
// DOC: ContentMap
//
// Page contents (PhysMem's tokens, a file's expected contents) are mostly uniform - a
// zeroed 1 GiB folio is one run - but a guest that writes page by page gives every page
// its own token, and a run map then pays a tree search and a run split per write.  So
// the pages are cut into groups of DENSE_PAGES (512): a group where single-page stores
// have left many runs gets a plain array of its tokens (4 KiB), allocated when it turns
// dense; every other group lives in a sparse IntervalMap.
//
//     pages:   [ group 0: sparse ][ group 1: dense  ][ group 2: sparse ] ...
//     sparse:  [ 0 ........ )[ 7 )[   don't care   )[ 0 ............. )
//     dense:                      [ t t t t ... t  ]   (512 tokens)
//
// Inside a dense group the IntervalMap's values mean nothing; the array holds the truth.
// A group turns dense when, counted every DENSE_CHECK single-page stores into it, it holds
// at least DENSE_RUNS runs (so an array never costs more than a few times the runs it
// replaces), and sparse again when a range store covers it whole or leaves it uniform.
// Memory follows what was written, never the number of pages.  Readers see maximal runs,
// exactly as from one IntervalMap.
//
// A Cursor remembers the last group (and the last sparse run) a loop touched, so a
// forward walk pays one map search per group; a change of the map's shape bumps a
// generation that makes every cursor look again.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "interval_map.hpp"

namespace gmem {

class ContentMap {
public:
    static constexpr unsigned DENSE_SHIFT = 9;
    static constexpr uint64_t DENSE_PAGES = uint64_t(1) << DENSE_SHIFT;
    static constexpr uint32_t DENSE_CHECK = 64; // single stores between two run counts
    static constexpr size_t DENSE_RUNS = 64;    // runs in a group that make it dense

    explicit ContentMap(uint64_t nr_pages, uint64_t value = 0) : sparse_(nr_pages, value) {}

    struct Group {
        std::unique_ptr<uint64_t[]> pages; // null: sparse
        uint32_t stores = 0;               // single-page stores since the last count
    };

    /// What a loop remembers between its loads and stores (see DOC above).
    struct Cursor {
        uint64_t gid = UINT64_MAX, gen = 0;
        Group *group = nullptr;
        Run run{1, 0, 0}; // the last sparse run read (empty: none)
        uint64_t sgen = 0;
    };

    uint64_t nr_pages() const { return sparse_.nr_pages(); }
    /// Maximal runs in the whole map (walks it: for dump()).
    size_t nr_runs() const;
    size_t dense_groups() const { return nr_dense_; }

    uint64_t load(uint64_t index) const;
    /// load(@index), remembering the group in @c: inline while the loop stays in it.
    uint64_t load(uint64_t index, Cursor &c) const
    {
        uint64_t gid = index >> DENSE_SHIFT;
        if (gid == c.gid && c.gen == gen_ && c.group && c.group->pages && index < nr_pages())
            return c.group->pages[index & (DENSE_PAGES - 1)];
        return load_slow(index, c);
    }
    /// Set [start, end) to @value.  0 <= start < end <= nr_pages.
    void store(uint64_t start, uint64_t end, uint64_t value);
    /// store(index, index + 1, value), remembering the group in @c.
    void store_one(uint64_t index, uint64_t value, Cursor &c)
    {
        uint64_t gid = index >> DENSE_SHIFT;
        if (gid == c.gid && c.gen == gen_ && c.group && c.group->pages && index < nr_pages())
            c.group->pages[index & (DENSE_PAGES - 1)] = value;
        else
            store_slow(index, value, c);
    }
    /// Make the next @n stores allocation-free (turning a group dense is skipped when
    /// memory runs out: it is only ever an optimization).
    void reserve_stores(size_t n) { sparse_.reserve_stores(n); }

    /// Maximal runs over [start, end), clipped to it.
    std::vector<Run> runs(uint64_t start, uint64_t end) const;
    /// fn(start, end, value) for each maximal run over [start, end), clipped to it.
    template <class Fn>
    void for_each_run(uint64_t start, uint64_t end, Fn &&fn) const;

private:
    IntervalMap sparse_;
    std::map<uint64_t, Group> groups_; // by index >> DENSE_SHIFT: dense, or counting stores
    size_t nr_dense_ = 0;
    uint64_t gen_ = 1;  // bumped when a group is erased or turns dense or sparse
    uint64_t sgen_ = 1; // bumped by every store to sparse_

    Group *find(uint64_t gid, Cursor &c) const;
    uint64_t load_slow(uint64_t index, Cursor &c) const;
    void store_slow(uint64_t index, uint64_t value, Cursor &c);
    void count_store(uint64_t gid, Group *g, Cursor &c);
    void make_dense(uint64_t gid, Group &g);
    void make_sparse_if_uniform(uint64_t gid, Group &g);
};

template <class Fn>
void ContentMap::for_each_run(uint64_t start, uint64_t end, Fn &&fn) const
{
    Run cur{start, start, 0};
    auto emit = [&](uint64_t a, uint64_t b, uint64_t v) {
        if (cur.end == a && cur.value == v && cur.start < cur.end) {
            cur.end = b;
            return;
        }
        if (cur.start < cur.end)
            fn(cur.start, cur.end, cur.value);
        cur = Run{a, b, v};
    };
    uint64_t at = start;
    auto it = groups_.lower_bound(start >> DENSE_SHIFT);
    while (at < end) {
        while (it != groups_.end() && !it->second.pages)
            ++it;
        uint64_t dense = it == groups_.end() ? UINT64_MAX : it->first << DENSE_SHIFT;
        uint64_t stop = std::min(end, std::max(dense, at));
        if (at < stop)
            sparse_.for_each_run(at, stop, emit);
        at = stop;
        if (at >= end)
            break;
        const uint64_t *pages = it->second.pages.get();
        uint64_t gend = std::min(end, dense + DENSE_PAGES);
        for (; at < gend; at++)
            emit(at, at + 1, pages[at - dense]);
        ++it;
    }
    if (cur.start < cur.end)
        fn(cur.start, cur.end, cur.value);
}

} // namespace gmem
