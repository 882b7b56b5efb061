// SPDX-License-Identifier: MIT
// folio_cache.cpp - FolioCache insert/remove/split and the PFN-range walk.
#include "folio_cache.hpp"

#include <algorithm>
#include <sstream>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GMEM_HAVE_AVX2_PATH 1
#endif

#include "errors.hpp"

namespace gmem {

static std::string folio_str(uint64_t index, unsigned order, uint64_t pfn)
{
    return "folio(index=" + std::to_string(index) + ", order=" + std::to_string(order) +
           ", pfn=" + std::to_string(pfn) + ")";
}

FolioCache::Tree::Pos FolioCache::first_overlapping(uint64_t start) const
{
    auto p = tree_.floor(start);
    if (p == tree_.end())
        return tree_.lower_bound(start);
    Folio f = unpack(tree_.key(p), tree_.val(p));
    return f.end() > start ? p : tree_.next(p);
}

void FolioCache::check_new(uint64_t index, unsigned order, uint64_t pfn) const
{
    if (order > MAX_ORDER)
        throw invalid("order", "must be in 0..18, got " + std::to_string(order));
    uint64_t nr = uint64_t(1) << order;
    if (index & (nr - 1))
        throw invalid("index", "must be a multiple of 2**order = " + std::to_string(nr) +
                                   " (folios are naturally aligned), got " +
                                   std::to_string(index));
    if (index > ~uint64_t(0) - nr)
        throw invalid("index", "folio would end past 2**64 - 1, got " + std::to_string(index));
    if (pfn & (nr - 1))
        throw invalid("pfn", "must be a multiple of 2**order = " + std::to_string(nr) +
                                 " (folios are naturally aligned), got " +
                                 std::to_string(pfn));
    if (pfn >= PFN_LIMIT || nr > PFN_LIMIT - pfn)
        throw invalid("pfn", "must be below 2**52, got " + std::to_string(pfn));
    auto p = first_overlapping(index);
    if (p != tree_.end() && tree_.key(p) < index + nr) {
        Folio f = unpack(tree_.key(p), tree_.val(p));
        throw invalid("index", "pages [" + std::to_string(index) + ", " +
                                   std::to_string(index + nr) + ") overlap " +
                                   folio_str(f.index, f.order, f.pfn));
    }
}

void FolioCache::add(uint64_t index, unsigned order, uint64_t pfn, bool uptodate)
{
    check_new(index, order, pfn);
    tree_.insert(index, pack(pfn, order, uptodate));
    nr_pages_ += uint64_t(1) << order;
}

void FolioCache::add_many(const uint64_t *index, const uint64_t *order, const uint64_t *pfn,
                          size_t n)
{
    check_folio_layout(index, order, pfn, n);
    for (size_t i = 0; i < n; i++) {
        try {
            check_new(index[i], unsigned(order[i]), pfn[i]);
        } catch (const InvalidArgument &e) {
            throw InvalidArgument(std::string(e.what()) + " (folio " + std::to_string(i) + ")");
        }
    }
    for (size_t i = 0; i < n; i++) {
        tree_.insert(index[i], pack(pfn[i], unsigned(order[i]), false));
        nr_pages_ += uint64_t(1) << order[i];
    }
}

bool FolioCache::lookup(uint64_t index, Folio *out) const
{
    auto p = tree_.floor(index);
    if (p == tree_.end())
        return false;
    Folio f = unpack(tree_.key(p), tree_.val(p));
    if (f.end() <= index)
        return false;
    *out = f;
    return true;
}

Folio FolioCache::remove(uint64_t index)
{
    Folio f;
    if (!lookup(index, &f) || f.index != index)
        throw invalid("index", "no folio starts at index " + std::to_string(index));
    tree_.erase(index);
    nr_pages_ -= f.nr_pages();
    return f;
}

void FolioCache::remove_consecutive(const Folio *folios, size_t n)
{
    if (!n)
        return;
    tree_.erase_range(folios[0].index, folios[n - 1].index + 1); // one search per leaf
    for (size_t i = 0; i < n; i++)
        nr_pages_ -= folios[i].nr_pages();
}

void FolioCache::set_uptodate(uint64_t index, bool uptodate)
{
    auto p = tree_.floor(index);
    Folio f;
    if (!lookup(index, &f))
        throw invalid("index", "no folio covers index " + std::to_string(index));
    tree_.set_val(p, pack(f.pfn, f.order, uptodate));
}

void FolioCache::split(uint64_t index, unsigned new_order)
{
    Folio f;
    if (!lookup(index, &f))
        throw invalid("index", "no folio covers index " + std::to_string(index));
    if (new_order >= f.order)
        throw invalid("new_order", "must be below the folio's order " +
                                       std::to_string(f.order) + ", got " +
                                       std::to_string(new_order));
    tree_.erase(f.index);
    uint64_t step = uint64_t(1) << new_order;
    for (uint64_t off = 0; off < f.nr_pages(); off += step)
        tree_.insert(f.index + off, pack(f.pfn + off, new_order, f.uptodate));
}

void FolioCache::split_to_pages(uint64_t index)
{
    Folio f;
    if (!lookup(index, &f) || f.index != index)
        throw invalid("index", "no folio starts at index " + std::to_string(index));
    // The first page keeps the folio's slot, so undoing needs no allocation.
    tree_.set_val(tree_.floor(index), pack(f.pfn, 0, f.uptodate));
    uint64_t off = 1;
    try {
        for (; off < f.nr_pages(); off++)
            tree_.insert(f.index + off, pack(f.pfn + off, 0, f.uptodate));
    } catch (...) {
        tree_.erase_range(f.index + 1, f.index + off);
        tree_.set_val(tree_.floor(index), pack(f.pfn, f.order, f.uptodate));
        throw;
    }
}

void FolioCache::merge(uint64_t index, unsigned order, bool uptodate)
{
    auto p = tree_.floor(index);
    Folio first = unpack(tree_.key(p), tree_.val(p));
    tree_.set_val(p, pack(first.pfn, order, uptodate));
    tree_.erase_range(index + 1, index + (uint64_t(1) << order));
}

/* Replace @f by the largest aligned pieces that cross neither @cut1 nor @cut2. */
void FolioCache::split_at(const Folio &f, uint64_t cut1, uint64_t cut2)
{
    tree_.erase(f.index);
    uint64_t from = f.index;
    const uint64_t bounds[] = {cut1, cut2, f.end()};
    for (uint64_t to : bounds) {
        if (to <= from || to > f.end())
            continue;
        while (from < to) {
            unsigned o = 0;
            while (o < f.order && (from & (uint64_t(1) << o)) == 0 &&
                   from + (uint64_t(2) << o) <= to)
                o++;
            tree_.insert(from, pack(f.file_pfn(from), o, f.uptodate));
            from += uint64_t(1) << o;
        }
    }
}

size_t FolioCache::split_range(uint64_t start, uint64_t end)
{
    if (start >= end)
        return 0;
    size_t split = 0;
    Folio f;
    if (lookup(start, &f) && f.index < start) {
        split_at(f, start, end);
        split++;
    }
    if (lookup(end - 1, &f) && f.end() > end) {
        split_at(f, start, end);
        split++;
    }
    return split;
}

size_t FolioCache::count(uint64_t start, uint64_t end) const
{
    if (start >= end)
        return 0;
    size_t n = 0;
    auto p = first_overlapping(start);
    if (p == tree_.end())
        return 0;
    // Whole leaves in between count without looking at their folios.
    auto last = tree_.lower_bound(end);
    uint32_t s = p.slot;
    for (const Tree::Leaf *l = p.leaf; l != last.leaf; l = Tree::next_leaf(l), s = 0)
        n += Tree::leaf_size(l) - s;
    return n + last.slot - s;
}

size_t FolioCache::folios(uint64_t start, uint64_t end, Folio *out, size_t cap) const
{
    size_t n = 0;
    if (start >= end)
        return 0;
    for (auto p = first_overlapping(start); p != tree_.end() && n < cap; p = tree_.next(p)) {
        if (tree_.key(p) >= end)
            break;
        out[n++] = unpack(tree_.key(p), tree_.val(p));
    }
    return n;
}

std::vector<Folio> FolioCache::folios(uint64_t start, uint64_t end) const
{
    std::vector<Folio> v(count(start, end));
    v.resize(folios(start, end, v.data(), v.size()));
    return v;
}

size_t FolioCache::pfn_ranges(uint64_t start, uint64_t end, PfnRange *out) const
{
    size_t n = 0;
    for_each_clamped(start, end, [&](const Folio &, const PfnRange &r) { out[n++] = r; });
    return n;
}

void FolioCache::page_pfns(uint64_t start, uint64_t end, uint64_t *out) const
{
    if (start >= end)
        return;
    std::fill(out, out + (end - start), NO_PFN);
    walk_batches(start, end, [&](const Folio *fs, const PfnRange *rs, unsigned n) {
        for (unsigned i = 0; i < n; i++) {
            uint64_t first = fs[i].index > start ? fs[i].index : start;
            for (uint64_t pfn = rs[i].start_pfn; pfn < rs[i].end_pfn; pfn++)
                out[first - start + (pfn - rs[i].start_pfn)] = pfn;
        }
    });
}

std::string FolioCache::dump() const
{
    std::ostringstream os;
    os << "FolioCache(folios=" << nr_folios() << ", pages=" << nr_pages_ << ")";
    size_t shown = 0;
    for (auto p = tree_.begin(); !tree_.empty() && p != tree_.end(); p = tree_.next(p)) {
        if (shown++ == 64) {
            os << "\n  ...";
            break;
        }
        Folio f = unpack(tree_.key(p), tree_.val(p));
        os << "\n  [" << f.index << ", " << f.end() << ") order " << f.order << " pfn "
           << f.pfn << (f.uptodate ? " uptodate" : "");
    }
    return os.str();
}

/* Why folio @i of a layout is wrong (throws), given the folio before it was right. */
static void check_layout_folio(const uint64_t *index, const uint64_t *order, const uint64_t *pfn,
                               size_t i)
{
    auto bad = [&](const char *arg, const std::string &why) {
        return invalid(arg, "folio " + std::to_string(i) + " " +
                                folio_str(index[i], unsigned(order[i] > 99 ? 99 : order[i]),
                                          pfn[i]) +
                                ": " + why);
    };
    if (order[i] > MAX_ORDER)
        throw bad("order", "order must be in 0..18");
    uint64_t nr = uint64_t(1) << order[i];
    if (index[i] & (nr - 1))
        throw bad("index", "index is not a multiple of 2**order");
    if (index[i] > ~uint64_t(0) - nr)
        throw bad("index", "folio ends past 2**64 - 1");
    if (pfn[i] & (nr - 1))
        throw bad("pfn", "pfn is not a multiple of 2**order");
    if (pfn[i] > ~uint64_t(0) - nr)
        throw bad("pfn", "PFN range ends past 2**64 - 1");
    if (i > 0) {
        uint64_t prev_end = index[i - 1] + (uint64_t(1) << order[i - 1]);
        if (index[i] < index[i - 1])
            throw bad("index", "not sorted: index below the previous folio's " +
                                   std::to_string(index[i - 1]));
        if (index[i] < prev_end)
            throw bad("index", "overlaps the previous folio, which ends at " +
                                   std::to_string(prev_end));
    }
}

static inline bool layout_folio_ok(const uint64_t *index, const uint64_t *order,
                                   const uint64_t *pfn, size_t i)
{
    if (order[i] > MAX_ORDER)
        return false;
    uint64_t nr = uint64_t(1) << order[i];
    return !((index[i] | pfn[i]) & (nr - 1)) && index[i] <= ~uint64_t(0) - nr &&
           pfn[i] <= ~uint64_t(0) - nr &&
           (i == 0 || index[i] >= index[i - 1] + (uint64_t(1) << order[i - 1]));
}

void check_folio_layout(const uint64_t *index, const uint64_t *order, const uint64_t *pfn,
                        size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!layout_folio_ok(index, order, pfn, i))
            check_layout_folio(index, order, pfn, i);
}

