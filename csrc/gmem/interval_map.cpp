// SPDX-License-Identifier: MIT
// interval_map.cpp - IntervalMap store/load/runs over the U64Tree of run starts.
#include "interval_map.hpp"

#include <sstream>

#include "errors.hpp"

namespace gmem {

IntervalMap::IntervalMap(uint64_t nr_pages, uint64_t value) : nr_pages_(nr_pages)
{
    if (nr_pages == 0)
        throw invalid("nr_pages", "must be at least 1");
    tree_.insert(0, value);
}

void IntervalMap::check_index(uint64_t index) const
{
    if (index >= nr_pages_)
        throw invalid("index", "must be < nr_pages (" + std::to_string(nr_pages_) + "), got " +
                                   std::to_string(index));
}

void IntervalMap::check_range(uint64_t start, uint64_t end, bool allow_empty) const
{
    if (end > nr_pages_)
        throw invalid("end", "must be <= nr_pages (" + std::to_string(nr_pages_) + "), got " +
                                 std::to_string(end));
    if (start > end || (!allow_empty && start == end))
        throw invalid("start", std::string("must be ") + (allow_empty ? "<=" : "<") +
                                   " end, got start=" + std::to_string(start) +
                                   " end=" + std::to_string(end));
}

uint64_t IntervalMap::load(uint64_t index) const
{
    check_index(index);
    return tree_.val(tree_.floor(index));
}

Run IntervalMap::run_at(uint64_t index) const
{
    check_index(index);
    auto p = tree_.floor(index);
    auto nx = tree_.next(p);
    return Run{tree_.key(p), nx == tree_.end() ? nr_pages_ : tree_.key(nx), tree_.val(p)};
}

/*
 * store_unchecked - set [start, end) to @value; the range is already validated.
 *
 * Every run boundary inside [start, end] goes; then a boundary is put back at @start
 * unless the run before already holds @value, and at @end unless the run after does.
 * The tree is searched once: the run before is the entry before the span, the run
 * holding @end is the last entry of the span or, when the span is empty, that same one.
 */
void IntervalMap::store_unchecked(uint64_t start, uint64_t end, uint64_t value)
{
    auto sp = tree_.span(start, end);
    uint64_t keys[2], vals[2];
    unsigned k = 0;
    if (start == 0 || tree_.val(tree_.prev(sp.a)) != value) {
        keys[k] = start;
        vals[k++] = value;
    }
    if (end < nr_pages_) {
        uint64_t after = tree_.val(tree_.prev(sp.b)); // last boundary <= end
        if (after != value) {
            keys[k] = end;
            vals[k++] = after;
        }
    }
    tree_.replace(sp, start, end, keys, vals, k);
}

void IntervalMap::store(uint64_t start, uint64_t end, uint64_t value)
{
    check_range(start, end, false);
    store_unchecked(start, end, value);
}

void IntervalMap::store_many(const uint64_t *starts, const uint64_t *ends,
                             const uint64_t *values, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        try {
            check_range(starts[i], ends[i], false);
        } catch (const InvalidArgument &e) {
            throw InvalidArgument(std::string(e.what()) + " (row " + std::to_string(i) + ")");
        }
    }
    for (size_t i = 0; i < n; i++)
        store_unchecked(starts[i], ends[i], values[i]);
}

bool IntervalMap::range_has(uint64_t start, uint64_t end, uint64_t value) const
{
    check_range(start, end, true);
    if (start == end)
        return true;
    auto p = tree_.floor(start);
    if (tree_.val(p) != value)
        return false;
    auto n = tree_.next(p);
    return n == tree_.end() || tree_.key(n) >= end;
}

size_t IntervalMap::count_runs(uint64_t start, uint64_t end) const
{
    check_range(start, end, true);
    if (start == end)
        return 0;
    size_t count = 0;
    for (auto p = tree_.floor(start); p != tree_.end() && tree_.key(p) < end; p = tree_.next(p))
        count++;
    return count;
}

size_t IntervalMap::runs(uint64_t start, uint64_t end, Run *out, size_t cap) const
{
    check_range(start, end, true);
    if (start == end)
        return 0;
    size_t n = 0;
    for (auto p = tree_.floor(start); p != tree_.end() && n < cap;) {
        uint64_t k = tree_.key(p);
        if (k >= end)
            break;
        auto nx = tree_.next(p);
        uint64_t run_end = nx == tree_.end() ? nr_pages_ : tree_.key(nx);
        out[n++] = Run{k < start ? start : k, run_end < end ? run_end : end, tree_.val(p)};
        p = nx;
    }
    return n;
}

std::vector<Run> IntervalMap::runs(uint64_t start, uint64_t end) const
{
    std::vector<Run> v(count_runs(start, end));
    v.resize(runs(start, end, v.data(), v.size()));
    return v;
}

std::string IntervalMap::dump() const
{
    std::ostringstream os;
    os << "IntervalMap(nr_pages=" << nr_pages_ << ", runs=" << nr_runs() << ")";
    size_t shown = 0;
    for (const Run &r : runs(0, nr_pages_)) {
        if (shown++ == 64) {
            os << "\n  ...";
            break;
        }
        os << "\n  [" << r.start << ", " << r.end << ") = " << hex(r.value);
    }
    return os.str();
}

} // namespace gmem
