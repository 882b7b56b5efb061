/* SPDX-License-Identifier: MIT */
/*
 * gmem.h - the C ABI of gmem: a guest_memfd model for C simulators and plugins.
 *
 * DOC: the C ABI
 *
 * Three opaque handles, each created by a gmem_*_create() and released by its
 * gmem_*_release():
 *
 *     gmem_physmem   modelled physical memory (PFNs, page contents), shared by files
 *     gmem_arch      an architecture: a built-in model, or your hooks over one
 *     gmem_file      one guest_memfd file
 *
 * A file keeps its PhysMem and its arch alive: release your handles whenever you like.
 * A create function that fails sets its *out to NULL.
 *
 * Every function returns a gmem_status: GMEM_OK, or an error code with a message for the
 * calling thread in gmem_last_error() (it names the argument and the allowed values, as
 * the Python API's exceptions do).  A call that fails changes nothing and calls no hook,
 * except GMEM_ERR_HOOK: the operation completed, but one of your hooks failed.  No C++
 * exception ever leaves the library, not even std::bad_alloc.
 *
 * Ranges are half-open, [start, end), in pages (index) or PFNs, as in the Python API.
 *
 * Threads: every call takes the lock of the file's PhysMem, so threads may share files.
 * A hook runs with that lock held and may call gmem_file_* functions that read its own
 * file (and may change other files of the same PhysMem); changing its own file gets
 * GMEM_ERR_REENTRANT.  A hook must not wait for a file on another PhysMem that a second
 * thread may hold while waiting for this one (that would deadlock).
 */
#ifndef GMEM_H
#define GMEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(GMEM_C_BUILD)
#define GMEM_API __attribute__((visibility("default")))
#else
#define GMEM_API
#endif

/* The ABI version this header describes; gmem_abi_version() is the library's. */
#define GMEM_ABI_VERSION 1

#define GMEM_PAGE_SIZE 4096u
#define GMEM_SHARED 0u
#define GMEM_PRIVATE 8u /* KVM_MEMORY_ATTRIBUTE_PRIVATE */
#define GMEM_FLAG_MMAP 1u
#define GMEM_FLAG_INIT_SHARED 2u
#define GMEM_FILTER_SHARED 1u
#define GMEM_FILTER_PRIVATE 2u
#define GMEM_NO_PFN UINT64_MAX
#define GMEM_FOLIO_BATCH_SIZE 31u /* at most this many ranges per range-hook call */

/* Hook config bits (the merged kernel's names, and the June 2026 thread's). */
#define GMEM_CONFIG_PREPARE 1u
#define GMEM_CONFIG_FREE 2u
#define GMEM_CONFIG_FREE_ON_SHARED_CONVERSION 4u
#define GMEM_CONFIG_INVALIDATE 8u
#define GMEM_CONFIG_POPULATE 16u
#define GMEM_CONFIG_CONVERT (GMEM_CONFIG_PREPARE | GMEM_CONFIG_FREE_ON_SHARED_CONVERSION)
#define GMEM_CONFIG_RECLAIM GMEM_CONFIG_FREE
/* In gmem_hooks.config: the base model's config, plus the other bits given. */
#define GMEM_CONFIG_BASE 0x80000000u

typedef enum gmem_status {
    GMEM_OK = 0,
    GMEM_ERR_INVALID = 1,     /* a bad argument (EINVAL; Python: ValueError) */
    GMEM_ERR_BUSY = 2,        /* ConversionBusy (EAGAIN): pinned or mapped folio */
    GMEM_ERR_SIGBUS = 3,      /* SigBus: the host may not access the page */
    GMEM_ERR_HWPOISON = 4,    /* HWPoison (EHWPOISON): memory failure on the folio */
    GMEM_ERR_NOMEM = 5,       /* OutOfMemory (ENOMEM): the PhysMem ran out */
    GMEM_ERR_HOST_NOMEM = 6,  /* the host process ran out of memory (MemoryError) */
    GMEM_ERR_REENTRANT = 7,   /* a hook changing its own file (RuntimeError) */
    GMEM_ERR_HOOK = 8,        /* the operation completed, but a hook failed (see check) */
    GMEM_ERR_INTERNAL = 9     /* anything else: a bug in gmem, please report it */
} gmem_status;

