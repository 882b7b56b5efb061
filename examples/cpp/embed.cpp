// SPDX-License-Identifier: MIT
// embed.cpp - gmem embedded in a C++ simulator: a 4 MiB pKVM guest with 2 MiB folios goes
// through guest faults, a share, a host pin that makes unsharing busy, populate, a memory
// failure and teardown, under an arch of its own (a subclass of the built-in PKVM) that
// counts its hook calls.  It prints the counters in the same fixed format as
// examples/python/embed.py and examples/c/embed.c.
//
// The C++ core is used directly: its errors are exceptions (gmem::ConversionBusy, ...),
// and nothing locks, so one thread drives a PhysMem (or take pm.lock() around each call).
#include <gmem/guest_memfd.hpp>

#include <cstdio>
#include <memory>

class Counting : public gmem::PKVM {
public:
    uint64_t invalidate_starts = 0, invalidate_ranges = 0, invalidate_ends = 0,
             reclaim_ranges = 0;

    unsigned config() const override { return PKVM::config() | gmem::CONFIG_INVALIDATE; }
    void invalidate_start(gmem::GuestMemfd &, uint64_t, uint64_t, unsigned) override
    {
        invalidate_starts++;
    }
    void invalidate_range(gmem::GuestMemfd &, uint64_t, uint64_t, unsigned) override
    {
        invalidate_ranges++;
    }
    void invalidate_end(gmem::GuestMemfd &, uint64_t, uint64_t) override { invalidate_ends++; }
    // reclaim: the C++ methods keep the thread's name, free_folio.
    void free_folio(gmem::GuestMemfd &f, const gmem::PfnRange *r, size_t n) override
    {
        reclaim_ranges += n;
        PKVM::free_folio(f, r, n); // pKVM's own: scrub the pages
    }
};

int main()
{
    auto arch = std::make_shared<Counting>();
    gmem::GuestMemfd f(4 << 20, gmem::FLAG_MMAP, 9, nullptr, arch, gmem::HookDesign::Mainline);
    f.get_pfn(0); // guest faults on private pages
    f.get_pfn(600);
    f.guest_write(0, 1000);
    f.guest_write(600, 2000);
    f.set_attributes(512, 1024, 0); // the guest shares its upper half
    f.host_fault(600);
    f.host_write(600, 3000);
    f.pin(600); // a device pins a shared page...
    try {
        f.set_attributes(512, 1024, gmem::ATTR_PRIVATE); // ...so unsharing is busy
        return 1;
    } catch (const gmem::ConversionBusy &e) {
        std::printf("busy_index %llu\n", (unsigned long long)e.error_index);
    }
    f.unpin(600);
    f.set_attributes(512, 1024, gmem::ATTR_PRIVATE);
    std::printf("guest_read %llu\n", (unsigned long long)f.guest_read(600)); // kept in place
    f.populate(700, true, 4000);
    f.memory_failure(0);
    try {
        f.get_pfn(5);
        return 1;
    } catch (const gmem::HWPoison &e) {
        std::printf("hwpoison_index %llu\n", (unsigned long long)e.index);
    }
    f.punch_hole(0, 512); // the poisoned folio leaves; the index faults in a fresh one
    std::printf("get_pfn_after_punch %llu\n", (unsigned long long)f.get_pfn(5).first);
    f.close();

    std::printf("hook invalidate_start %llu\n", (unsigned long long)arch->invalidate_starts);
    std::printf("hook invalidate_range %llu\n", (unsigned long long)arch->invalidate_ranges);
    std::printf("hook invalidate_end %llu\n", (unsigned long long)arch->invalidate_ends);
    std::printf("hook reclaim_ranges %llu\n", (unsigned long long)arch->reclaim_ranges);
    for (const auto &kv : f.stats().items())
        std::printf("stat %s %llu\n", kv.first, (unsigned long long)kv.second);
    for (const auto &kv : arch->stats())
        std::printf("arch %s %llu\n", kv.first.c_str(), (unsigned long long)kv.second);
    std::printf("violations %zu\n", f.check().size());
    return 0;
}
