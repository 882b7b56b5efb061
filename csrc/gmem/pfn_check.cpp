// SPDX-License-Identifier: MIT
// pfn_check.cpp - the exhaustive PFN-walk check behind `gmem check-pfn` and the native test.
#include "pfn_check.hpp"

#include "errors.hpp"

namespace gmem {

void enumerate_layouts(uint64_t base, unsigned order, std::vector<std::vector<Folio>> &out)
{
    out.push_back({Folio{base, 0, order, false}});
    if (order == 0) {
        out.push_back({});
        return;
    }
    std::vector<std::vector<Folio>> lo, hi;
    enumerate_layouts(base, order - 1, lo);
    enumerate_layouts(base + (uint64_t(1) << (order - 1)), order - 1, hi);
    for (const auto &h : hi)
        for (const auto &l : lo) {
            std::vector<Folio> v = l;
            v.insert(v.end(), h.begin(), h.end());
            out.push_back(std::move(v));
        }
}

std::vector<PfnRange> ranges_from_pages(const FolioCache &cache, uint64_t start, uint64_t end)
{
    std::vector<PfnRange> out;
    uint64_t current = NO_PFN; // index of the folio the last range came from
    for (uint64_t i = start; i < end; i++) {
        Folio f;
        if (!cache.lookup(i, &f))
            continue;
        uint64_t pfn = f.pfn + (i - f.index);
        if (f.index == current)
            out.back().end_pfn = pfn + 1;
        else
            out.push_back(PfnRange{pfn, pfn + 1});
        current = f.index;
    }
    return out;
}

static bool same(const std::vector<PfnRange> &a, const PfnRange *b, size_t n)
{
    if (a.size() != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (a[i].start_pfn != b[i].start_pfn || a[i].end_pfn != b[i].end_pfn)
            return false;
    return true;
}

PfnCheckReport check_pfn_exhaustive(unsigned size_order)
{
    if (size_order > 4)
        throw invalid("size_order", "must be <= 4 (a 16-page file: 458,330 layouts), got " +
                                        std::to_string(size_order));
    PfnCheckReport rep;
    for (unsigned k = 0; k <= size_order; k++) {
        const uint64_t size = uint64_t(1) << k;
        std::vector<std::vector<Folio>> all;
        enumerate_layouts(0, k, all);
        std::vector<PfnRange> emitted(size), batched;
        rep.files++;
        for (auto &layout : all) {
            FolioCache c;
            for (Folio &f : layout) {
                f.pfn = 4 * size - f.index - f.nr_pages(); // mirrored: index and PFN order differ
                c.add(f.index, f.order, f.pfn);
            }
            rep.layouts++;
            for (uint64_t start = 0; start <= size; start++) {
                for (uint64_t end = start; end <= size; end++) {
                    rep.ranges++;
                    size_t n = c.pfn_ranges(start, end, emitted.data());
                    std::vector<PfnRange> want = ranges_from_pages(c, start, end);
                    batched.clear();
                    c.walk_batches(start, end, [&](const Folio *, const PfnRange *r, unsigned m) {
                        batched.insert(batched.end(), r, r + m);
                    });
                    const char *what = nullptr;
                    if (!same(want, emitted.data(), n))
                        what = "pfn_ranges differs from the ranges rebuilt page by page";
                    else if (!same(want, batched.data(), batched.size()))
                        what = "the batched walk differs from pfn_ranges";
                    if (!what)
                        continue;
                    rep.ok = false;
                    rep.layout = layout;
                    rep.start = start;
                    rep.end = end;
                    rep.expected = want;
                    rep.emitted.assign(emitted.begin(), emitted.begin() + n);
                    rep.what = what;
                    return rep;
                }
            }
        }
    }
    return rep;
}

} // namespace gmem
