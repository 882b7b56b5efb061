/* SPDX-License-Identifier: MIT */
/*
 * test_capi.c - the C ABI from C: one check_<feature>() per behaviour of gmem.h.  Error
 * codes and messages, a failed call changing nothing, hooks through function pointers
 * (user pointer, config gating, base hooks, failures recorded), re-entrancy refused, the
 * options struct growing, stats and check.  Exits non-zero on the first failure.
 */
#include <gmem.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks;

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        checks++;                                                                             \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__, __LINE__, \
                    #cond, gmem_last_error());                                                \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)
#define OK(call) CHECK((call) == GMEM_OK)
#define FAILS(call, status, text)                                                             \
    do {                                                                                      \
        CHECK((call) == (status));                                                            \
        CHECK(strstr(gmem_last_error(), (text)) != NULL);                                     \
    } while (0)

static gmem_file *new_file(uint64_t pages, unsigned order, const char *arch_name,
                           gmem_arch *arch, uint64_t flags)
{
    gmem_file_options o;
    gmem_file *f = NULL;
    gmem_file_options_init(&o);
    o.folio_order = order;
    o.arch_name = arch_name;
    o.arch = arch;
    o.flags = flags;
    OK(gmem_file_create(pages * GMEM_PAGE_SIZE, &o, &f));
    return f;
}

static uint64_t stat_of(gmem_file *f, const char *name)
{
    uint64_t v = 0;
    OK(gmem_file_stat(f, name, &v));
    return v;
}

static void check_errors_name_their_argument(void)
{
    gmem_file *f = NULL;
    gmem_arch *a = NULL;
    gmem_file_options o;
    uint64_t v;

    FAILS(gmem_file_create(4096, NULL, NULL), GMEM_ERR_INVALID, "out: must not be NULL");
    FAILS(gmem_file_create(0, NULL, &f), GMEM_ERR_INVALID, "size: must be > 0");
    CHECK(f == NULL);
    gmem_file_options_init(&o);
    o.hook_design = "merged";
    FAILS(gmem_file_create(4096, &o, &f), GMEM_ERR_INVALID,
          "hook_design: must be \"mainline\", \"split\" or \"overloaded\"");
    o.hook_design = NULL;
    o.arch_name = "sev";
    FAILS(gmem_file_create(4096, &o, &f), GMEM_ERR_INVALID, "arch_name: unknown arch \"sev\"");
    o.arch_name = NULL;
    o.folio_order = 19;
    FAILS(gmem_file_create(4096, &o, &f), GMEM_ERR_INVALID, "folio_order: must be in 0..18");
    FAILS(gmem_arch_create("arm", NULL, &a), GMEM_ERR_INVALID, "base: unknown arch");
    CHECK(a == NULL);
    FAILS(gmem_file_fallocate(NULL, 0, 1), GMEM_ERR_INVALID, "file: must not be NULL");

    f = new_file(16, 0, NULL, NULL, GMEM_FLAG_MMAP);
    FAILS(gmem_file_fallocate(f, 3, 3), GMEM_ERR_INVALID, "start: must be < end");
    FAILS(gmem_file_set_attributes(f, 0, 4, 5, NULL), GMEM_ERR_INVALID, "attrs: must be");
    FAILS(gmem_file_get_pfn(f, 16, NULL, NULL), GMEM_ERR_INVALID, "index: must be < nr_pages");
    FAILS(gmem_file_unpin(f, 0), GMEM_ERR_INVALID, "");
    FAILS(gmem_file_stat(f, "folios", &v), GMEM_ERR_INVALID, "name: unknown counter \"folios\"");
    FAILS(gmem_file_guest_read(f, 0, NULL), GMEM_ERR_INVALID, "token: must not be NULL");
    CHECK(stat_of(f, "folios_allocated") == 0); /* none of it changed anything */
    OK(gmem_file_close(f));
    FAILS(gmem_file_get_pfn(f, 0, NULL, NULL), GMEM_ERR_INVALID, "closed guest_memfd");
    OK(gmem_file_release(f));
    OK(gmem_file_release(NULL));

    CHECK(strcmp(gmem_status_name(GMEM_ERR_BUSY), "GMEM_ERR_BUSY") == 0);
    CHECK(strcmp(gmem_status_name(99), "unknown") == 0);
    CHECK(gmem_abi_version() == GMEM_ABI_VERSION);
}

