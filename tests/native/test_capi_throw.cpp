// SPDX-License-Identifier: MIT
// test_capi_throw.cpp - no C++ exception crosses the C ABI: a C++ hook that throws, and the
// host running out of memory (std::bad_alloc inside the core) under a lowered RLIMIT_AS,
// each come back as a status code, and the call that failed changed nothing.
#include <gmem.h>

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

static int checks;

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        checks++;                                                                             \
        if (!(cond)) {                                                                        \
            std::fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__,      \
                         __LINE__, #cond, gmem_last_error());                                 \
            std::exit(1);                                                                     \
        }                                                                                     \
    } while (0)

static uint64_t stat_of(gmem_file *f, const char *name)
{
    uint64_t v = 0;
    CHECK(gmem_file_stat(f, name, &v) == GMEM_OK);
    return v;
}

static void check_throwing_hooks()
{
    gmem_hooks h;
    gmem_hooks_init(&h);
    h.invalidate_start = [](void *, gmem_file *, uint64_t, uint64_t, unsigned) -> int {
        throw std::bad_alloc();
    };
    h.invalidate_end = [](void *, gmem_file *, uint64_t, uint64_t) -> int {
        throw std::runtime_error("the model of the IOMMU is confused");
    };
    h.reclaim = [](void *, gmem_file *, const gmem_pfn_range *, size_t) -> int { throw 42; };
    gmem_arch *a = nullptr;
    CHECK(gmem_arch_create("pkvm", &h, &a) == GMEM_OK);
    gmem_file_options o;
    gmem_file_options_init(&o);
    o.arch = a;
    o.folio_order = 2;
    gmem_file *f = nullptr;
    CHECK(gmem_file_create(16 * 4096, &o, &f) == GMEM_OK);
    gmem_arch_release(a);
    CHECK(gmem_file_get_pfn(f, 0, nullptr, nullptr) == GMEM_OK);
    CHECK(gmem_file_set_attributes(f, 0, 4, GMEM_SHARED, nullptr) == GMEM_ERR_HOOK);
    CHECK(std::strstr(gmem_last_error(), "invalidate_start threw std::bad_alloc"));
    CHECK(stat_of(f, "conversions") == 1); // completed
    CHECK(gmem_file_punch_hole(f, 0, 4) == GMEM_ERR_HOOK);
    CHECK(std::strstr(gmem_last_error(), "invalidate_start threw"));
    CHECK(stat_of(f, "folios_freed") == 1);
    // Violations are listed once each (the same failure again is not a new one).
    struct Seen {
        bool bad_alloc = false, runtime = false, unknown = false;
    } seen;
    size_t n = 0;
    CHECK(gmem_file_check(
              f,
              [](void *user, const gmem_violation *v) {
                  auto *s = static_cast<Seen *>(user);
                  s->bad_alloc |= !std::strcmp(v->detail, "invalidate_start threw std::bad_alloc");
                  s->runtime |= !std::strcmp(
                      v->detail, "invalidate_end threw the model of the IOMMU is confused");
                  s->unknown |= !std::strcmp(v->detail, "reclaim threw an exception");
              },
              &seen, &n) == GMEM_OK);
    CHECK(seen.bad_alloc && seen.runtime && seen.unknown && n >= 3);
    // A check callback that throws: caught as well.
    CHECK(gmem_file_check(
              f,
              [](void *, const gmem_violation *) { throw std::logic_error("a callback threw"); },
              nullptr, &n) == GMEM_ERR_INTERNAL);
    CHECK(std::strstr(gmem_last_error(), "a callback threw"));
    CHECK(gmem_file_release(f) == GMEM_ERR_HOOK); // close ran the throwing hooks once more
}

static void check_host_out_of_memory()
{
#if defined(__SANITIZE_ADDRESS__)
    std::puts("capi_throw: RLIMIT_AS check skipped under AddressSanitizer");
#else
    // 2**21 order-0 folios: little enough that the core does not ask the host first (its
    // estimate is below SMALL_REQUEST), far more than the 8 MiB the limit leaves.
    const uint64_t pages = uint64_t(1) << 21;
    gmem_file_options o;
    gmem_file_options_init(&o);
    gmem_physmem *pm = nullptr;
    CHECK(gmem_physmem_create(pages, 0, 0, &pm) == GMEM_OK);
    o.physmem = pm;
    gmem_file *f = nullptr;
    CHECK(gmem_file_create(pages * 4096, &o, &f) == GMEM_OK);
    unsigned long vm_pages = 0;
    FILE *statm = std::fopen("/proc/self/statm", "r");
    CHECK(statm && std::fscanf(statm, "%lu", &vm_pages) == 1);
    std::fclose(statm);
    rlimit old;
    CHECK(getrlimit(RLIMIT_AS, &old) == 0);
    rlimit low = old;
    low.rlim_cur = vm_pages * 4096 + (8u << 20);
    CHECK(setrlimit(RLIMIT_AS, &low) == 0);
    gmem_status s = gmem_file_fallocate(f, 0, pages);
    CHECK(setrlimit(RLIMIT_AS, &old) == 0);
    CHECK(s == GMEM_ERR_HOST_NOMEM);
    CHECK(std::strstr(gmem_last_error(), "std::bad_alloc"));
    uint64_t nr_free = 0;
    CHECK(gmem_physmem_nr_free(pm, &nr_free) == GMEM_OK);
    CHECK(nr_free == pages); // nothing taken
    CHECK(stat_of(f, "folios_allocated") == 0);
    CHECK(gmem_file_release(f) == GMEM_OK);
    gmem_physmem_release(pm);
#endif
}

int main()
{
    check_throwing_hooks();
    check_host_out_of_memory();
    std::printf("capi_throw: %d checks passed\n", checks);
    return 0;
}
