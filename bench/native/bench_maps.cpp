// SPDX-License-Identifier: MIT
// bench_maps.cpp - gmem's IntervalMap against absl::btree_map and boost::icl::interval_map.
//
// The same operations on each map at 10**5 and 10**6 live runs: store (set a short range
// to a value), load (the value at an index) and erase (a range back to the background
// value).  "cold" draws fresh random operations every pass, so nothing is cached from the
// pass before; "warm" replays the same 1000 operations 100 times.  Each figure is the median
// over repeats, with the spread (min..max).  A peer whose headers were not found at build
// time is skipped with a message.
//
// absl::btree_map stands in for a run map the simple way: key = run start, value = value,
// a store erases the starts inside the range and puts back the two boundaries.
//
// Usage: bench_maps [repeats]   (default 7)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "gmem/interval_map.hpp"

#ifdef GMEM_HAVE_ABSL
#include <absl/container/btree_map.h>
#endif
#ifdef GMEM_HAVE_BOOST
#include <boost/icl/interval_map.hpp>
#endif

namespace {

struct Op {
    uint64_t start, end, value;
};

uint64_t rng_state = 1;
uint64_t rnd()
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9;
    z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
    return z ^ (z >> 31);
}

// Short random ranges of one of two values: the map stays near its starting run count.
std::vector<Op> make_ops(uint64_t nr_pages, size_t n)
{
    std::vector<Op> ops(n);
    for (Op &o : ops) {
        o.start = rnd() % (nr_pages - 16);
        o.end = o.start + 1 + rnd() % 15;
        o.value = (rnd() & 1) ? 8 : 0;
    }
    return ops;
}

// The gmem map, and the two peers behind the same three calls.
struct Gmem {
    gmem::IntervalMap m;
    explicit Gmem(uint64_t n) : m(n) {}
    void store(uint64_t s, uint64_t e, uint64_t v) { m.store(s, e, v); }
    uint64_t load(uint64_t i) const { return m.load(i); }
    void erase(uint64_t s, uint64_t e) { m.store(s, e, 0); }
};

#ifdef GMEM_HAVE_ABSL
struct Absl {
    absl::btree_map<uint64_t, uint64_t> m; // run start -> value
    uint64_t nr_pages;
    explicit Absl(uint64_t n) : nr_pages(n) { m.emplace(0, 0); }
    void store(uint64_t s, uint64_t e, uint64_t v)
    {
        auto after = std::prev(m.upper_bound(e))->second; // value at e
        auto before = s ? std::prev(m.upper_bound(s - 1))->second : ~uint64_t(0);
        m.erase(m.lower_bound(s), m.upper_bound(e));
        if (before != v)
            m.emplace(s, v);
        if (e < nr_pages && after != v)
            m.emplace(e, after);
    }
    uint64_t load(uint64_t i) const { return std::prev(m.upper_bound(i))->second; }
    void erase(uint64_t s, uint64_t e) { store(s, e, 0); }
};
#endif

#ifdef GMEM_HAVE_BOOST
struct Icl {
    // interval_map drops ranges mapped to the identity (0), as our background value.
    boost::icl::interval_map<uint64_t, uint64_t, boost::icl::partial_absorber,
                             std::less, boost::icl::inplace_identity> m;
    explicit Icl(uint64_t) {}
    void store(uint64_t s, uint64_t e, uint64_t v)
    {
        auto iv = boost::icl::interval<uint64_t>::right_open(s, e);
        m.erase(iv);
        if (v)
            m.add(std::make_pair(iv, v));
    }
    uint64_t load(uint64_t i) const
    {
        auto it = m.find(i);
        return it == m.end() ? 0 : it->second;
    }
    void erase(uint64_t s, uint64_t e) { m.erase(boost::icl::interval<uint64_t>::right_open(s, e)); }
};
#endif

struct Stat {
    double median, lo, hi;
};

Stat stat(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return Stat{v[v.size() / 2], v.front(), v.back()};
}

template <class Fn>
double ns_per_op(size_t n, Fn &&fn)
{
    auto t0 = std::chrono::steady_clock::now();
    fn();
    auto t1 = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::nano>(t1 - t0).count() / double(n);
}

volatile uint64_t sink;

const char *const WHAT[6] = {"store cold", "load cold", "erase cold",
                             "store warm", "load warm", "erase warm"};

// One map's timings: t[what][pass], ns per operation.
struct Row {
    const char *name;
    std::vector<double> t[6];
};