static void check_domain_errors(void)
{
    gmem_physmem *pm;
    gmem_file_options o;
    gmem_file *f;
    uint64_t pfn, idx = 0, off = 0, before, nr_free;
    gmem_status s;

    /* ConversionBusy: a pin makes to-private busy; the error index is the first page. */
    f = new_file(1024, 9, "pkvm", NULL, GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED);
    OK(gmem_file_pin(f, 600, &pfn));
    before = stat_of(f, "conversions");
    FAILS(gmem_file_set_attributes(f, 0, 1024, GMEM_PRIVATE, &idx), GMEM_ERR_BUSY, "EAGAIN");
    CHECK(idx == 512 && gmem_last_error_index() == 512);
    FAILS(gmem_file_set_memory_attributes2(f, 0, 1024 * 4096, GMEM_PRIVATE, 0, &off),
          GMEM_ERR_BUSY, "EAGAIN");
    CHECK(off == 512 * 4096);
    CHECK(stat_of(f, "conversions") == before);
    OK(gmem_file_unpin(f, 600));
    OK(gmem_file_set_attributes(f, 0, 1024, GMEM_PRIVATE, &idx));

    /* SigBus: the host may not touch a private page; HWPoison until punched out. */
    FAILS(gmem_file_host_fault(f, 3, &pfn), GMEM_ERR_SIGBUS, "");
    CHECK(gmem_last_error_index() == 3);
    OK(gmem_file_get_pfn(f, 5, &pfn, NULL));
    OK(gmem_file_memory_failure(f, 5));
    FAILS(gmem_file_get_pfn(f, 7, &pfn, NULL), GMEM_ERR_HWPOISON, "");
    CHECK(gmem_last_error_index() == 7);
    OK(gmem_file_punch_hole(f, 0, 512));
    OK(gmem_file_get_pfn(f, 7, &pfn, NULL));
    OK(gmem_file_release(f));

    /* OutOfMemory: the PhysMem is too small; fallocate frees what it took. */
    OK(gmem_physmem_create(8, 0, 0, &pm));
    gmem_file_options_init(&o);
    o.physmem = pm;
    OK(gmem_file_create(16 * 4096, &o, &f));
    FAILS(gmem_file_fallocate(f, 0, 16), GMEM_ERR_NOMEM, "");
    OK(gmem_physmem_nr_free(pm, &nr_free));
    CHECK(nr_free == 8);
    CHECK(stat_of(f, "folios_allocated") == 0);
    s = gmem_file_fallocate(f, 0, 8);
    CHECK(s == GMEM_OK);
    gmem_physmem_release(pm); /* the file keeps its PhysMem alive */
    OK(gmem_file_release(f));
}

/* ---- hooks ---- */

struct counts {
    int invalidate_start, invalidate_end, invalidate_range, reclaim_ranges, make_private;
    int destroyed, fail_reclaim, scrub, reenter;
    uint64_t attrs_seen;
};

static int on_invalidate_start(void *user, gmem_file *f, uint64_t start, uint64_t end,
                               unsigned kinds)
{
    struct counts *c = user;
    (void)end;
    (void)kinds;
    c->invalidate_start++;
    /* a hook may read its file... */
    if (gmem_file_get_attributes(f, start, &c->attrs_seen) != GMEM_OK)
        return 1;
    /* ...not change it */
    if (c->reenter) {
        gmem_status s = gmem_file_punch_hole(f, start, end);
        if (s != GMEM_ERR_REENTRANT)
            return 100;
        if (gmem_file_release(f) != GMEM_ERR_REENTRANT)
            return 101;
        return (int)s;
    }
    return 0;
}

static int on_invalidate_end(void *user, gmem_file *f, uint64_t start, uint64_t end)
{
    (void)f;
    (void)start;
    (void)end;
    ((struct counts *)user)->invalidate_end++;
    return 0;
}

static int on_invalidate_range(void *user, gmem_file *f, uint64_t start, uint64_t end,
                               unsigned kinds)
{
    (void)f;
    (void)start;
    (void)end;
    (void)kinds;
    ((struct counts *)user)->invalidate_range++;
    return 0;
}

