// SPDX-License-Identifier: MIT
// page_set.hpp - PageSet: a set of page indexes, kept as runs.
//
// DOC: PageSet
//
// The pages a host maps come in stretches (a loop over a buffer, a whole shared region),
// so the set is an IntervalMap of 1 (in) and 0 (out): a stretch is one run however long,
// counting the pages of a range costs its runs, not its pages, and a loop of accesses to
// pages already in the set asks the map once per run through a Hint.
//
//     index:  0     100        300   301        nr_pages
//             [ 0   )[ 1        )[ 0 )[ 1 )[ 0    )        {100..299, 301}
#pragma once

#include <cstdint>

#include "interval_map.hpp"

namespace gmem {

class PageSet {
public:
    explicit PageSet(uint64_t nr_pages) : map_(nr_pages, 0), nr_pages_(nr_pages) {}

    /// What a loop of inserts remembers: the last run it saw, while the set is unchanged.
    struct Hint {
        Run run{1, 0, 0};
        uint64_t gen = 0;
    };

    bool empty() const { return count_ == 0; }
    uint64_t size() const { return count_; }
    bool contains(uint64_t index) const { return map_.load(index) != 0; }
    void insert(uint64_t index)
    {
        Hint h;
        insert(index, h);
    }
    void insert(uint64_t index, Hint &h)
    {
        if (h.gen == gen_ && index >= h.run.start && index < h.run.end && h.run.value)
            return;
        h.run = map_.run_at(index);
        if (!h.run.value) {
            map_.store(index, index + 1, 1);
            count_++;
            gen_++;
            h.run = map_.run_at(index);
        }
        h.gen = gen_;
    }
    /// Does the set hold every index of [start, end)?  Asks the map only when @h's run
    /// does not hold @start (and leaves it there): a loop of inserts that it answers
    /// true for would change nothing.
    bool holds(uint64_t start, uint64_t end, Hint &h) const
    {
        if (h.gen != gen_ || start < h.run.start || start >= h.run.end) {
            h.run = map_.run_at(start);
            h.gen = gen_;
        }
        return h.run.value && end <= h.run.end;
    }
    /// Positions are indexes, so that erase(lower_bound(a), lower_bound(b)) erases [a, b)
    /// as with a std::set.
    uint64_t lower_bound(uint64_t index) const { return index; }
    /// Erase the indexes of [start, end).
    void erase(uint64_t start, uint64_t end)
    {
        if (start >= end || !count_)
            return;
        uint64_t n = count(start, end);
        if (!n)
            return;
        map_.store(start, end, 0);
        count_ -= n;
        gen_++;
    }
    void clear() { erase(0, nr_pages_); }
    /// How many indexes of [start, end) are in the set.
    uint64_t count(uint64_t start, uint64_t end) const
    {
        uint64_t n = 0;
        if (count_)
            map_.for_each_run(start, end, [&](uint64_t a, uint64_t b, uint64_t v) {
                n += v ? b - a : 0;
            });
        return n;
    }
    /// fn(index) for each index in the set, in order.
    template <class Fn>
    void for_each(Fn &&fn) const
    {
        if (count_)
            map_.for_each_run(0, nr_pages_, [&](uint64_t a, uint64_t b, uint64_t v) {
                for (uint64_t i = a; v && i < b; i++)
                    fn(i);
            });
    }

private:
    IntervalMap map_;
    uint64_t nr_pages_, count_ = 0, gen_ = 1;
};

} // namespace gmem
