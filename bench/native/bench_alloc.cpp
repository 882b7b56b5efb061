// SPDX-License-Identifier: MIT
// bench_alloc.cpp - the cost of allocation: PhysMem alone, then fallocate + close.
//
// Usage: bench_alloc [log2_pages=28] [repeats=5]
//
// Each repeat builds a fresh PhysMem (cold: nothing allocated before) and times, per
// order-0 block: try_alloc() and free() one call at a time (the public API, checked), the
// bulk paths alloc_many() and free_unchecked() (what fallocate and teardown use), and a
// GuestMemfd (sw_protected, no hooks) of 2**log2_pages pages doing fallocate then close.
// Prints the median and the spread (min..max) of the repeats in ns per folio, in CPU time
// of the process and in wall time (on a shared machine the two differ by the waits).
//
// Built with -DGMEM_BUILD_BENCH=ON.  Compiled with -DGMEM_OLD_ALLOCATOR against an older
// core (which has no alloc_many/free_unchecked), it times the per-call paths only.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gmem/arch.hpp"
#include "gmem/guest_memfd.hpp"
#include "gmem/physmem.hpp"

using namespace gmem;
using Clock = std::chrono::steady_clock;

/* CPU seconds of this process (the machine may be shared: wall time counts the waits). */
static double cpu_now()
{
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

struct Times {
    std::vector<double> cpu, wall;
};

static void time_it(Times &t, uint64_t n, const std::function<void()> &fn)
{
    double c0 = cpu_now();
    auto w0 = Clock::now();
    fn();
    t.wall.push_back(std::chrono::duration<double>(Clock::now() - w0).count() * 1e9 / double(n));
    t.cpu.push_back((cpu_now() - c0) * 1e9 / double(n));
}

static void report(const char *what, Times t)
{
    if (t.cpu.empty())
        return;
    std::sort(t.cpu.begin(), t.cpu.end());
    std::sort(t.wall.begin(), t.wall.end());
    size_t m = t.cpu.size() / 2;
    std::printf("%-32s cpu %7.2f ns/folio (%.2f..%.2f)   wall %7.2f (%.2f..%.2f)\n", what,
                t.cpu[m], t.cpu.front(), t.cpu.back(), t.wall[m], t.wall.front(),
                t.wall.back());
}

int main(int argc, char **argv)
{
    unsigned lg = argc > 1 ? unsigned(std::atoi(argv[1])) : 28;
    int repeats = argc > 2 ? std::atoi(argv[2]) : 5;
    const uint64_t n = uint64_t(1) << lg;
    Times a1, f1, a2, f2, fa, cl;
    for (int r = 0; r < repeats; r++) {
        // Per call: the public API's path.
        {
            auto pm = std::make_unique<PhysMem>(n);
            std::vector<uint64_t> pfns(n, 0); // touched before the clock starts
            time_it(a1, n, [&] {
                for (uint64_t i = 0; i < n; i++)
                    pm->try_alloc(0, &pfns[i]);
            });
            time_it(f1, n, [&] {
                for (uint64_t i = 0; i < n; i++)
                    pm->free(pfns[i], 0);
            });
#ifndef GMEM_OLD_ALLOCATOR
            // Bulk: what fallocate and teardown use.
            time_it(a2, n, [&] {
                for (uint64_t i = 0; i < n; i += 1024)
                    pm->alloc_many(0, std::min<uint64_t>(1024, n - i), &pfns[i]);
            });
            time_it(f2, n, [&] {
                for (uint64_t i = 0; i < n; i++)
                    pm->free_unchecked(pfns[i], 0);
            });
#endif
        }
        // The whole path: fallocate + close of a file of order-0 folios, no hooks.
        {
            auto f = std::make_unique<GuestMemfd>(n * PAGE_SIZE, 0, 0, nullptr,
                                                  std::make_shared<SwProtected>(),
                                                  HookDesign::Mainline);
            time_it(fa, n, [&] { f->fallocate(0, n); });
            time_it(cl, n, [&] { f->close(); });
        }
    }
    std::printf("bench_alloc: 2**%u order-0 folios (%.0f GiB)\n", lg,
                double(n) * 4096.0 / double(uint64_t(1) << 30));
    report("PhysMem try_alloc(0)", a1);
    report("PhysMem free(pfn, 0)", f1);
    report("PhysMem alloc_many(0, 1024)", a2);
    report("PhysMem free_unchecked(pfn, 0)", f2);
    report("GuestMemfd fallocate", fa);
    report("GuestMemfd close", cl);
    return 0;
}
