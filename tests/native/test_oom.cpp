// SPDX-License-Identifier: MIT
// test_oom.cpp - the host running out of memory at every allocation of an operation: the
// operation fails and changes nothing, and giving pages back never needs memory.
//
// operator new is replaced: once armed with a budget of N allocations, the (N+1)th and
// every one after it throw std::bad_alloc (a host that has run out stays out), so an undo
// that allocates fails too, and what it leaves behind shows.  Each case runs the operation
// once to count its allocations, then again failing at each count in turn.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "gmem/arch.hpp"
#include "gmem/guest_memfd.hpp"
#include "gmem/physmem.hpp"

using namespace gmem;

static long budget = -1; // allocations left before they fail; -1: unlimited
static long nr_allocs;   // allocations since the counter was last reset

void *operator new(std::size_t n)
{
    nr_allocs++;
    if (budget == 0)
        throw std::bad_alloc();
    if (budget > 0)
        budget--;
    if (void *p = std::malloc(n ? n : 1))
        return p;
    throw std::bad_alloc();
}
void *operator new[](std::size_t n) { return operator new(n); }
void operator delete(void *p) noexcept { std::free(p); }
void operator delete[](void *p) noexcept { std::free(p); }
void operator delete(void *p, std::size_t) noexcept { std::free(p); }
void operator delete[](void *p, std::size_t) noexcept { std::free(p); }

static unsigned long nr_checks;

#define CHECK(cond, what)                                                                      \
    do {                                                                                       \
        nr_checks++;                                                                           \
        if (!(cond)) {                                                                         \
            budget = -1;                                                                       \
            std::fprintf(stderr, "%s:%d: CHECK(%s) failed: %s\n", __FILE__, __LINE__, #cond,    \
                         std::string(what).c_str());                                           \
            std::exit(1);                                                                      \
        }                                                                                      \
    } while (0)

/* What a PhysMem looks like from outside: free pages, free blocks. */
struct Snapshot {
    uint64_t nr_free;
    std::vector<std::pair<uint64_t, unsigned>> blocks;
    bool operator==(const Snapshot &o) const
    {
        return nr_free == o.nr_free && blocks == o.blocks;
    }
};

static Snapshot snapshot(const PhysMem &pm)
{
    Snapshot s{pm.nr_free(), {}};
    for (const FreeBlock &fb : pm.free_blocks())
        s.blocks.push_back({fb.pfn, fb.order});
    return s;
}

static std::string describe(const PhysMem &pm, const Snapshot &want)
{
    return pm.dump() + "\nnr_free " + std::to_string(pm.nr_free()) + ", want " +
           std::to_string(want.nr_free) + "; check: " + pm.check();
}

static std::unique_ptr<GuestMemfd> file(uint64_t pages, unsigned order,
                                        std::shared_ptr<PhysMem> pm, bool hugetlb = false)
{
    // Under "hugetlb" every page starts shared, so each huge folio is split as it comes.
    return std::make_unique<GuestMemfd>(
        pages * PAGE_SIZE, hugetlb ? FLAG_MMAP | FLAG_INIT_SHARED : FLAG_MMAP, order,
        std::move(pm), std::make_shared<SwProtected>(), HookDesign::Mainline,
        hugetlb ? HugePolicy::HugeTLB : HugePolicy::None);
}

/*
 * fallocate_fails_cleanly - a file of @order folios fallocates [0, @pages) from @pm,
 * whose free memory is set up so that the walk empties many groups (or takes many
 * top-tier blocks); with the host failing at each allocation in turn, the call throws
 * and PhysMem, the file and the allocator's invariants are exactly as before.
 */