size_t count_clamped(const uint64_t *index, const uint64_t *order, size_t n, uint64_t start,
                     uint64_t end, size_t *first)
{
    // Sorted and disjoint, so folio ends increase too: binary search both edges.
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        // Not validated yet: an order past 18 must not make the shift undefined.
        if (index[mid] + (uint64_t(1) << (order[mid] & 63)) <= start)
            lo = mid + 1;
        else
            hi = mid;
    }
    *first = lo;
    size_t last = size_t(std::lower_bound(index + lo, index + n, end) - index);
    return start < end ? last - lo : 0;
}

#ifdef GMEM_HAVE_AVX2_PATH
/*
 * check_write_avx2 - clamp_folio_ranges' loop four folios at a time, for folios
 * [from, to) (from >= 1, to - from a multiple of 4): each folio's checks against itself
 * and the folio before it, and its unclamped range written to out[i - first].  Returns
 * whether any folio needs the exact check.  Compares are signed, which is exact for the
 * values that pass: anything at or above 2**62 is flagged by its own lane.
 */
__attribute__((target("avx2"))) static inline __m256i load4(const uint64_t *p)
{
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
}

__attribute__((target("avx2"))) static bool check_write_avx2(const uint64_t *index,
                                                             const uint64_t *order,
                                                             const uint64_t *pfn, size_t from,
                                                             size_t to, PfnRange *out,
                                                             size_t first)
{
    const __m256i one = _mm256_set1_epi64x(1), low5 = _mm256_set1_epi64x(31);
    const __m256i max_order = _mm256_set1_epi64x(MAX_ORDER);
    __m256i bad = _mm256_setzero_si256();
    for (size_t i = from; i < to; i += 4) {
        __m256i o = load4(order + i), idx = load4(index + i), p = load4(pfn + i);
        __m256i nr = _mm256_sllv_epi64(one, _mm256_and_si256(o, low5));
        __m256i t = _mm256_or_si256(idx, p);
        __m256i prev_nr = _mm256_sllv_epi64(one, _mm256_and_si256(load4(order + i - 1), low5));
        __m256i prev_end = _mm256_add_epi64(load4(index + i - 1), prev_nr);
        bad = _mm256_or_si256(bad, _mm256_and_si256(t, _mm256_sub_epi64(nr, one)));
        bad = _mm256_or_si256(bad, _mm256_srli_epi64(t, 62));
        bad = _mm256_or_si256(bad, _mm256_srli_epi64(o, 5)); // order >= 32
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi64(o, max_order));
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi64(prev_end, idx)); // overlap, unsorted
        __m256i e = _mm256_add_epi64(p, nr);
        __m256i lo = _mm256_unpacklo_epi64(p, e), hi = _mm256_unpackhi_epi64(p, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + (i - first)),
                            _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + (i - first) + 2),
                            _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    return !_mm256_testz_si256(bad, bad);
}