typedef struct gmem_physmem gmem_physmem;
typedef struct gmem_arch gmem_arch;
typedef struct gmem_file gmem_file;

typedef struct gmem_pfn_range {
    uint64_t start_pfn, end_pfn;
} gmem_pfn_range;

/* ---- errors and versions --------------------------------------------------------- */

/* The message of the last failed call on this thread ("" if none); valid until the next
 * gmem call on this thread. */
GMEM_API const char *gmem_last_error(void);
/* The page index of this thread's last GMEM_ERR_BUSY, GMEM_ERR_SIGBUS or GMEM_ERR_HWPOISON
 * (Python's ConversionBusy.error_index, SigBus.index, HWPoison.index). */
GMEM_API uint64_t gmem_last_error_index(void);
/* "GMEM_OK", "GMEM_ERR_BUSY", ...; "unknown" for a code not in gmem_status. */
GMEM_API const char *gmem_status_name(int status);
GMEM_API int gmem_abi_version(void);
/* Set this thread's message: a hook says why it fails before it returns non-zero. */
GMEM_API void gmem_set_last_error(const char *msg);

/* ---- PhysMem --------------------------------------------------------------------- */

GMEM_API gmem_status gmem_physmem_create(uint64_t nr_pages, uint64_t base_pfn, uint64_t seed,
                                         gmem_physmem **out);
GMEM_API void gmem_physmem_release(gmem_physmem *pm);
GMEM_API gmem_status gmem_physmem_read(gmem_physmem *pm, uint64_t pfn, uint64_t *token);
GMEM_API gmem_status gmem_physmem_write(gmem_physmem *pm, uint64_t pfn, uint64_t token);
GMEM_API gmem_status gmem_physmem_nr_free(gmem_physmem *pm, uint64_t *nr_free);

/* ---- Arch ------------------------------------------------------------------------ */

/*
 * Your hooks, under the merged kernel's names (the Python Arch's hooks).  Each is
 * optional: NULL keeps the base model's.  Each returns 0, or non-zero for a failure:
 * the operation cannot stop after its point of no return, so it completes, check()
 * reports a "hook-raised" violation, and the operation returns GMEM_ERR_HOOK (the first
 * failure's message, with gmem_last_error() as the hook left it, is the call's message).
 * A hook runs only where config enables it, as in the kernel:
 *
 *     make_private      guest fault on a private index    CONVERT (PREPARE)
 *     make_shared       to-shared conversion ("mainline",
 *                       "split" designs)                  CONVERT (FREE_ON_SHARED_CONVERSION)
 *     reclaim           a folio leaves the page cache;
 *                       "overloaded": also to-shared      RECLAIM (FREE)
 *     invalidate_range  after invalidate_start, "mainline" INVALIDATE
 *     post_populate     gmem_file_populate                POPULATE
 *     invalidate_start, invalidate_end                    always
 *
 * make_shared and reclaim get the clamped PFN ranges of one batch of up to
 * GMEM_FOLIO_BATCH_SIZE folios.  A hook may call the base model's own hook through
 * gmem_base_*() (Python's super()).
 */
typedef struct gmem_hooks {
    size_t size;        /* sizeof(gmem_hooks); gmem_hooks_init() sets it (grows as options do) */
    const char *name;   /* the arch's name in violations; NULL: the base's */
    unsigned config;    /* GMEM_CONFIG_* bits, or GMEM_CONFIG_BASE | extra bits */
    void *user;         /* passed to every hook */
    int (*make_private)(void *user, gmem_file *file, uint64_t index, uint64_t pfn,
                        uint64_t nr_pages);
    int (*make_shared)(void *user, gmem_file *file, const gmem_pfn_range *ranges, size_t n);
    int (*reclaim)(void *user, gmem_file *file, const gmem_pfn_range *ranges, size_t n);
    int (*invalidate_range)(void *user, gmem_file *file, uint64_t start, uint64_t end,
                            unsigned kinds);
    int (*invalidate_start)(void *user, gmem_file *file, uint64_t start, uint64_t end,
                            unsigned kinds);
    int (*invalidate_end)(void *user, gmem_file *file, uint64_t start, uint64_t end);
    int (*post_populate)(void *user, gmem_file *file, uint64_t index, uint64_t pfn,
                         int has_token, uint64_t token);
    /* Called once when the arch is destroyed (its last handle and file are gone). */
    void (*destroy)(void *user);
} gmem_hooks;