static int on_reclaim(void *user, gmem_file *f, const gmem_pfn_range *r, size_t n)
{
    struct counts *c = user;
    c->reclaim_ranges += (int)n;
    if (c->fail_reclaim) {
        gmem_set_last_error("the simulated IOMMU said no");
        return 5;
    }
    return c->scrub ? (int)gmem_base_reclaim(f, r, n) : 0; /* pKVM's own: scrub */
}

static void on_destroy(void *user) { ((struct counts *)user)->destroyed++; }

static gmem_arch *counting_pkvm(struct counts *c, unsigned config)
{
    gmem_hooks h;
    gmem_arch *a = NULL;
    gmem_hooks_init(&h);
    h.name = "counting";
    h.config = config;
    h.user = c;
    h.invalidate_start = on_invalidate_start;
    h.invalidate_end = on_invalidate_end;
    h.invalidate_range = on_invalidate_range;
    h.reclaim = on_reclaim;
    h.destroy = on_destroy;
    OK(gmem_arch_create("pkvm", &h, &a));
    return a;
}

static void count_violation(void *user, const gmem_violation *v)
{
    int *n = user;
    (*n)++;
    if (strcmp(v->rule, "hook-raised") == 0)
        CHECK(strstr(v->text, "counting: hook-raised at index -, pfn -: ") == v->text);
}

static uint64_t arch_stat(gmem_arch *a, const char *name)
{
    gmem_stat st[8];
    size_t n, i;
    OK(gmem_arch_stats(a, st, 8, &n));
    CHECK(n <= 8);
    for (i = 0; i < n; i++)
        if (strcmp(st[i].name, name) == 0)
            return st[i].value;
    CHECK(!"no such arch stat");
    return 0;
}

static void check_hooks_through_function_pointers(void)
{
    struct counts c;
    gmem_arch *a;
    gmem_file *f;
    size_t n;
    int seen = 0;

    memset(&c, 0, sizeof(c));
    c.scrub = 1;
    a = counting_pkvm(&c, GMEM_CONFIG_BASE | GMEM_CONFIG_INVALIDATE);
    f = new_file(1024, 9, NULL, a, GMEM_FLAG_MMAP);
    OK(gmem_file_get_pfn(f, 0, NULL, NULL));
    OK(gmem_file_get_pfn(f, 600, NULL, NULL));
    OK(gmem_file_set_attributes(f, 512, 1024, GMEM_SHARED, NULL));
    CHECK(c.invalidate_start == 1 && c.invalidate_end == 1 && c.invalidate_range == 1);
    CHECK(c.attrs_seen == GMEM_PRIVATE); /* read from the hook, before the change */
    OK(gmem_file_punch_hole(f, 0, 512));
    CHECK(c.reclaim_ranges == 1);
    OK(gmem_file_close(f));
    CHECK(c.reclaim_ranges == 2 && c.invalidate_start == 3);
    CHECK(arch_stat(a, "pages_scrubbed") == 1024); /* the base hook ran */
    OK(gmem_file_check(f, count_violation, &seen, &n));
    CHECK(n == 0 && seen == 0);
    OK(gmem_file_release(f));
    CHECK(c.destroyed == 0); /* our handle still holds it */
    gmem_arch_release(a);
    CHECK(c.destroyed == 1);

    /* Without the base hook pKVM does not scrub: check() says so. */
    memset(&c, 0, sizeof(c));
    a = counting_pkvm(&c, GMEM_CONFIG_BASE | GMEM_CONFIG_INVALIDATE);
    gmem_arch_release(a); /* arch handle released first: nothing destroyed yet */
    CHECK(c.destroyed == 1);
    a = counting_pkvm(&c, GMEM_CONFIG_BASE | GMEM_CONFIG_INVALIDATE);
    f = new_file(512, 9, NULL, a, GMEM_FLAG_MMAP);
    gmem_arch_release(a);
    CHECK(c.destroyed == 1);
    OK(gmem_file_guest_write(f, 0, 77));
    OK(gmem_file_close(f));
    OK(gmem_file_check(f, NULL, NULL, &n));
    CHECK(n > 0);
    OK(gmem_file_release(f));
    CHECK(c.destroyed == 2);
}

