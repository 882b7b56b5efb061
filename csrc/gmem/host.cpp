// SPDX-License-Identifier: MIT
// host.cpp - what the host machine the model runs on can give it.
#include "host.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

namespace gmem {

/* MemAvailable, and no more than what RLIMIT_AS leaves this process. */
uint64_t host_memory_available()
{
    uint64_t avail = UINT64_MAX; // unknown: let the allocator be the judge
    if (FILE *f = std::fopen("/proc/meminfo", "r")) {
        char line[128];
        unsigned long long kib;
        while (std::fgets(line, sizeof line, f))
            if (std::sscanf(line, "MemAvailable: %llu kB", &kib) == 1)
                avail = uint64_t(kib) << 10;
        std::fclose(f);
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        uint64_t used = 0;
        if (FILE *f = std::fopen("/proc/self/statm", "r")) {
            unsigned long long vm_pages;
            if (std::fscanf(f, "%llu", &vm_pages) == 1)
                used = uint64_t(vm_pages) * uint64_t(sysconf(_SC_PAGESIZE));
            std::fclose(f);
        }
        uint64_t left = rl.rlim_cur > used ? rl.rlim_cur - used : 0;
        avail = std::min(avail, left);
    }
    return avail;
}

double host_load_latency_ns(uint64_t bytes, uint64_t steps)
{
    struct alignas(64) Line {
        uint64_t next;
    };
    size_t n = std::max<uint64_t>(bytes / sizeof(Line), 2);
    std::vector<Line> lines(n);
    std::vector<uint64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    // One random cycle through every line (Sattolo), so that no load can be predicted.
    std::mt19937_64 rng(1);
    for (size_t i = n - 1; i > 0; i--)
        std::swap(order[i], order[rng() % i]);
    for (size_t i = 0; i < n; i++)
        lines[order[i]].next = order[(i + 1) % n];
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) // once round, untimed: the pages are faulted in
        at = lines[at].next;
    auto t0 = std::chrono::steady_clock::now();
    for (uint64_t i = 0; i < steps; i++)
        at = lines[at].next;
    auto t1 = std::chrono::steady_clock::now();
    volatile uint64_t sink = at; // the chain must be walked
    (void)sink;
    return std::chrono::duration<double, std::nano>(t1 - t0).count() / double(steps ? steps : 1);
}

} // namespace gmem
