// SPDX-License-Identifier: MIT
// host.hpp - the host's memory, for refusing up front a request that cannot fit.
//
// Some requests are small to write and huge to satisfy: a whole-file fallocate of a
// 4 PiB file of 4 KiB folios is 2**40 page-cache entries.  Rather than exhaust the host
// (where Linux's overcommit means the OOM killer, not std::bad_alloc), such an operation
// compares what it needs at least with what the host has available, and refuses.
#pragma once

#include <cstdint>

namespace gmem {

/// Requests below this many bytes fit without asking (reading /proc costs microseconds).
constexpr uint64_t SMALL_REQUEST = uint64_t(64) << 20;

/// Nanoseconds per load of a chain of dependent loads through @bytes of memory, one cache
/// line per step in a random cycle: what a lookup pays for each cache miss on this host
/// (benchmarks quote it beside their cold figures).
double host_load_latency_ns(uint64_t bytes, uint64_t steps);

/// MemAvailable in bytes, capped by what RLIMIT_AS leaves this process (UINT64_MAX when
/// neither can be read).
uint64_t host_memory_available();

} // namespace gmem