static void check_a_failing_hook_is_reported_and_recorded(void)
{
    struct counts c;
    gmem_arch *a;
    gmem_file *f;
    size_t n;
    int seen = 0;

    memset(&c, 0, sizeof(c));
    c.fail_reclaim = 1;
    a = counting_pkvm(&c, GMEM_CONFIG_BASE | GMEM_CONFIG_INVALIDATE);
    f = new_file(1024, 9, NULL, a, GMEM_FLAG_MMAP);
    OK(gmem_file_get_pfn(f, 0, NULL, NULL));
    FAILS(gmem_file_punch_hole(f, 0, 512), GMEM_ERR_HOOK,
          "reclaim returned 5: the simulated IOMMU said no");
    CHECK(stat_of(f, "folios_freed") == 1); /* the operation completed */
    OK(gmem_file_check(f, count_violation, &seen, &n));
    CHECK(n >= 1 && seen == (int)n);
    /* the failure is reported once: the next call is clean */
    OK(gmem_file_get_pfn(f, 0, NULL, NULL));

    /* re-entrancy: the hook's own change is refused, and so is its release */
    c.fail_reclaim = 0;
    c.reenter = 1;
    FAILS(gmem_file_set_attributes(f, 0, 4, GMEM_SHARED, NULL), GMEM_ERR_HOOK,
          "invalidate_start returned 7: an arch hook may not release the file it serves");
    c.reenter = 0;
    OK(gmem_file_release(f));
    gmem_arch_release(a);
    CHECK(c.destroyed == 1);
}

static void check_hook_config_is_checked(void)
{
    struct counts c;
    gmem_hooks h;
    gmem_arch *a = NULL;
    gmem_file *f, *g = NULL;
    gmem_file_options o;

    memset(&c, 0, sizeof(c));
    gmem_hooks_init(&h);
    h.user = &c;
    h.invalidate_range = on_invalidate_range;
    FAILS(gmem_arch_create("pkvm", &h, &a), GMEM_ERR_INVALID,
          "hooks: invalidate_range is set but config does not enable it");
    h.size = 0;
    FAILS(gmem_arch_create("pkvm", &h, &a), GMEM_ERR_INVALID, "hooks: size must be set");
    h.size = sizeof(h);
    h.config = 1u << 10;
    FAILS(gmem_arch_create("pkvm", &h, &a), GMEM_ERR_INVALID, "config: unknown bits 0x400");
    h.config = GMEM_CONFIG_INVALIDATE; /* not BASE: pKVM's RECLAIM is off */
    h.destroy = on_destroy;
    OK(gmem_arch_create("pkvm", &h, &a));
    /* one arch serves one file */
    f = new_file(16, 0, NULL, a, 0);
    gmem_file_options_init(&o);
    o.arch = a;
    FAILS(gmem_file_create(4096, &o, &g), GMEM_ERR_INVALID, "arch: this Arch already serves");
    CHECK(g == NULL); /* *out is NULL after a failure */
    o.arch_name = "snp";
    FAILS(gmem_file_create(4096, &o, &g), GMEM_ERR_INVALID, "arch_name: must be NULL");
    OK(gmem_file_release(f));
    /* and another once that file is gone */
    f = new_file(16, 0, NULL, a, 0);
    OK(gmem_file_release(f));
    gmem_arch_release(a);
    CHECK(c.destroyed == 1);
    /* the base hooks check their arguments */
    f = new_file(16, 0, "snp", NULL, 0);
    {
        gmem_pfn_range r = {3, 2};
        FAILS(gmem_base_reclaim(f, &r, 1), GMEM_ERR_INVALID, "end_pfn: must be in (0x3, 0x10]");
        FAILS(gmem_base_invalidate_start(f, 0, 4, 0), GMEM_ERR_INVALID, "kinds: must be");
        FAILS(gmem_base_make_private(f, 15, 0, 2), GMEM_ERR_INVALID, "nr_pages: must be in 1..1");
    }
    OK(gmem_file_release(f));
}

/* make_private and post_populate over SNP; a hook is named by the file's design. */
struct snp_seen {
    uint64_t private_pages, populated_token;
    int populated_with_token, fail;
};

static int on_make_private(void *user, gmem_file *f, uint64_t index, uint64_t pfn,
                           uint64_t nr_pages)
{
    struct snp_seen *s = user;
    s->private_pages += nr_pages;
    if (s->fail)
        return 3;
    return (int)gmem_base_make_private(f, index, pfn, nr_pages); /* the RMP update */
}

static int on_post_populate(void *user, gmem_file *f, uint64_t index, uint64_t pfn,
                            int has_token, uint64_t token)
{
    struct snp_seen *s = user;
    s->populated_with_token = has_token;
    s->populated_token = token;
    return (int)gmem_base_post_populate(f, index, pfn, has_token, token);
}

