// SPDX-License-Identifier: MIT
// test_core.cpp - the C++ core tested natively (and under ASan/UBSan), no Python involved.
//
// One check_<feature>() per behaviour, in the style of lib/test_xarray.c: each compares the
// core against a naive model and, on a mismatch, prints the whole structure and exits 1.
// Usage: test_core [pages]   (pages: size of the exhaustive PFN-walk file, default 16)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gmem/arch.hpp"
#include "gmem/content_map.hpp"
#include "gmem/errors.hpp"
#include "gmem/guest_memfd.hpp"
#include "gmem/folio_cache.hpp"
#include "gmem/interval_map.hpp"
#include "gmem/page_set.hpp"
#include "gmem/pfn_check.hpp"
#include "gmem/physmem.hpp"
#include "gmem/u64tree.hpp"

using namespace gmem;

static unsigned long nr_checks;

#define CHECK(cond, dump)                                                                      \
    do {                                                                                       \
        nr_checks++;                                                                           \
        if (!(cond)) {                                                                         \
            std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n%s\n", __FILE__, __LINE__, #cond,    \
                         (dump).c_str());                                                      \
            std::exit(1);                                                                      \
        }                                                                                      \
    } while (0)

static uint64_t rng_state = 42;
static uint64_t rnd(uint64_t n) { return SplitMix64{rng_state++}.next() % n; }

/*
 * check_pfn_walk_exhaustive - every layout of a @size-page file and every [start, end):
 * the clamped ranges are non-empty, each inside its folio, and expand to exactly the PFNs
 * page_pfns() reports for the populated pages; the batched walk agrees.
 */
static void check_pfn_walk_exhaustive(unsigned size_order)
{
    const uint64_t size = uint64_t(1) << size_order;
    std::vector<std::vector<Folio>> all;
    enumerate_layouts(0, size_order, all);
    std::vector<PfnRange> ranges(size);
    std::vector<uint64_t> pages(size);
    for (auto &layout : all) {
        FolioCache c;
        for (Folio &f : layout) {
            f.pfn = 4 * size - f.index - f.nr_pages(); // mirrored: index and PFN order differ
            c.add(f.index, f.order, f.pfn);
        }
        for (uint64_t start = 0; start <= size; start++) {
            for (uint64_t end = start; end <= size; end++) {
                size_t n = c.pfn_ranges(start, end, ranges.data());
                CHECK(n == c.count(start, end), c.dump());
                c.page_pfns(start, end, pages.data());
                size_t page = 0;
                for (size_t i = 0; i < n; i++) {
                    Folio f;
                    CHECK(ranges[i].start_pfn < ranges[i].end_pfn, c.dump());
                    while (page < end - start && pages[page] == NO_PFN)
                        page++;
                    CHECK(c.lookup(start + page, &f), c.dump());
                    CHECK(ranges[i].start_pfn >= f.pfn &&
                              ranges[i].end_pfn <= f.pfn + f.nr_pages(),
                          c.dump());
                    for (uint64_t pfn = ranges[i].start_pfn; pfn < ranges[i].end_pfn; pfn++)
                        CHECK(page < end - start && pages[page++] == pfn, c.dump());
                }
                while (page < end - start)
                    CHECK(pages[page++] == NO_PFN, c.dump());
                size_t batched = 0;
                c.walk_batches(start, end, [&](const Folio *, const PfnRange *r, unsigned k) {
                    CHECK(k <= FOLIO_BATCH_SIZE, c.dump());
                    for (unsigned j = 0; j < k; j++, batched++)
                        CHECK(r[j].start_pfn == ranges[batched].start_pfn &&
                                  r[j].end_pfn == ranges[batched].end_pfn,
                              c.dump());
                });
                CHECK(batched == n, c.dump());
            }
        }
    }
    std::printf("check_pfn_walk_exhaustive: %zu layouts of %llu pages, every range\n",
                all.size(), (unsigned long long)size);
}

/*
 * check_u64tree - random inserts, erases, range erases and replaces on trees of tiny nodes
 * (many levels, many splits and merges) against std::map: every search, a walk both ways
 * and the leaf chain agree after each step; n inserts after reserve(n) allocate nothing.
 */
template <unsigned L, unsigned I>
static void check_u64tree_shape(uint64_t key_space, int steps, unsigned shift = 0)
{
    // Keys are multiples of 2**shift: from 2**29 on, leaves hold keys too far apart for
    // one 32-bit base and split by span rather than by count.
    using Tree = U64Tree<L, I>;
    Tree t;
    std::map<uint64_t, uint64_t> ref;
    auto dump = [&]() {
        std::string s = "U64Tree<" + std::to_string(L) + "," + std::to_string(I) +
                        "> size " + std::to_string(t.size()) + " vs " +
                        std::to_string(ref.size()) + ":";
        for (auto p = t.begin(); p != t.end(); p = t.next(p))
            s += " " + std::to_string(t.key(p));
        return s;
    };
    auto agree = [&](uint64_t k) {
        auto lb = ref.lower_bound(k);
        auto p = t.lower_bound(k);
        CHECK(lb == ref.end() ? p == t.end() : p != t.end() && t.key(p) == lb->first, dump());
        auto ub = ref.upper_bound(k);
        p = t.upper_bound(k);
        CHECK(ub == ref.end() ? p == t.end() : p != t.end() && t.key(p) == ub->first, dump());
        p = t.floor(k);
        if (ub == ref.begin()) {
            CHECK(p == t.end(), dump());
        } else {
            CHECK(p != t.end() && t.key(p) == std::prev(ub)->first &&
                      t.val(p) == std::prev(ub)->second,
                  dump());
            if (ub != ref.end())
                CHECK(t.prev(t.upper_bound(k)) == p, dump());
        }
    };
    for (int step = 0; step < steps; step++) {
        uint64_t k = rnd(key_space) << shift, op = rnd(10);
        if (op == 1 && !ref.empty() && ref.rbegin()->first < (key_space * 2) << shift)
            k = ref.rbegin()->first + ((1 + rnd(3)) << shift); // past the last key: the tail
        else if (op == 2 && shift)
            k += rnd(3); // near another key
        if (op < 5) {
            if (!ref.count(k)) {
                size_t before = t.memory_bytes();
                bool reserved = op == 0;
                if (reserved)
                    t.reserve(1);
                size_t after_reserve = t.memory_bytes();
                t.insert(k, k * 3);
                ref[k] = k * 3;
                CHECK(!reserved || t.memory_bytes() == after_reserve, dump());
                (void)before;
            }
        } else if (op < 7) {
            t.erase(k);
            ref.erase(k);
        } else if (op < 8) {
            uint64_t e = k + (rnd(key_space / 8 + 2) << shift);
            t.erase_range(k, e);
            ref.erase(ref.lower_bound(k), ref.lower_bound(e));
        } else {
            // A store's replace: [k, hi] gives way to up to two fresh entries.
            uint64_t hi = k + (rnd(16) << (shift ? shift + rnd(4) : 0));
            auto sp = t.span(k, hi);
            uint64_t keys[2] = {k, hi}, vals[2] = {uint64_t(step), uint64_t(step) + 1};
            unsigned n = unsigned(rnd(3));
            if (n == 1 && rnd(2))
                keys[0] = hi, vals[0] = step + 1;
            if (n == 2 && k == hi)
                n = 1;
            t.replace(sp, k, hi, keys, vals, n);
            ref.erase(ref.lower_bound(k), ref.upper_bound(hi));
            for (unsigned i = 0; i < n; i++)
                ref[keys[i]] = vals[i];
        }
        CHECK(t.size() == ref.size(), dump());
        agree(rnd(key_space) << shift);
        agree(k);
        if (step % 97 == 0 || step == steps - 1) {
            auto it = ref.begin();
            size_t chained = 0;
            for (const auto *l = t.begin().leaf; l; l = Tree::next_leaf(l)) {
                CHECK(Tree::leaf_size(l) > 0, dump());
                for (uint32_t s = 0; s < Tree::leaf_size(l); s++, it++, chained++)
                    CHECK(it != ref.end() &&
                              Tree::leaf_base(l) + Tree::leaf_offs(l)[s] == it->first &&
                              Tree::leaf_vals(l)[s] == it->second,
                          dump());
            }
            CHECK(chained == ref.size(), dump());
            auto rit = ref.rbegin();
            for (auto p = t.end(); rit != ref.rend(); rit++) {
                p = t.prev(p);
                CHECK(t.key(p) == rit->first, dump());
            }
        }
    }
    // reserve(n) covers n inserts however they split, from any shape.
    for (int round = 0; round < 20; round++) {
        size_t n = 1 + rnd(200);
        t.reserve(n);
        size_t reserved = t.memory_bytes();
        for (size_t i = 0; i < n; i++) {
            uint64_t k = rnd(key_space * 4) << shift;
            if (!ref.count(k)) {
                t.insert(k, 1);
                ref[k] = 1;
            }
        }
        CHECK(t.memory_bytes() == reserved && t.size() == ref.size(), dump());
    }
    t.erase_range(0, Tree::NONE);
    CHECK(t.empty() && t.begin() == t.end(), dump());
    t.insert(Tree::NONE - 1, 5); // the largest key there can be
    CHECK(t.floor(7) == t.end() && t.key(t.floor(Tree::NONE)) == Tree::NONE - 1 &&
              t.upper_bound(Tree::NONE - 2) == t.floor(Tree::NONE - 1),
          dump());
    t.erase(Tree::NONE - 1);
    CHECK(t.empty(), dump());
}

static void check_u64tree()
{
    check_u64tree_shape<8, 8>(300, 20000);
    check_u64tree_shape<8, 8>(100000, 40000);
    check_u64tree_shape<64, 128>(1000000, 100000);
    check_u64tree_shape<16, 8>(100000, 40000); // the smallest leaf with the halved count
    check_u64tree_shape<32, 8>(100000, 40000);
    for (unsigned shift : {20u, 29u, 31u, 32u, 40u}) {
        check_u64tree_shape<8, 8>(300, 20000, shift);
        check_u64tree_shape<64, 128>(100000, 40000, shift);
    }
    // Appending in key order fills every node: 12.5 bytes per entry, inner nodes included.
    U64Tree<> t;
    for (uint64_t k = 0; k < 1000000; k++)
        t.insert(k, k);
    CHECK(t.memory_bytes() < 12.6 * 1000000, std::to_string(t.memory_bytes()));
    std::printf("check_u64tree: %zu bytes per entry appended\n", t.memory_bytes() / t.size());
}

/* check_interval_map - random stores against a flat array, with many runs. */
static void check_interval_map()
{
    const uint64_t n = 20000;
    IntervalMap m(n);
    std::vector<uint64_t> flat(n, 0);
    for (int step = 0; step < 20000; step++) {
        uint64_t s = rnd(n), len = step % 997 == 0 ? rnd(n - s) + 1 : rnd(8) + 1;
        uint64_t e = s + len > n ? n : s + len, v = rnd(3);
        m.store(s, e, v);
        for (uint64_t i = s; i < e; i++)
            flat[i] = v;
        if (step % 1000 == 0 || step == 19999) {
            size_t runs = 0;
            uint64_t expect = 0;
            for (const Run &r : m.runs(0, n)) {
                CHECK(r.start == expect && r.start < r.end, m.dump());
                for (uint64_t i = r.start; i < r.end; i++)
                    CHECK(flat[i] == r.value, m.dump());
                expect = r.end;
                runs++;
            }
            CHECK(expect == n && runs == m.nr_runs(), m.dump());
            size_t naive = 1;
            for (uint64_t i = 1; i < n; i++)
                naive += flat[i] != flat[i - 1];
            CHECK(naive == runs, m.dump());
        }
    }
    bool threw = false;
    try {
        m.store(5, 5, 1);
    } catch (const InvalidArgument &) {
        threw = true;
    }
    CHECK(threw, m.dump());
    std::printf("check_interval_map: 20000 stores, %zu runs\n", m.nr_runs());
}

/*
 * check_content_map - a ContentMap against a flat array, through every change of shape: a
 * group turning dense under single stores, range stores covering dense groups in part or
 * whole, a group left uniform going sparse; runs stay maximal and equal to the array's.
 */
static void check_content_map()
{
    const uint64_t n = 5 * ContentMap::DENSE_PAGES + 77; // the last group is partial
    ContentMap m(n, 3);
    std::vector<uint64_t> flat(n, 3);
    ContentMap::Cursor c;
    size_t most_dense = 0;
    auto compare = [&](const char *when) {
        uint64_t expect = 0;
        size_t runs = 0;
        for (const Run &r : m.runs(0, n)) {
            CHECK(r.start == expect && r.start < r.end, std::string(when));
            for (uint64_t i = r.start; i < r.end; i++)
                CHECK(flat[i] == r.value, std::string(when) + " at " + std::to_string(i));
            CHECK(r.end == n || flat[r.end] != r.value, std::string(when) + ": runs not maximal");
            expect = r.end;
            runs++;
        }
        CHECK(expect == n && runs == m.nr_runs(), std::string(when));
        for (int k = 0; k < 200; k++) {
            uint64_t i = rnd(n);
            CHECK(m.load(i) == flat[i] && m.load(i, c) == flat[i], std::string(when));
        }
        uint64_t a = rnd(n), b = a + rnd(n - a) + 1; // a clipped window merges as well
        auto w = m.runs(a, b);
        CHECK(!w.empty() && w.front().start == a && w.back().end == b, std::string(when));
    };
    for (int round = 0; round < 40; round++) {
        // Page-by-page writes over a stretch (in order, then scattered): groups turn dense.
        uint64_t s = rnd(n), len = rnd(3 * ContentMap::DENSE_PAGES) + 1;
        for (uint64_t i = s; i < std::min(n, s + len); i++) {
            uint64_t v = round % 3 == 0 ? rnd(4) : i * 7 + uint64_t(round);
            m.store_one(i, v, c);
            flat[i] = v;
        }
        for (int k = 0; k < 300; k++) {
            uint64_t i = rnd(n), v = rnd(1000);
            if (k % 2)
                m.store(i, i + 1, v);
            else
                m.store_one(i, v, c);
            flat[i] = v;
        }
        most_dense = std::max(most_dense, m.dense_groups());
        compare("after single stores");
        // Range stores: in part, whole groups, the whole map now and then.
        for (int k = 0; k < 6; k++) {
            uint64_t a = rnd(n), b = k == 5 && round % 10 == 9 ? n : a + rnd(700) + 2;
            b = std::min(b, n);
            if (a + 1 >= b)
                continue;
            uint64_t v = rnd(3);
            m.store(a, b, v);
            std::fill(flat.begin() + long(a), flat.begin() + long(b), v);
            compare("after a range store");
        }
    }
    // A dense group written uniform in part goes sparse when a range store completes it.
    for (uint64_t i = 0; i < ContentMap::DENSE_PAGES; i++) {
        m.store_one(i, i, c);
        flat[i] = i;
    }
    for (uint64_t i = 0; i < ContentMap::DENSE_PAGES; i++) {
        m.store_one(i, 5 + i % 2, c);
        flat[i] = 5 + i % 2;
    }
    size_t before = m.dense_groups();
    m.store(0, ContentMap::DENSE_PAGES, 9); // a store over the whole group drops its array
    std::fill(flat.begin(), flat.begin() + long(ContentMap::DENSE_PAGES), 9);
    compare("after a whole-group store");
    CHECK(most_dense > 0 && m.dense_groups() < before, std::to_string(before));
    m.store(0, n, 1);
    std::fill(flat.begin(), flat.end(), 1);
    compare("after clearing");
    CHECK(m.dense_groups() == 0 && m.nr_runs() == 1, std::to_string(m.dense_groups()));

    // PageSet: inserts, erases and counts against a flat array.
    PageSet ps(n);
    std::vector<bool> in(n);
    PageSet::Hint h;
    for (int step = 0; step < 20000; step++) {
        uint64_t i = step % 5 ? (uint64_t(step) * 3) % n : rnd(n);
        if (step % 97 == 0) {
            uint64_t a = rnd(n), b = std::min(n, a + rnd(300));
            ps.erase(ps.lower_bound(a), ps.lower_bound(b));
            for (uint64_t k = a; k < b; k++)
                in[k] = false;
        } else {
            ps.insert(i, h);
            in[i] = true;
        }
    }
    uint64_t total = 0, a = rnd(n), b = a + rnd(n - a);
    uint64_t in_range = 0;
    for (uint64_t k = 0; k < n; k++) {
        CHECK(ps.contains(k) == in[k], std::to_string(k));
        total += in[k];
        in_range += in[k] && k >= a && k < b;
    }
    CHECK(ps.size() == total && ps.count(a, b) == in_range, std::to_string(total));
    uint64_t seen = 0;
    ps.for_each([&](uint64_t k) { CHECK(in[k], std::to_string(k)); seen++; });
    CHECK(seen == total, std::to_string(seen));
    ps.clear();
    CHECK(ps.empty() && ps.count(0, n) == 0, std::string("clear"));
    std::printf("check_content_map: up to %zu dense groups; page set of %llu\n", most_dense,
                (unsigned long long)total);
}

/* check_physmem - random alloc/free keeps the free lists aligned, disjoint and coalesced. */
static void check_physmem()
{
    PhysMem pm(5000, 7, 1);
    pm.fragment(0.01);
    const uint64_t start_free = pm.nr_free();
    std::vector<std::pair<uint64_t, unsigned>> held;
    for (int step = 0; step < 20000; step++) {
        if (held.empty() || rnd(2)) {
            unsigned order = unsigned(rnd(6));
            uint64_t pfn;
            if (pm.try_alloc(order, &pfn)) {
                CHECK(pfn % (uint64_t(1) << order) == 0, pm.dump());
                held.push_back({pfn, order});
            }
        } else {
            size_t i = rnd(held.size());
            pm.free(held[i].first, held[i].second);
            held[i] = held.back();
            held.pop_back();
        }
    }
    for (auto &h : held)
        pm.free(h.first, h.second);
    CHECK(pm.nr_free() == start_free, pm.dump());
    uint64_t prev_end = 0;
    for (const FreeBlock &b : pm.free_blocks()) {
        CHECK(b.pfn >= prev_end && b.pfn % (uint64_t(1) << b.order) == 0, pm.dump());
        prev_end = b.pfn + (uint64_t(1) << b.order);
    }
    std::printf("check_physmem: 20000 alloc/free, %zu free blocks\n", pm.nr_free_blocks());
}

/*
 * check_alloc_many - alloc_many(order, n) hands out exactly the blocks n calls of
 * try_alloc(order) would, in order, and leaves the same free blocks: fragmented memory
 * that crosses bitmap groups (4096 pages) and reaches the top tier, every order.
 */
static void check_alloc_many()
{
    uint64_t calls = 0;
    for (unsigned round = 0; round < 40; round++) {
        uint64_t nr = 1 + rnd(3 << 13), base = round % 4 == 0 ? 4095 : rnd(9000);
        PhysMem a(nr, base, round), b(nr, base, round);
        double fraction = round % 3 == 0 ? 0.0 : 0.01 * double(round % 5);
        a.fragment(fraction);
        b.fragment(fraction);
        for (int step = 0; step < 30; step++) {
            unsigned order = unsigned(rnd(15));
            size_t n = 1 + rnd(round % 2 ? 5 : 3000);
            std::vector<uint64_t> got(n), want;
            got.resize(a.alloc_many(order, n, got.data()));
            for (uint64_t pfn; want.size() < n && b.try_alloc(order, &pfn);)
                want.push_back(pfn);
            CHECK(got == want, a.dump());
            calls += n;
            if (rnd(3) == 0) // give some back, unchecked, then checked on the twin
                for (size_t i = 0; i < got.size(); i += 2) {
                    a.free_unchecked(got[i], order);
                    b.free(got[i], order);
                }
            CHECK(a.nr_free() == b.nr_free() && a.nr_free_blocks() == b.nr_free_blocks(),
                  a.dump());
        }
        auto fa = a.free_blocks(), fb = b.free_blocks();
        CHECK(fa.size() == fb.size(), a.dump());
        for (size_t i = 0; i < fa.size(); i++)
            CHECK(fa[i].pfn == fb[i].pfn && fa[i].order == fb[i].order, a.dump());
    }
    std::printf("check_alloc_many: %lu blocks compared with try_alloc\n", calls);
}

/*
 * check_guest_memfd - random operations on files of every arch and design, two files per
 * PhysMem: the page cache stays consistent with its own page-by-page view after every
 * step, failed calls leave the state alone, and teardown returns every page unassigned.
 */
static void check_guest_memfd()
{
    const char *names[] = {"sw_protected", "snp", "tdx", "pkvm", "recorder"};
    unsigned long ops = 0, failed = 0;
    for (int round = 0; round < 40; round++) {
        auto pm = std::make_shared<PhysMem>(1024, 0, round);
        if (round % 3 == 0)
            pm->fragment(0.02);
        const uint64_t free_at_start = pm->nr_free();
        std::vector<std::unique_ptr<GuestMemfd>> files;
        for (int k = 0; k < 2; k++) {
            int a = int(rnd(5));
            std::shared_ptr<Arch> arch;
            if (a == 0)
                arch = std::make_shared<SwProtected>();
            else if (a == 1)
                arch = std::make_shared<SNP>();
            else if (a == 2)
                arch = std::make_shared<TDX>();
            else if (a == 3)
                arch = std::make_shared<PKVM>();
            else
                arch = std::make_shared<Recorder>(7);
            HookDesign d = HookDesign(rnd(3)); // mainline, split or overloaded
            uint64_t flags = rnd(2) ? FLAG_MMAP | FLAG_INIT_SHARED : FLAG_MMAP;
            files.push_back(std::make_unique<GuestMemfd>((64 + rnd(256)) * PAGE_SIZE, flags,
                                                         unsigned(rnd(10)), pm, arch, d));
            (void)names;
        }
        for (int step = 0; step < 300; step++) {
            GuestMemfd &f = *files[rnd(files.size())];
            uint64_t n = f.nr_pages(), i = rnd(n + 4), j = rnd(n + 4);
            ops++;
            try {
                switch (rnd(11)) {
                case 0: f.fallocate(std::min(i, j), std::max(i, j)); break;
                case 1: f.punch_hole(std::min(i, j), std::max(i, j) + 1); break;
                case 2: f.guest_write(i, rnd(1000) + 1); break;
                case 3: f.host_write(i, rnd(1000) + 1); break;
                case 4: f.get_pfn(i); break;
                case 5: f.pin(i); break;
                case 6: f.unpin(i); break;
                case 7: f.set_attributes(std::min(i, j), std::max(i, j), rnd(2) ? 0 : ATTR_PRIVATE); break;
                case 8: f.set_memory_attributes2(i * PAGE_SIZE, (j + 1) * PAGE_SIZE, rnd(2) * ATTR_PRIVATE, 0); break;
                case 9: f.add_folio(i & ~uint64_t(3), 2, rnd(1024) & ~uint64_t(3)); break;
                case 10: f.host_read(i); break;
                }
            } catch (const InvalidArgument &) {
                failed++;
            } catch (const SigBus &) {
                failed++;
            } catch (const ConversionBusy &) {
                failed++;
            } catch (const OutOfMemory &) {
                failed++;
            }
            std::vector<PfnRange> got(f.cache().count(0, n));
            got.resize(f.cache().pfn_ranges(0, n, got.data()));
            std::vector<PfnRange> want = ranges_from_pages(f.cache(), 0, n);
            CHECK(got.size() == want.size(), f.dump());
            for (size_t r = 0; r < got.size(); r++)
                CHECK(got[r].start_pfn == want[r].start_pfn && got[r].end_pfn == want[r].end_pfn,
                      f.dump());
        }
        for (auto &f : files) {
            bool lossy = f->arch().name() == "pkvm" && f->hook_design() == HookDesign::Overloaded;
            f->close();
            // pKVM scrubs at reclaim, which comes when a punch removes the folio, even one a
            // device still pins: that hazard is reported, and is the only one allowed.
            std::vector<Violation> found;
            for (const Violation &v : f->check())
                if (!(f->arch().name() == "pkvm" && v.rule == "reclaimed-while-pinned"))
                    found.push_back(v);
            CHECK(lossy || found.empty(), found[0].str() + "\n" + f->dump());
        }
        CHECK(pm->nr_free() == free_at_start, pm->dump());
        CHECK(pm->rmp().nr_runs() == 1 && pm->rmp().load(0) == 0, pm->dump());
    }
    std::printf("check_guest_memfd: %lu operations (%lu refused), 40 PhysMems\n", ops, failed);
}

/*
 * check_bulk - a bulk call on one file, the single calls in order on its twin (same
 * PhysMem seed, same operations): the same results, the same stop (BulkCall::done is
 * the element that threw), the same state.  Forward runs and random indexes both.
 */
static void check_bulk()
{
    unsigned long calls = 0;
    for (int round = 0; round < 30; round++) {
        std::unique_ptr<GuestMemfd> f[2];
        for (auto &g : f)
            g = std::make_unique<GuestMemfd>(128 * PAGE_SIZE, FLAG_MMAP, unsigned(round % 5),
                                             std::make_shared<PhysMem>(96, 0, round),
                                             std::make_shared<SNP>(), HookDesign::Mainline);
        for (int step = 0; step < 40; step++) {
            // Now and then a batch long and scattered enough to find its folios ahead.
            size_t n = step % 5 == 4 ? 256 + rnd(300) : rnd(24);
            std::vector<uint64_t> index(n), token(n), out(n, 0), want(n, 0);
            std::vector<uint8_t> order(n, 0);
            uint64_t at = rnd(140);
            for (size_t k = 0; k < n; k++) {
                index[k] = step % 2 ? at + k : rnd(step % 5 == 4 ? 129 : 140);
                token[k] = rnd(1000) + 1;
            }
            int op = int(rnd(4));
            if (op == 3) { // conversions, to give both attributes and busy-free variety
                uint64_t a = rnd(128), b = rnd(128), attrs = rnd(2) ? 0 : ATTR_PRIVATE;
                for (auto &g : f)
                    try {
                        g->set_attributes(std::min(a, b), std::max(a, b) + 1, attrs);
                    } catch (const std::exception &) {
                    }
                continue;
            }
            BulkCall call;
            bool threw = false;
            try {
                if (op == 0)
                    f[0]->get_pfns(index.data(), n, out.data(), order.data(), call);
                else if (op == 1)
                    f[0]->guest_write_many(index.data(), token.data(), n, call);
                else
                    f[0]->host_read_many(index.data(), n, out.data(), call);
            } catch (const std::exception &) {
                threw = true;
            }
            size_t done = 0;
            bool threw_single = false;
            for (; done < n; done++) {
                try {
                    if (op == 0) {
                        auto r = f[1]->get_pfn(index[done]);
                        want[done] = r.first;
                        CHECK(order[done] == r.second || threw, f[0]->dump());
                    } else if (op == 1) {
                        f[1]->guest_write(index[done], token[done]);
                    } else {
                        want[done] = f[1]->host_read(index[done]);
                    }
                } catch (const std::exception &) {
                    threw_single = true;
                    break;
                }
            }
            calls++;
            CHECK(threw == threw_single && call.done == done, f[0]->dump());
            for (size_t k = 0; k < done; k++)
                CHECK(out[k] == want[k], f[0]->dump());
            CHECK(f[0]->dump() == f[1]->dump(), f[0]->dump() + "\n" + f[1]->dump());
            CHECK(f[0]->physmem().contents(0, 96) == f[1]->physmem().contents(0, 96),
                  f[0]->physmem().dump());
        }
    }
    std::printf("check_bulk: %lu bulk calls against their single calls\n", calls);
}

/*
 * check_fused_conversion - the SNP model converts its folios' contents in the walk that
 * hands out their ranges; a subclass that only forwards its hooks is not blind, so its
 * file converts all contents first and the hooks walk second.  Same operations on both
 * (twin PhysMems): the same contents, RMP, stats and violations.  What the subclass reads
 * of the pages it is handed is already what they hold once the conversion is over.
 */
struct ForwardingSNP : SNP {
    std::vector<std::pair<uint64_t, uint64_t>> seen; // (pfn, contents) during a call
    void make_shared(GuestMemfd &f, const PfnRange *r, size_t n) override
    {
        for (size_t i = 0; i < n; i++)
            for (uint64_t pfn = r[i].start_pfn; pfn < r[i].end_pfn; pfn++)
                seen.push_back({pfn, f.physmem().read(pfn)});
        SNP::make_shared(f, r, n);
    }
};

static std::string conversion_state(const GuestMemfd &f)
{
    std::string s;
    const PhysMem &pm = f.physmem();
    for (const Run &r : pm.contents(pm.base_pfn(), pm.nr_pages()))
        s += "c" + std::to_string(r.start) + "-" + std::to_string(r.end) + "=" + hex(r.value);
    for (const Run &r : pm.rmp().runs(0, pm.nr_pages()))
        s += " r" + std::to_string(r.start) + "-" + std::to_string(r.end) + "=" +
             std::to_string(r.value);
    for (const auto &kv : f.stats().items())
        s += std::string(" ") + kv.first + "=" + std::to_string(kv.second);
    for (const auto &kv : f.arch_ptr()->stats())
        s += " " + kv.first + "=" + std::to_string(kv.second);
    for (const Violation &v : f.check())
        s += "\n" + v.str();
    return s;
}

static void check_fused_conversion()
{
    unsigned long conversions = 0, pages_seen = 0;
    CHECK(SNP().range_hooks_blind() && !ForwardingSNP().range_hooks_blind(), std::string());
    for (int round = 0; round < 40; round++) {
        auto twin_arch = std::make_shared<ForwardingSNP>();
        std::unique_ptr<GuestMemfd> f[2];
        for (int k = 0; k < 2; k++) {
            auto pm = std::make_shared<PhysMem>(2048, 0, round);
            if (round % 2)
                pm->fragment(0.03);
            std::shared_ptr<Arch> arch = twin_arch;
            if (k == 0)
                arch = std::make_shared<SNP>();
            f[k] = std::make_unique<GuestMemfd>(1024 * PAGE_SIZE, FLAG_MMAP, unsigned(round % 4),
                                                pm, arch, HookDesign(round % 3));
        }
        uint64_t seed = rng_state;
        for (int k = 0; k < 2; k++) {
            rng_state = seed; // the same operations on both files
            GuestMemfd &g = *f[k];
            for (int step = 0; step < 60; step++) {
                uint64_t i = rnd(1024), j = rnd(1024);
                twin_arch->seen.clear();
                try {
                    switch (rnd(6)) {
                    case 0: g.fallocate(std::min(i, j), std::max(i, j) + 1); break;
                    case 1: g.guest_write(i, rnd(1000) + 1); break;
                    case 2: g.host_write(i, rnd(1000) + 1); break;
                    case 3: g.add_folio(i & ~uint64_t(1), 1, rnd(2048) & ~uint64_t(1)); break;
                    default:
                        g.set_attributes(std::min(i, j), std::max(i, j) + 1,
                                         rnd(2) ? 0 : ATTR_PRIVATE);
                        conversions += k == 0;
                    }
                } catch (const InvalidArgument &) {
                } catch (const SigBus &) {
                } catch (const ConversionBusy &) {
                } catch (const OutOfMemory &) {
                }
                for (const auto &pc : twin_arch->seen)
                    CHECK(g.physmem().read(pc.first) == pc.second, g.dump());
                pages_seen += twin_arch->seen.size();
            }
        }
        CHECK(conversion_state(*f[0]) == conversion_state(*f[1]),
              conversion_state(*f[0]) + "\n--- twin:\n" + conversion_state(*f[1]));
    }
    CHECK(pages_seen > 0, std::string());
    std::printf("check_fused_conversion: %lu conversions, fused and not; %lu pages seen\n",
                conversions, pages_seen);
}

int main(int argc, char **argv)
{
    unsigned size_order = 4;
    if (argc > 1) {
        unsigned long pages = std::strtoul(argv[1], nullptr, 0);
        size_order = 0;
        while ((2ul << size_order) <= pages)
            size_order++;
    }
    check_u64tree();
    check_interval_map();
    check_content_map();
    check_physmem();
    check_alloc_many();
    check_guest_memfd();
    check_bulk();
    check_fused_conversion();
    check_pfn_walk_exhaustive(size_order);
    PfnCheckReport rep = check_pfn_exhaustive(size_order);
    CHECK(rep.ok && rep.layouts > 0, rep.what);
    std::printf("check_pfn_exhaustive: %llu layouts, %llu ranges\n",
                (unsigned long long)rep.layouts, (unsigned long long)rep.ranges);
    std::printf("%lu checks passed\n", nr_checks);
    return 0;
}