static void fallocate_fails_cleanly(const char *name, std::shared_ptr<PhysMem> pm,
                                    uint64_t pages, unsigned order, bool hugetlb = false)
{
    const Snapshot before = snapshot(*pm);
    CHECK(pm->check().empty(), describe(*pm, before));
    long total;
    {
        auto f = file(pages, order, pm, hugetlb);
        nr_allocs = 0;
        f->fallocate(0, pages);
        total = nr_allocs;
        CHECK(pm->check().empty(), describe(*pm, before));
        CHECK(pm->nr_free() + pages == before.nr_free, describe(*pm, before));
        f->close();
        CHECK(snapshot(*pm) == before, describe(*pm, before));
    }
    long failed = 0;
    for (long n = 0; n <= total; n++) {
        auto f = file(pages, order, pm, hugetlb);
        bool threw = false;
        budget = n;
        try {
            f->fallocate(0, pages);
        } catch (const std::bad_alloc &) {
            threw = true;
        }
        budget = -1;
        failed += threw;
        CHECK(threw == (n < total), std::string(name) + ": allocation " + std::to_string(n));
        if (threw) {
            CHECK(snapshot(*pm) == before,
                  std::string(name) + ": failing at allocation " + std::to_string(n) +
                      " of " + std::to_string(total) + " leaks pages\n" +
                      describe(*pm, before));
            CHECK(f->cache().nr_folios() == 0 && f->stats().folios_allocated == 0, name);
        }
        CHECK(pm->check().empty(), std::string(name) + ": " + pm->check());
        f->close();
        CHECK(snapshot(*pm) == before, describe(*pm, before));
    }
    std::printf("%s: fallocate of %lu pages failing at each of its %ld allocations: "
                "nothing changed (%lu free pages in %zu blocks)\n",
                name, (unsigned long)pages, failed, (unsigned long)before.nr_free,
                before.blocks.size());
}

/*
 * check_groups_reopened - one file holds every page in 2 MiB folios; a folio is punched
 * out of each of 4096 groups; a second file's fallocate takes exactly those, emptying
 * every group, so its undo gives pages back to 4096 groups that have no free page.
 */
static void check_groups_reopened()
{
    const uint64_t groups = 4096;
    auto pm = std::make_shared<PhysMem>(groups * GROUP_PAGES, 0, 1);
    auto holder = file(groups * GROUP_PAGES, 9, pm);
    holder->fallocate(0, groups * GROUP_PAGES);
    for (uint64_t g = 0; g < groups; g++) {
        uint64_t at = g * GROUP_PAGES + (g % 8) * 512;
        holder->punch_hole(at, at + 512);
    }
    fallocate_fails_cleanly("groups reopened", pm, groups * 512, 9);
    // Order-0 folios from the same holes: many folios per group, and the bulk path.
    fallocate_fails_cleanly("groups reopened, 4 KiB folios", pm, 64 * 512, 0);
    holder->close();
    CHECK(pm->nr_free() == pm->nr_pages() && pm->check().empty(), pm->dump());
}

/*
 * check_top_blocks - free 32 MiB blocks whose buddies are held (no coalescing), taken by
 * a file of 32 MiB folios: each comes back into a free list that needs a node for it;
 * then by a "hugetlb" file whose 32 MiB folios are split into pages at once.
 */
static void check_top_blocks()
{
    auto pm = std::make_shared<PhysMem>(uint64_t(1) << 22, 0, 2);
    auto holder = file(uint64_t(1) << 22, 13, pm);
    holder->fallocate(0, uint64_t(1) << 22);
    for (uint64_t at = 0; at < (uint64_t(1) << 22); at += uint64_t(1) << 14)
        holder->punch_hole(at, at + (uint64_t(1) << 13));
    fallocate_fails_cleanly("top-tier blocks", pm, uint64_t(1) << 21, 13);
    // Huge pages split into 4 KiB pieces as they come ("hugetlb", all shared): the undo
    // must give each back as the 32 MiB block it was handed out as.
    fallocate_fails_cleanly("split huge pages", pm, uint64_t(1) << 15, 13, true);
    holder->close();
    CHECK(pm->nr_free() == pm->nr_pages() && pm->check().empty(), pm->dump());
}

/*
 * check_free_never_allocates - blocks of every order, scattered and interleaved, handed
 * out by alloc(), alloc_many() and take(); then, with every allocation failing, all given
 * back by free_unchecked() and free_range_unchecked() in a shuffled order: none throws and
 * PhysMem is as it started.
 */