static void check_hooks_are_named_by_design(void)
{
    static const char *const designs[] = {"mainline", "split"};
    int d;
    for (d = 0; d < 2; d++) {
        struct snp_seen s;
        gmem_hooks h;
        gmem_arch *a;
        gmem_file_options o;
        gmem_file *f;
        memset(&s, 0, sizeof(s));
        gmem_hooks_init(&h);
        h.user = &s;
        h.make_private = on_make_private;
        h.post_populate = on_post_populate;
        OK(gmem_arch_create("snp", &h, &a)); /* SNP's config: CONVERT, RECLAIM, POPULATE */
        gmem_file_options_init(&o);
        o.arch = a;
        o.folio_order = 9;
        o.hook_design = designs[d];
        OK(gmem_file_create(4 << 20, &o, &f));
        gmem_arch_release(a);
        OK(gmem_file_populate(f, 600, 1, 0x5eed));
        CHECK(s.populated_with_token == 1 && s.populated_token == 0x5eed);
        OK(gmem_file_get_pfn(f, 0, NULL, NULL));
        CHECK(s.private_pages == 512);
        s.fail = 1;
        FAILS(gmem_file_get_pfn(f, 1, NULL, NULL), GMEM_ERR_HOOK,
              d == 0 ? "make_private returned 3" : "prepare returned 3");
        CHECK(s.private_pages == 1024);
        OK(gmem_file_release(f));
    }
}

static void check_options_grow_compatibly(void)
{
    struct {
        gmem_file_options o;
        uint64_t future[2];
    } bigger;
    gmem_file_options small;
    gmem_file *f = NULL;
    uint64_t nr;

    memset(&bigger, 0, sizeof(bigger));
    gmem_file_options_init(&bigger.o);
    bigger.o.size = sizeof(bigger); /* a newer caller whose new fields are zero */
    OK(gmem_file_create(8192, &bigger.o, &f));
    OK(gmem_file_nr_pages(f, &nr));
    CHECK(nr == 2);
    OK(gmem_file_release(f));
    bigger.future[1] = 1;
    FAILS(gmem_file_create(8192, &bigger.o, &f), GMEM_ERR_INVALID,
          "options: has fields this library does not know");
    /* the huge-folio policy, and a bad one named */
    gmem_file_options_init(&bigger.o);
    bigger.future[1] = 0;
    bigger.o.folio_order = 1;
    bigger.o.huge_policy = "hugetlb";
    bigger.o.flags = GMEM_FLAG_MMAP;
    OK(gmem_file_create(16384, &bigger.o, &f));
    {
        uint64_t pfn, splits = 0, merges = 0;
        OK(gmem_file_fallocate(f, 0, 4));
        OK(gmem_file_set_attributes(f, 1, 2, GMEM_SHARED, NULL)); /* split on share */
        OK(gmem_file_host_fault(f, 1, &pfn));
        OK(gmem_file_set_attributes(f, 1, 2, GMEM_PRIVATE, NULL)); /* merged back */
        OK(gmem_file_stat(f, "folio_splits", &splits));
        OK(gmem_file_stat(f, "folio_merges", &merges));
        CHECK(splits == 1 && merges == 1);
    }
    OK(gmem_file_release(f));
    bigger.o.huge_policy = "thp";
    FAILS(gmem_file_create(16384, &bigger.o, &f), GMEM_ERR_INVALID,
          "huge_policy: must be \"none\" or \"hugetlb\", got \"thp\"");
    bigger.o.huge_policy = "hugetlb";
    bigger.o.folio_order = 0;
    FAILS(gmem_file_create(16384, &bigger.o, &f), GMEM_ERR_INVALID,
          "folio_order: huge_policy 'hugetlb' needs huge folios");
    /* an older caller that knew only size, flags and folio_order */
    memset(&small, 0xff, sizeof(small));
    small.size = offsetof(gmem_file_options, folio_order) + sizeof(unsigned);
    small.flags = GMEM_FLAG_INIT_SHARED;
    small.folio_order = 1;
    OK(gmem_file_create(8192, &small, &f));
    {
        uint64_t attrs = 1;
        OK(gmem_file_get_attributes(f, 0, &attrs));
        CHECK(attrs == GMEM_SHARED);
    }
    OK(gmem_file_release(f));
    small.size = 0;
    FAILS(gmem_file_create(8192, &small, &f), GMEM_ERR_INVALID, "options: size must be set");
}

