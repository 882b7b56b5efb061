// SPDX-License-Identifier: MIT
// pfn_check.hpp - exhaustive validation of the clamped PFN-range walk on small files.
//
// Every layout of naturally aligned folios (and holes) in a file of 2**k pages, for
// k = 0 .. size_order, and every range [start, end) in it: the walk's ranges must equal
// the ranges rebuilt page by page from lookups (a different code path), be non-empty,
// lie inside their folio, and the batched walk must agree.  Smaller files go first, so
// the first failure found is a smallest one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "folio_cache.hpp"

namespace gmem {

struct PfnCheckReport {
    uint64_t files = 0, layouts = 0, ranges = 0;
    bool ok = true;
    // The first failure: the layout, the range, what was expected and what was emitted.
    std::vector<Folio> layout;
    uint64_t start = 0, end = 0;
    std::vector<PfnRange> expected, emitted;
    std::string what;
};

/// Every layout of aligned folios (orders 0..k) and order-0 holes in [base, base + 2**k).
void enumerate_layouts(uint64_t base, unsigned order, std::vector<std::vector<Folio>> &out);

/// Check every layout of every file of up to 2**size_order pages (size_order <= 4).
PfnCheckReport check_pfn_exhaustive(unsigned size_order);

/// The expected walk of @cache over [start, end), rebuilt from per-page lookups.
std::vector<PfnRange> ranges_from_pages(const FolioCache &cache, uint64_t start, uint64_t end);

} // namespace gmem
