// SPDX-License-Identifier: MIT
// host.cpp - what the host machine the model runs on can give it.
#include "host.hpp"

#include <algorithm>
#include <cstdio>

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

} // namespace gmem