static void check_stats_and_ranges(void)
{
    gmem_file *f = new_file(1024, 9, "snp", NULL, 0);
    gmem_stat st[32];
    gmem_pfn_range r[4];
    size_t n, total;

    OK(gmem_file_stats(f, NULL, 0, &total));
    CHECK(total >= 15);
    OK(gmem_file_stats(f, st, 2, &n));
    CHECK(n == total && strcmp(st[0].name, "folios_allocated") == 0);
    OK(gmem_file_fallocate(f, 0, 1024));
    OK(gmem_file_stats(f, st, 32, &n));
    CHECK(st[0].value == 2);
    OK(gmem_file_pfn_ranges(f, 100, 700, NULL, 0, &n));
    CHECK(n == 2);
    OK(gmem_file_pfn_ranges(f, 100, 700, r, 4, &n));
    CHECK(r[0].start_pfn == 100 && r[0].end_pfn == 512 && r[1].end_pfn == 700);
    OK(gmem_file_populate(f, 3, 1, 0xabc));
    {
        uint64_t t;
        OK(gmem_file_guest_read(f, 3, &t));
        CHECK(t == 0xabc);
    }
    CHECK(stat_of(f, "pages_populated") == 1);
    OK(gmem_file_release(f));
}

/* Threads sharing one file: each converts, writes and reads its own 2 MiB folio, while
 * the others do the same; every call takes the PhysMem's lock. */
enum { NR_THREADS = 4, ROUNDS = 2000 };

struct worker {
    gmem_file *f;
    uint64_t first;
    int errors;
};

static void *work(void *arg)
{
    struct worker *w = arg;
    uint64_t i, r, token;
    for (r = 0; r < ROUNDS; r++) {
        for (i = 0; i < 8; i++) {
            uint64_t index = w->first + i * 61;
            w->errors += gmem_file_guest_write(w->f, index, r * 1000 + i) != GMEM_OK;
            w->errors += gmem_file_guest_read(w->f, index, &token) != GMEM_OK;
            w->errors += token != r * 1000 + i;
        }
        w->errors += gmem_file_set_attributes(w->f, w->first, w->first + 512, GMEM_SHARED,
                                              NULL) != GMEM_OK;
        w->errors += gmem_file_host_write(w->f, w->first + 1, r) != GMEM_OK;
        w->errors += gmem_file_set_attributes(w->f, w->first, w->first + 512, GMEM_PRIVATE,
                                              NULL) != GMEM_OK;
        if (r % 50 == 49)
            w->errors += gmem_file_punch_hole(w->f, w->first, w->first + 512) != GMEM_OK;
    }
    return NULL;
}

static void check_threads_share_a_file(void)
{
    gmem_file *f = new_file(NR_THREADS * 512, 9, "pkvm", NULL, GMEM_FLAG_MMAP);
    pthread_t tid[NR_THREADS];
    struct worker w[NR_THREADS];
    size_t n;
    int t;

    for (t = 0; t < NR_THREADS; t++) {
        w[t].f = f;
        w[t].first = (uint64_t)t * 512;
        w[t].errors = 0;
        CHECK(pthread_create(&tid[t], NULL, work, &w[t]) == 0);
    }
    for (t = 0; t < NR_THREADS; t++) {
        CHECK(pthread_join(tid[t], NULL) == 0);
        CHECK(w[t].errors == 0);
    }
    CHECK(stat_of(f, "conversions") == 2 * NR_THREADS * ROUNDS);
    CHECK(stat_of(f, "folios_freed") == NR_THREADS * (ROUNDS / 50));
    OK(gmem_file_close(f));
    OK(gmem_file_check(f, NULL, NULL, &n));
    CHECK(n == 0);
    OK(gmem_file_release(f));
}

int main(void)
{
    check_errors_name_their_argument();
    check_domain_errors();
    check_hooks_through_function_pointers();
    check_a_failing_hook_is_reported_and_recorded();
    check_hook_config_is_checked();
    check_hooks_are_named_by_design();
    check_options_grow_compatibly();
    check_stats_and_ranges();
    check_threads_share_a_file();
    printf("capi: %d checks passed\n", checks);
    return 0;
}
