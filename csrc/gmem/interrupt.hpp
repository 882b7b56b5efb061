// SPDX-License-Identifier: MIT
// interrupt.hpp - how a long loop of the core learns that its caller wants it to stop.
//
// The kernel's long loops (fallocate, a large read) check signal_pending() between batches
// and back out with -EINTR.  The core's ask interrupt_pending(): a probe the embedder
// registers (the Python bindings: a pending Ctrl-C), asked at most every 20 ms, so the
// check costs a counter increment per item.  A loop that sees it undoes what it did and
// throws Interrupted.  Loops past a point of no return (teardown, conversion) do not ask.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>

namespace gmem {

/// The caller asked the operation to stop; it changed nothing.  (KeyboardInterrupt.)
struct Interrupted : std::runtime_error {
    using std::runtime_error::runtime_error;
};

using InterruptProbe = bool (*)();

inline std::atomic<InterruptProbe> &interrupt_probe()
{
    static std::atomic<InterruptProbe> probe{nullptr};
    return probe;
}

/// Register the embedder's probe (nullptr: never interrupted).
inline void set_interrupt_probe(InterruptProbe p) { interrupt_probe().store(p); }

/// One per loop: call it per item; true once the probe says stop.
class InterruptCheck {
public:
    bool operator()()
    {
        if (++calls_ & 1023)
            return false;
        auto now = std::chrono::steady_clock::now();
        if (now < next_)
            return false;
        next_ = now + std::chrono::milliseconds(20);
        InterruptProbe p = interrupt_probe().load(std::memory_order_relaxed);
        return p && p();
    }

private:
    uint64_t calls_ = 0;
    std::chrono::steady_clock::time_point next_ =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
};

} // namespace gmem