/* All hooks NULL, config GMEM_CONFIG_BASE, size set. */
GMEM_API void gmem_hooks_init(gmem_hooks *hooks);

/* @base: "sw_protected" (also NULL), "snp", "tdx" or "pkvm"; @hooks: NULL for the
 * built-in model itself.  The hooks are copied. */
GMEM_API gmem_status gmem_arch_create(const char *base, const gmem_hooks *hooks,
                                      gmem_arch **out);
GMEM_API void gmem_arch_release(gmem_arch *arch);
/* The arch's counters (SNP: rmp_updates, psmash, ...; pKVM: pages_scrubbed, ...), sorted
 * by name: see gmem_file_stats for the calling convention. */
typedef struct gmem_stat {
    const char *name; /* static storage: valid for the life of the process */
    uint64_t value;
} gmem_stat;
GMEM_API gmem_status gmem_arch_stats(gmem_arch *arch, gmem_stat *out, size_t cap,
                                     size_t *count);

/* The base model's hooks, for a hook of yours (Python's super()); they check their
 * arguments as every call does: PFNs inside the file's PhysMem, ranges inside the file. */
GMEM_API gmem_status gmem_base_make_private(gmem_file *file, uint64_t index, uint64_t pfn,
                                            uint64_t nr_pages);
GMEM_API gmem_status gmem_base_make_shared(gmem_file *file, const gmem_pfn_range *ranges,
                                           size_t n);
GMEM_API gmem_status gmem_base_reclaim(gmem_file *file, const gmem_pfn_range *ranges, size_t n);
GMEM_API gmem_status gmem_base_invalidate_range(gmem_file *file, uint64_t start, uint64_t end,
                                                unsigned kinds);
GMEM_API gmem_status gmem_base_invalidate_start(gmem_file *file, uint64_t start, uint64_t end,
                                                unsigned kinds);
GMEM_API gmem_status gmem_base_invalidate_end(gmem_file *file, uint64_t start, uint64_t end);
GMEM_API gmem_status gmem_base_post_populate(gmem_file *file, uint64_t index, uint64_t pfn,
                                             int has_token, uint64_t token);

/* ---- GuestMemfd ------------------------------------------------------------------ */

/*
 * How to create a file.  Initialise with gmem_file_options_init(), then set fields.  The
 * library reads only the first @size bytes (older callers get defaults for later
 * fields); fields a newer header adds after these must be zero for an older library.
 */
typedef struct gmem_file_options {
    size_t size;             /* sizeof(gmem_file_options) */
    uint64_t flags;          /* GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED */
    unsigned folio_order;    /* 0..18 */
    const char *arch_name;   /* a built-in arch (NULL: "sw_protected"), if arch is NULL */
    gmem_arch *arch;         /* or an arch of yours; one arch serves one file */
    const char *hook_design; /* "mainline" (NULL), "split" or "overloaded" */
    gmem_physmem *physmem;   /* NULL: a PhysMem of the file's own */
    const char *huge_policy; /* "none" (NULL) or "hugetlb" (docs/model.md, Huge folios) */
} gmem_file_options;

GMEM_API void gmem_file_options_init(gmem_file_options *options);
/* @options NULL: the defaults. */
GMEM_API gmem_status gmem_file_create(uint64_t size_bytes, const gmem_file_options *options,
                                      gmem_file **out);
/* Releases the handle; an open file is closed first (its hooks run) and the close's
 * status returned.  From a hook of its own file: GMEM_ERR_REENTRANT, nothing released. */
GMEM_API gmem_status gmem_file_release(gmem_file *file);
GMEM_API gmem_status gmem_file_close(gmem_file *file);
GMEM_API gmem_status gmem_file_nr_pages(gmem_file *file, uint64_t *nr_pages);