static const bool have_avx2 = __builtin_cpu_supports("avx2");
#endif

void clamp_folio_ranges(const uint64_t *index, const uint64_t *order, const uint64_t *pfn,
                        size_t n, size_t first, size_t count, uint64_t start, uint64_t end,
                        PfnRange *out)
{
    // One pass over the layout, a block at a time: every check of a folio is folded into
    // one flag with no branch per folio, and the folios of [first, first + count) are
    // written unclamped in the same loop.  A flagged block (a bad folio, or values near
    // 2**64 that need the overflow checks) is checked exactly, which throws naming the
    // folio when it really is wrong; then the two edge folios are clamped.
    constexpr size_t BLOCK = 512;
    uint64_t prev_end = 0;
    for (size_t b = 0; b < n; b += BLOCK) {
        size_t e = std::min(n, b + BLOCK);
        size_t lo = std::min(std::max(b, first), e), hi = std::max(std::min(e, first + count), lo);
        uint64_t bad = 0;
        auto check = [&](size_t i) {
            uint64_t o = order[i], idx = index[i], p = pfn[i], t = idx | p;
            uint64_t nr = uint64_t(1) << (o & 31);
            bad |= uint64_t(o > MAX_ORDER) | (t & (nr - 1)) | (t >> 62) |
                   uint64_t(idx < prev_end);
            prev_end = idx + nr;
            return PfnRange{p, p + nr};
        };
        for (size_t i = b; i < lo; i++)
            check(i);
        size_t i = lo;
#ifdef GMEM_HAVE_AVX2_PATH
        if (i == 0 && i < hi) // the vector loop reads the folio before
            out[i - first] = check(i), i++;
        if (have_avx2 && i >= 1 && hi - i >= 4) {
            size_t k = i + (hi - i) / 4 * 4;
            bad |= check_write_avx2(index, order, pfn, i, k, out, first);
            i = k;
            prev_end = index[i - 1] + (uint64_t(1) << (order[i - 1] & 31));
        }
#endif
        for (; i < hi; i++)
            out[i - first] = check(i);
        for (size_t i = hi; i < e; i++)
            check(i);
        if (bad)
            for (size_t i = b; i < e; i++)
                if (!layout_folio_ok(index, order, pfn, i))
                    check_layout_folio(index, order, pfn, i);
    }
    for (size_t i : {first, first + count - 1}) { // the edges, once the layout is valid
        if (!count)
            break;
        uint64_t idx = index[i], nr = uint64_t(1) << order[i];
        uint64_t si = idx > start ? idx : start, ei = idx + nr < end ? idx + nr : end;
        uint64_t sp = pfn[i] + (si - idx);
        out[i - first] = PfnRange{sp, sp + (ei - si)};
    }
}

} // namespace gmem