// Time operation @what (0 store, 1 load, 2 erase) of @ops on @m into row slot @slot.
template <class Map>
void pass(Map &m, int what, const std::vector<Op> &ops, Row &row, int slot)
{
    row.t[slot].push_back(ns_per_op(ops.size(), [&] {
        uint64_t x = 0;
        for (const Op &o : ops) {
            if (what == 0)
                m.store(o.start, o.end, o.value);
            else if (what == 1)
                x += m.load(o.start);
            else
                m.erase(o.start, o.end);
        }
        sink = x;
    }));
}

/*
 * run - every map at @runs live runs, side by side: each pass draws one set of
 * operations and runs it on every map in turn, so that a burst of load on the machine
 * hits all of them; the ratios are taken pass by pass.
 */
template <class... Maps>
void run(uint64_t runs, int repeats, const char *const *names)
{
    const uint64_t nr_pages = 10 * runs;
    const size_t calls = 100000;
    std::tuple<Maps...> maps(((void)sizeof(Maps), nr_pages)...); // built in place
    Row rows[sizeof...(Maps)];
    for (size_t i = 0; i < sizeof...(Maps); i++)
        rows[i].name = names[i];
    std::apply([&](auto &...m) {
        for (uint64_t s = 0; s < nr_pages; s += 10)
            (m.store(s, s + 5, 8), ...);
    }, maps);
    // Warm: the same 1000 operations, 100 times over.
    std::vector<Op> warm, few = make_ops(nr_pages, 1000);
    for (size_t i = 0; i < calls; i++)
        warm.push_back(few[i % few.size()]);
    for (int r = 0; r < repeats; r++) {
        for (int cold = 1; cold >= 0; cold--) {
            for (int what = 0; what < 3; what++) {
                std::vector<Op> ops = cold ? make_ops(nr_pages, calls) : warm;
                int slot = what + (cold ? 0 : 3);
                size_t i = 0;
                std::apply([&](auto &...m) { (pass(m, what, ops, rows[i++], slot), ...); },
                           maps);
                if (what == 2) // put back what erase took, so the run count holds
                    std::apply([&](auto &...m) {
                        for (const Op &o : ops)
                            (m.store(o.start, o.end, 8), ...);
                    }, maps);
            }
        }
    }
    const char *size = runs >= 1000000 ? "1e6" : "1e5";
    for (const Row &row : rows)
        for (int w = 0; w < 6; w++) {
            Stat s = stat(row.t[w]);
            std::printf("%-4s %-25s %-11s %8.1f ns  (%.1f..%.1f)\n", size, row.name, WHAT[w],
                        s.median, s.lo, s.hi);
        }
    for (size_t i = 1; i < sizeof...(Maps); i++)
        for (int w = 0; w < 6; w++) {
            std::vector<double> q;
            for (size_t p = 0; p < rows[0].t[w].size(); p++)
                q.push_back(rows[i].t[w][p] / rows[0].t[w][p]);
            Stat s = stat(q);
            std::printf("%-4s %-25s %-11s %8.2fx     (%.2f..%.2f)\n", size,
                        (std::string(rows[i].name) + " / gmem").c_str(), WHAT[w], s.median,
                        s.lo, s.hi);
        }
}

} // namespace

int main(int argc, char **argv)
{
    int repeats = argc > 1 ? std::atoi(argv[1]) : 7;
    if (repeats < 1)
        repeats = 1;
    std::printf("ns per operation, median of %d passes of 10**5 operations (min..max);\n"
                "ratios: the peer's time over gmem's, pass by pass (> 1: gmem is faster)\n",
                repeats);
#ifndef GMEM_HAVE_ABSL
    std::printf("absl::btree_map: skipped (headers not found; Debian: libabsl-dev)\n");
#endif
#ifndef GMEM_HAVE_BOOST
    std::printf("boost::icl::interval_map: skipped (headers not found; Debian: libboost-dev)\n");
#endif
    static const char *const names[] = {"gmem::IntervalMap",
#ifdef GMEM_HAVE_ABSL
                                        "absl::btree_map",
#endif
#ifdef GMEM_HAVE_BOOST
                                        "boost::icl::interval_map",
#endif
    };
    for (uint64_t runs : {uint64_t(100000), uint64_t(1000000)})
        run<Gmem
#ifdef GMEM_HAVE_ABSL
            , Absl
#endif
#ifdef GMEM_HAVE_BOOST
            , Icl
#endif
            >(runs, repeats, names);
    return 0;
}