static void check_free_never_allocates()
{
    for (int round = 0; round < 6; round++) {
        PhysMem pm(uint64_t(3) << 20, round * 4096 + 5, round);
        const Snapshot fresh = snapshot(pm);
        std::vector<std::pair<uint64_t, unsigned>> held;
        uint64_t rng = round;
        auto rnd = [&](uint64_t n) { return SplitMix64{rng++}.next() % n; };
        for (int i = 0; i < 4000; i++) {
            unsigned order = rnd(4) ? unsigned(rnd(10)) : unsigned(12 + rnd(7));
            uint64_t pfn;
            if (rnd(3) == 0) {
                uint64_t out[64];
                size_t n = pm.alloc_many(order, 1 + rnd(64), out);
                for (size_t k = 0; k < n; k++)
                    held.push_back({out[k], order});
            } else if (pm.try_alloc(order, &pfn)) {
                held.push_back({pfn, order});
            }
            if (!held.empty() && rnd(3) == 0) { // some go back: holes everywhere
                size_t k = rnd(held.size());
                pm.free(held[k].first, held[k].second);
                held[k] = held.back();
                held.pop_back();
            }
        }
        for (int i = 0; i < 200; i++) { // take() specific free blocks too
            auto blocks = pm.free_blocks(64);
            if (blocks.empty())
                break;
            const FreeBlock &fb = blocks[rnd(blocks.size())];
            pm.take(fb.pfn, fb.order);
            held.push_back({fb.pfn, fb.order});
        }
        CHECK(pm.check().empty(), pm.check());
        for (size_t i = held.size(); i > 1; i--)
            std::swap(held[i - 1], held[rnd(i)]);
        // Neighbours in PFN order now and then go back merged, as a teardown's runs do.
        budget = 0;
        for (size_t i = 0; i < held.size(); i++) {
            nr_checks++;
            try {
                pm.free_unchecked(held[i].first, held[i].second);
            } catch (const std::bad_alloc &) {
                CHECK(false, "free_unchecked allocated: block " +
                                 std::to_string(held[i].first) + " order " +
                                 std::to_string(held[i].second));
            }
        }
        budget = -1;
        CHECK(snapshot(pm) == fresh && pm.check().empty(), describe(pm, fresh));
        CHECK(pm.nr_owed_nodes() == 0, pm.dump());
    }
    std::printf("check_free_never_allocates: 6 rounds, every block given back with the "
                "host out of memory\n");
}

/*
 * check_merged_runs_never_allocate - blocks of one order (4 KiB to 32 MiB, so runs cross
 * whole groups and top-tier blocks), handed out as fallocate's walk takes them, after
 * some single pages (so not every run starts aligned), go back as a teardown gives them:
 * physically contiguous ones merged into one free_range_unchecked(), with every
 * allocation failing.
 */
static void check_merged_runs_never_allocate()
{
    for (unsigned order : {0u, 3u, 9u, 11u, 12u, 13u}) {
        PhysMem pm(uint64_t(1) << 21, 0, order);
        uint64_t pfn;
        for (int i = 0; i < 1000; i++)
            pm.try_alloc(0, &pfn);
        const Snapshot before = snapshot(pm);
        std::vector<uint64_t> pfns((uint64_t(1) << 20) >> order);
        for (size_t at = 0; at < pfns.size();)
            at += pm.alloc_many(order, std::min<size_t>(1024, pfns.size() - at), &pfns[at]);
        std::sort(pfns.begin(), pfns.end());
        budget = 0;
        uint64_t run = 0, nr = 0;
        try {
            for (uint64_t p : pfns) {
                if (nr && p == run + nr && nr < 40 * GROUP_PAGES) {
                    nr += uint64_t(1) << order;
                    continue;
                }
                if (nr)
                    pm.free_range_unchecked(run, nr);
                run = p;
                nr = uint64_t(1) << order;
            }
            pm.free_range_unchecked(run, nr);
        } catch (const std::bad_alloc &) {
            CHECK(false, "free_range_unchecked allocated, block order " + std::to_string(order));
        }
        budget = -1;
        CHECK(snapshot(pm) == before && pm.check().empty(), describe(pm, before));
    }
    std::printf("check_merged_runs_never_allocate: teardown runs of 6 block orders\n");
}

int main()
{
    check_free_never_allocates();
    check_merged_runs_never_allocate();
    check_groups_reopened();
    check_top_blocks();
    std::printf("test_oom: %lu checks passed\n", nr_checks);
    return 0;
}
