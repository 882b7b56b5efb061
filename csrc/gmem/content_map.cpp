// SPDX-License-Identifier: MIT
// content_map.cpp - ContentMap loads and stores over sparse runs and dense page arrays.
#include "content_map.hpp"

#include <new>

namespace gmem {

size_t ContentMap::nr_runs() const
{
    size_t n = 0;
    for_each_run(0, nr_pages(), [&](uint64_t, uint64_t, uint64_t) { n++; });
    return n;
}

uint64_t ContentMap::load(uint64_t index) const
{
    sparse_.check_index(index);
    if (nr_dense_) {
        auto it = groups_.find(index >> DENSE_SHIFT);
        if (it != groups_.end() && it->second.pages)
            return it->second.pages[index & (DENSE_PAGES - 1)];
    }
    return sparse_.load(index);
}

/* The group @gid, or null, through @c: one map search per group a loop enters. */
inline ContentMap::Group *ContentMap::find(uint64_t gid, Cursor &c) const
{
    if (gid != c.gid || c.gen != gen_) {
        auto it = groups_.find(gid);
        // The cursor belongs to a caller that may change the map: it may hold the group.
        c.group = it == groups_.end() ? nullptr : const_cast<Group *>(&it->second);
        c.gid = gid;
        c.gen = gen_;
    }
    return c.group;
}

uint64_t ContentMap::load_slow(uint64_t index, Cursor &c) const
{
    Group *g = find(index >> DENSE_SHIFT, c);
    if (g && g->pages) {
        sparse_.check_index(index);
        return g->pages[index & (DENSE_PAGES - 1)];
    }
    if (c.sgen != sgen_ || index < c.run.start || index >= c.run.end) {
        c.run = sparse_.run_at(index); // checks the index
        c.sgen = sgen_;
    }
    return c.run.value;
}

void ContentMap::store_slow(uint64_t index, uint64_t value, Cursor &c)
{
    sparse_.check_index(index);
    uint64_t gid = index >> DENSE_SHIFT;
    Group *g = find(gid, c);
    if (g && g->pages) {
        g->pages[index & (DENSE_PAGES - 1)] = value;
        return;
    }
    sparse_.store(index, index + 1, value);
    sgen_++;
    try {
        count_store(gid, g, c);
    } catch (const std::bad_alloc &) {
        // Turning a group dense only saves time: without the memory it stays sparse.
    }
}

/*
 * count_store - one more single-page store into the sparse group @gid: every DENSE_CHECK
 * of them, count the group's runs, and turn it dense when they are DENSE_RUNS or more.
 */
void ContentMap::count_store(uint64_t gid, Group *g, Cursor &c)
{
    if (!g) {
        g = &groups_[gid];
        c.group = g;
    }
    if (++g->stores < DENSE_CHECK)
        return;
    g->stores = 0;
    uint64_t start = gid << DENSE_SHIFT, end = std::min(nr_pages(), start + DENSE_PAGES);
    if (sparse_.count_runs(start, end) >= DENSE_RUNS)
        make_dense(gid, *g);
}

/*
 * make_dense - copy the group's runs into a new array; the IntervalMap then holds the
 * group as part of the run before it (or after it), so it shrinks by the group's runs.
 * All memory is had before anything changes.
 */
void ContentMap::make_dense(uint64_t gid, Group &g)
{
    uint64_t start = gid << DENSE_SHIFT, end = std::min(nr_pages(), start + DENSE_PAGES);
    std::unique_ptr<uint64_t[]> pages(new uint64_t[DENSE_PAGES]());
    sparse_.reserve_stores(1);
    sparse_.for_each_run(start, end, [&](uint64_t a, uint64_t b, uint64_t v) {
        std::fill(pages.get() + (a - start), pages.get() + (b - start), v);
    });
    uint64_t filler = start ? sparse_.load(start - 1) : end < nr_pages() ? sparse_.load(end) : 0;
    sparse_.store(start, end, filler);
    g.pages = std::move(pages);
    nr_dense_++;
    gen_++;
    sgen_++;
}

/* A dense group whose pages all hold one token goes back to the IntervalMap. */
void ContentMap::make_sparse_if_uniform(uint64_t gid, Group &g)
{
    uint64_t start = gid << DENSE_SHIFT, end = std::min(nr_pages(), start + DENSE_PAGES);
    const uint64_t *p = g.pages.get(), first = p[0];
    for (uint64_t i = 1; i < end - start; i++)
        if (p[i] != first)
            return;
    try {
        sparse_.reserve_stores(1);
    } catch (const std::bad_alloc &) {
        return; // it stays dense: still right, only larger
    }
    sparse_.store(start, end, first);
    g.pages.reset();
    nr_dense_--;
    gen_++;
    sgen_++;
}

/*
 * store - a single page goes through store_one; a range is stored in the IntervalMap
 * first (the only step that can fail), then the dense groups it covers whole are
 * dropped and those it covers in part are written.
 */
void ContentMap::store(uint64_t start, uint64_t end, uint64_t value)
{
    if (end == start + 1 && start < nr_pages()) {
        Cursor c;
        store_slow(start, value, c);
        return;
    }
    sparse_.store(start, end, value); // validates
    sgen_++;
    if (groups_.empty())
        return;
    uint64_t last = (end - 1) >> DENSE_SHIFT;
    for (auto it = groups_.lower_bound(start >> DENSE_SHIFT);
         it != groups_.end() && it->first <= last;) {
        uint64_t gs = it->first << DENSE_SHIFT, ge = std::min(nr_pages(), gs + DENSE_PAGES);
        Group &g = it->second;
        if (start <= gs && end >= ge) {
            nr_dense_ -= g.pages ? 1 : 0;
            it = groups_.erase(it);
            gen_++;
            continue;
        }
        if (g.pages) {
            std::fill(g.pages.get() + (std::max(start, gs) - gs),
                      g.pages.get() + (std::min(end, ge) - gs), value);
            make_sparse_if_uniform(it->first, g);
        }
        ++it;
    }
}

std::vector<Run> ContentMap::runs(uint64_t start, uint64_t end) const
{
    sparse_.check_range(start, end, true);
    std::vector<Run> out;
    for_each_run(start, end,
                 [&](uint64_t a, uint64_t b, uint64_t v) { out.push_back(Run{a, b, v}); });
    return out;
}

} // namespace gmem
