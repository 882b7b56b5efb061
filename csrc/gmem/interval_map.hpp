// SPDX-License-Identifier: MIT
// interval_map.hpp - IntervalMap: a value for every index of [0, nr_pages), stored as runs.
//
// DOC: IntervalMap
//
// The model of guest_memfd's attribute maple tree.  Every index has a value; equal
// neighbours are always merged, so the map is a sequence of runs:
//
//     index:  0        4096           9000        nr_pages
//             [ SHARED  )[   PRIVATE    )[ SHARED    )
//     stored:  key 0 -> 0, key 4096 -> 8, key 9000 -> 0
//
// Only the start of each run is stored (in a U64Tree); a run ends where the next begins.
// The map always holds a run at key 0 and never two adjacent runs of one value.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lockable.hpp"
#include "u64tree.hpp"

namespace gmem {

struct Run {
    uint64_t start, end, value;
    bool operator==(const Run &o) const
    {
        return start == o.start && end == o.end && value == o.value;
    }
    bool operator!=(const Run &o) const { return !(*this == o); }
};

class IntervalMap : public Lockable {
public:
    explicit IntervalMap(uint64_t nr_pages, uint64_t value = 0);

    uint64_t nr_pages() const { return nr_pages_; }
    size_t nr_runs() const { return tree_.size(); }

    /// Set [start, end) to @value, merging with equal neighbours.  0 <= start < end <= nr_pages.
    void store(uint64_t start, uint64_t end, uint64_t value);
    /// Apply stores in order; every range is validated before the first one is applied.
    void store_many(const uint64_t *starts, const uint64_t *ends, const uint64_t *values,
                    size_t n);
    /// Make the next @n stores allocation-free (each adds at most two runs).
    void reserve_stores(size_t n) { tree_.reserve(2 * n); }
    uint64_t load(uint64_t index) const;
    /// The whole run that holds @index (not clipped): a caller that asks about many indexes
    /// nearby answers most of them from it.  Runs are maximal, so a range lies in one value
    /// exactly when it lies inside one run.
    Run run_at(uint64_t index) const;
    /// Does every index of [start, end) hold @value?  (true for an empty range)
    bool range_has(uint64_t start, uint64_t end, uint64_t value) const;
    /// Number of runs overlapping [start, end), and those runs clipped to it.
    size_t count_runs(uint64_t start, uint64_t end) const;
    size_t runs(uint64_t start, uint64_t end, Run *out, size_t cap) const;
    std::vector<Run> runs(uint64_t start, uint64_t end) const;

    /// Call fn(start, end, value) for each run overlapping [start, end), clipped to it; no
    /// allocation, no validation (for callers that validated).  fn must not change the map.
    template <class Fn>
    void for_each_run(uint64_t start, uint64_t end, Fn &&fn) const
    {
        if (start >= end)
            return;
        for (auto p = tree_.floor(start); p != tree_.end();) {
            uint64_t k = tree_.key(p);
            if (k >= end)
                break;
            auto nx = tree_.next(p);
            uint64_t run_end = nx == tree_.end() ? nr_pages_ : tree_.key(nx);
            fn(k < start ? start : k, run_end < end ? run_end : end, tree_.val(p));
            p = nx;
        }
    }

    size_t memory_bytes() const { return tree_.memory_bytes(); }
    std::string dump() const;

    /// Argument checks shared with callers that validate before they act.
    void check_range(uint64_t start, uint64_t end, bool allow_empty) const;
    void check_index(uint64_t index) const;

private:
    uint64_t nr_pages_;
    U64Tree<> tree_;

    void store_unchecked(uint64_t start, uint64_t end, uint64_t value);
};

} // namespace gmem
