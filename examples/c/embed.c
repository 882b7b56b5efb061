/* SPDX-License-Identifier: MIT */
/*
 * embed.c - gmem embedded in a C simulator: a 4 MiB pKVM guest with 2 MiB folios goes
 * through guest faults, a share, a host pin that makes unsharing busy, populate, a memory
 * failure and teardown, under an arch of its own (C hooks over the built-in pKVM) that
 * counts its hook calls.  It prints the counters in the same fixed format as
 * examples/python/embed.py and examples/cpp/embed.cpp.
 */
#include <gmem.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

struct counts {
    uint64_t invalidate_start, invalidate_range, invalidate_end, reclaim_ranges;
};

static int on_invalidate_start(void *user, gmem_file *f, uint64_t start, uint64_t end,
                               unsigned kinds)
{
    (void)f, (void)start, (void)end, (void)kinds;
    ((struct counts *)user)->invalidate_start++;
    return 0;
}

static int on_invalidate_range(void *user, gmem_file *f, uint64_t start, uint64_t end,
                               unsigned kinds)
{
    (void)f, (void)start, (void)end, (void)kinds;
    ((struct counts *)user)->invalidate_range++;
    return 0;
}

static int on_invalidate_end(void *user, gmem_file *f, uint64_t start, uint64_t end)
{
    (void)f, (void)start, (void)end;
    ((struct counts *)user)->invalidate_end++;
    return 0;
}

static int on_reclaim(void *user, gmem_file *f, const gmem_pfn_range *ranges, size_t n)
{
    ((struct counts *)user)->reclaim_ranges += n;
    return gmem_base_reclaim(f, ranges, n); /* pKVM's own: scrub the pages */
}

/* Every call must succeed, except where the run expects an error. */
static void ok(gmem_status s, const char *what)
{
    if (s != GMEM_OK) {
        fprintf(stderr, "%s: %s: %s\n", what, gmem_status_name(s), gmem_last_error());
        exit(1);
    }
}

static void expect(gmem_status s, gmem_status want, const char *what)
{
    if (s != want) {
        fprintf(stderr, "%s: got %s, expected %s\n", what, gmem_status_name(s),
                gmem_status_name(want));
        exit(1);
    }
}

int main(void)
{
    struct counts c = {0, 0, 0, 0};
    gmem_hooks hooks;
    gmem_arch *arch;
    gmem_file_options opts;
    gmem_file *f;
    gmem_stat stats[32];
    size_t n, i, violations;
    uint64_t pfn, token, busy = 0;

    gmem_hooks_init(&hooks);
    hooks.name = "counting";
    hooks.config = GMEM_CONFIG_BASE | GMEM_CONFIG_INVALIDATE; /* pKVM's, plus INVALIDATE */
    hooks.user = &c;
    hooks.invalidate_start = on_invalidate_start;
    hooks.invalidate_range = on_invalidate_range;
    hooks.invalidate_end = on_invalidate_end;
    hooks.reclaim = on_reclaim;
    ok(gmem_arch_create("pkvm", &hooks, &arch), "arch");

    gmem_file_options_init(&opts);
    opts.flags = GMEM_FLAG_MMAP;
    opts.folio_order = 9;
    opts.arch = arch;
    opts.hook_design = "mainline";
    ok(gmem_file_create(4 << 20, &opts, &f), "create");

    ok(gmem_file_get_pfn(f, 0, &pfn, NULL), "get_pfn"); /* guest faults on private pages */
    ok(gmem_file_get_pfn(f, 600, &pfn, NULL), "get_pfn");
    ok(gmem_file_guest_write(f, 0, 1000), "guest_write");
    ok(gmem_file_guest_write(f, 600, 2000), "guest_write");
    ok(gmem_file_set_attributes(f, 512, 1024, GMEM_SHARED, NULL), "share");
    ok(gmem_file_host_fault(f, 600, &pfn), "host_fault");
    ok(gmem_file_host_write(f, 600, 3000), "host_write");
    ok(gmem_file_pin(f, 600, &pfn), "pin"); /* a device pins a shared page... */
    expect(gmem_file_set_attributes(f, 512, 1024, GMEM_PRIVATE, &busy), GMEM_ERR_BUSY,
           "unshare while pinned"); /* ...so unsharing is busy */
    printf("busy_index %" PRIu64 "\n", busy);
    ok(gmem_file_unpin(f, 600), "unpin");
    ok(gmem_file_set_attributes(f, 512, 1024, GMEM_PRIVATE, NULL), "unshare");
    ok(gmem_file_guest_read(f, 600, &token), "guest_read"); /* pKVM keeps contents */
    printf("guest_read %" PRIu64 "\n", token);
    ok(gmem_file_populate(f, 700, 1, 4000), "populate");
    ok(gmem_file_memory_failure(f, 0), "memory_failure");
    expect(gmem_file_get_pfn(f, 5, &pfn, NULL), GMEM_ERR_HWPOISON, "get_pfn on poison");
    printf("hwpoison_index %" PRIu64 "\n", gmem_last_error_index());
    ok(gmem_file_punch_hole(f, 0, 512), "punch_hole"); /* a fresh folio faults in next */
    ok(gmem_file_get_pfn(f, 5, &pfn, NULL), "get_pfn");
    printf("get_pfn_after_punch %" PRIu64 "\n", pfn);
    ok(gmem_file_close(f), "close");

    printf("hook invalidate_start %" PRIu64 "\n", c.invalidate_start);
    printf("hook invalidate_range %" PRIu64 "\n", c.invalidate_range);
    printf("hook invalidate_end %" PRIu64 "\n", c.invalidate_end);
    printf("hook reclaim_ranges %" PRIu64 "\n", c.reclaim_ranges);
    ok(gmem_file_stats(f, stats, 32, &n), "stats");
    for (i = 0; i < n && i < 32; i++)
        printf("stat %s %" PRIu64 "\n", stats[i].name, stats[i].value);
    ok(gmem_arch_stats(arch, stats, 32, &n), "arch stats");
    for (i = 0; i < n && i < 32; i++)
        printf("arch %s %" PRIu64 "\n", stats[i].name, stats[i].value);
    ok(gmem_file_check(f, NULL, NULL, &violations), "check");
    printf("violations %zu\n", violations);

    ok(gmem_file_release(f), "release");
    gmem_arch_release(arch);
    return 0;
}