GMEM_API gmem_status gmem_file_fallocate(gmem_file *file, uint64_t start, uint64_t end);
GMEM_API gmem_status gmem_file_punch_hole(gmem_file *file, uint64_t start, uint64_t end);
GMEM_API gmem_status gmem_file_add_folio(gmem_file *file, uint64_t index, unsigned order,
                                         uint64_t pfn);
/* Guest fault: the page's PFN and the order of the block KVM may map (either may be NULL). */
GMEM_API gmem_status gmem_file_get_pfn(gmem_file *file, uint64_t index, uint64_t *pfn,
                                       unsigned *max_order);
GMEM_API gmem_status gmem_file_host_fault(gmem_file *file, uint64_t index, uint64_t *pfn);
GMEM_API gmem_status gmem_file_guest_read(gmem_file *file, uint64_t index, uint64_t *token);
GMEM_API gmem_status gmem_file_guest_write(gmem_file *file, uint64_t index, uint64_t token);
GMEM_API gmem_status gmem_file_host_read(gmem_file *file, uint64_t index, uint64_t *token);
GMEM_API gmem_status gmem_file_host_write(gmem_file *file, uint64_t index, uint64_t token);
GMEM_API gmem_status gmem_file_pin(gmem_file *file, uint64_t index, uint64_t *pfn);
GMEM_API gmem_status gmem_file_unpin(gmem_file *file, uint64_t index);
GMEM_API gmem_status gmem_file_unpin_pfn(gmem_file *file, uint64_t pfn);
/* Conversion.  GMEM_ERR_BUSY sets *error_index (may be NULL) to the first page that
 * could not be converted (ConversionBusy.error_index). */
GMEM_API gmem_status gmem_file_set_attributes(gmem_file *file, uint64_t start, uint64_t end,
                                              uint64_t attrs, uint64_t *error_index);
/* The uapi form, in bytes; GMEM_ERR_BUSY sets *error_offset (bytes). */
GMEM_API gmem_status gmem_file_set_memory_attributes2(gmem_file *file, uint64_t offset,
                                                      uint64_t size, uint64_t attributes,
                                                      uint64_t flags, uint64_t *error_offset);
GMEM_API gmem_status gmem_file_get_attributes(gmem_file *file, uint64_t index,
                                              uint64_t *attrs);
/* kvm_gmem_populate: a private page filled with @token (@has_token), or in place. */
GMEM_API gmem_status gmem_file_populate(gmem_file *file, uint64_t index, int has_token,
                                        uint64_t token);
GMEM_API gmem_status gmem_file_memory_failure(gmem_file *file, uint64_t index);
/* The clamped PFN ranges of [start, end): *count is how many; written to @out only when
 * @cap is at least that (call with cap 0 to size the buffer). */
GMEM_API gmem_status gmem_file_pfn_ranges(gmem_file *file, uint64_t start, uint64_t end,
                                          gmem_pfn_range *out, size_t cap, size_t *count);

/*
 * The file's counters (the Python stats dict, in its order): *count is how many there
 * are; the first min(cap, *count) are written to @out.
 */
GMEM_API gmem_status gmem_file_stats(gmem_file *file, gmem_stat *out, size_t cap,
                                     size_t *count);
/* One counter by name; GMEM_ERR_INVALID for a name that is not one. */
GMEM_API gmem_status gmem_file_stat(gmem_file *file, const char *name, uint64_t *value);

typedef struct gmem_violation {
    const char *arch, *rule, *detail;
    uint64_t index, pfn; /* GMEM_NO_PFN where not applicable */
    const char *text;    /* the whole violation in one line, as Python prints it */
} gmem_violation;
/* Check every contract: @fn (may be NULL) gets each violation in turn (valid during the
 * call; the file is not locked, so @fn may call gmem); *count is how many there are. */
GMEM_API gmem_status gmem_file_check(gmem_file *file,
                                     void (*fn)(void *user, const gmem_violation *v),
                                     void *user, size_t *count);
/* The PhysMem the file lives in, as a new handle to release. */
GMEM_API gmem_status gmem_file_physmem(gmem_file *file, gmem_physmem **out);

#ifdef __cplusplus
}
#endif

#endif /* GMEM_H */
