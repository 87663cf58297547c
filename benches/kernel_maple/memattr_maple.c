// SPDX-License-Identifier: GPL-2.0+
/*
 * memattr_maple: replays a stream of range stores on the kernel's own maple
 * tree (Linux 6.1 lib/maple_tree.c), compiled in user space against the
 * kernel's radix-tree/maple test harness (tools/testing/radix-tree), the way
 * that harness's maple.c is: it #includes lib/maple_tree.c and links the
 * harness's core objects (slab shim, urcu). Built by build.sh, outside git.
 *
 * Stream file (input): little-endian u64 triples (start, end, value), 24 bytes
 * each, no header: store value over the gfns [start, end) (end exclusive),
 * value 0 meaning "erase" (shared). Each triple becomes
 *
 *     mtree_store_range(&tree, start, end - 1,
 *                       value ? xa_mk_value(value) : NULL, GFP_KERNEL);
 *
 * on a plain tree (mt_init_flags(&tree, 0): no MT_FLAGS_ALLOC_RANGE, no RCU
 * mode), the tree the issue measures.
 *
 * Runs file (output, of the last round): the final contents as triples of
 * the same format (start, end exclusive, value), in gfn order, non-zero values
 * only, adjacent equal values merged. Merging is needed for a per-gfn
 * comparison: 6.1's plain mtree_store_range does not coalesce a new range
 * with equal neighbours, the RangeTree does.
 *
 * Usage: memattr_maple STREAM RUNS_OUT [ROUNDS] [--harness-nowait]
 *                      [--slab=harness|freelist]
 *
 * Each round stores the whole stream into a fresh tree; only the store loop
 * is timed (CLOCK_MONOTONIC). One line per round on stdout:
 *
 *     round=R stores=N seconds=S stores_per_s=X nodes=K node_bytes=B slab=harness
 *
 * nodes is the maple nodes live after the loop (the node source's count of
 * maple_node objects handed out and not freed), node_bytes
 * sizeof(struct maple_node). After the last round, one more line:
 *
 *     runs=M entries=E
 *
 * M runs written, from E entries in the tree (non-NULL, before merging).
 *
 * --harness-nowait keeps the harness's default of failing every allocation
 * made without __GFP_DIRECT_RECLAIM: each store that needs nodes then fails
 * its GFP_NOWAIT attempt, allocates with GFP_KERNEL in mas_nomem() and walks
 * again. Without it (the default), GFP_NOWAIT allocations succeed, as they
 * almost always do from the kernel's slab.
 *
 * --slab picks where maple nodes come from. "harness" (the default) is the
 * harness's kmem_cache shim as built: a mutex, and for an aligned cache such
 * as maple_node one posix_memalign() per node (per node of a bulk request,
 * each of bulk size x 256 bytes) and a poisoning memset + free() per freed
 * node; at 1 TiB about a third of the run is in libc malloc. "freelist"
 * serves maple_node from a lock-free LIFO free list refilled 64 nodes at a
 * time, closer to SLUB's per-cpu fast path, so that the number measures the
 * tree rather than the test allocator. Both are linked in; --wrap (see
 * build.sh) routes the harness's kmem_cache calls through the wrappers below.
 * The tree code is the same in both.
 */

#include "test.h"
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <limits.h>
#include "linux/init.h"

#define module_init(x)
#define module_exit(x)
#define MODULE_AUTHOR(x)
#define MODULE_LICENSE(x)
#define dump_stack()	assert(0)

/*
 * Debian's 6.1 stable (6.1.172) lib/maple_tree.c uses the kernel's
 * `fallthrough` pseudo-keyword, which tools/include does not define: the
 * harness's own maple.c fails to build there on this one word. Define it as
 * include/linux/compiler_attributes.h does rather than patch kernel source.
 */
#ifndef fallthrough
#define fallthrough __attribute__((__fallthrough__))
#endif

/* Production code paths: no CONFIG_DEBUG_MAPLE_TREE (it adds checks). */
#include "../../../lib/maple_tree.c"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the stream format is little-endian u64; this driver reads it raw"
#endif

/* The harness slab (tools/testing/radix-tree/linux.c). */
extern void kmem_cache_set_non_kernel(struct kmem_cache *, unsigned int);
extern unsigned long kmem_cache_nr_allocated(struct kmem_cache *);

/*
 * The node source. Wrapped (ld --wrap) so that every caller, maple_tree.c
 * included, goes through here; caches other than maple_node, and the
 * "harness" choice, go on to the harness's own functions (__real_*).
 */
void *__real_kmem_cache_alloc_lru(struct kmem_cache *, struct list_lru *, int);
void __real_kmem_cache_free(struct kmem_cache *, void *);
int __real_kmem_cache_alloc_bulk(struct kmem_cache *, gfp_t, size_t, void **);
void __real_kmem_cache_free_bulk(struct kmem_cache *, size_t, void **);

#define FREELIST_REFILL 64

static bool freelist_slab;	/* --slab=freelist */
static bool harness_nowait;	/* --harness-nowait */
static void *freelist;		/* free nodes, linked through their first word */
static unsigned long freelist_live;	/* nodes handed out and not freed */

static bool freelist_for(struct kmem_cache *cachep)
{
	return freelist_slab && cachep == maple_node_cache;
}

static void *freelist_alloc(gfp_t gfp)
{
	void *p;

	/* The harness's rule for allocations that may not sleep. */
	if (harness_nowait && !(gfp & __GFP_DIRECT_RECLAIM))
		return NULL;
	if (!freelist) {
		size_t sz = sizeof(struct maple_node);
		char *chunk = aligned_alloc(sz, FREELIST_REFILL * sz);

		if (!chunk)
			return NULL;
		for (int i = FREELIST_REFILL - 1; i >= 0; i--) {
			*(void **)(chunk + i * sz) = freelist;
			freelist = chunk + i * sz;
		}
	}
	p = freelist;
	freelist = *(void **)p;
	freelist_live++;
	if (gfp & __GFP_ZERO)
		memset(p, 0, sizeof(struct maple_node));
	return p;
}

static void freelist_free(void *p)
{
	*(void **)p = freelist;
	freelist = p;
	freelist_live--;
}

void *__wrap_kmem_cache_alloc_lru(struct kmem_cache *cachep,
				  struct list_lru *lru, int gfp)
{
	if (!freelist_for(cachep))
		return __real_kmem_cache_alloc_lru(cachep, lru, gfp);
	return freelist_alloc(gfp);
}

void __wrap_kmem_cache_free(struct kmem_cache *cachep, void *objp)
{
	if (!freelist_for(cachep))
		return __real_kmem_cache_free(cachep, objp);
	freelist_free(objp);
}

int __wrap_kmem_cache_alloc_bulk(struct kmem_cache *cachep, gfp_t gfp,
				 size_t size, void **list)
{
	if (!freelist_for(cachep))
		return __real_kmem_cache_alloc_bulk(cachep, gfp, size, list);
	for (size_t i = 0; i < size; i++) {
		list[i] = freelist_alloc(gfp);
		if (!list[i]) {	/* all or nothing, as the kernel's */
			while (i--)
				freelist_free(list[i]);
			return 0;
		}
	}
	return size;
}

void __wrap_kmem_cache_free_bulk(struct kmem_cache *cachep, size_t size,
				 void **list)
{
	if (!freelist_for(cachep))
		return __real_kmem_cache_free_bulk(cachep, size, list);
	for (size_t i = 0; i < size; i++)
		freelist_free(list[i]);
}

static unsigned long live_nodes(void)
{
	return freelist_slab ? freelist_live : kmem_cache_nr_allocated(maple_node_cache);
}

static void die(const char *msg, const char *arg)
{
	fprintf(stderr, "memattr_maple: %s%s%s\n", msg, arg ? ": " : "",
		arg ? arg : "");
	exit(2);
}

static uint64_t *read_stream(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	uint64_t *buf;
	long size;

	if (!f)
		die(strerror(errno), path);
	if (fseek(f, 0, SEEK_END) || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET))
		die("cannot size the stream", path);
	if (size % 24)
		die("stream size is not a multiple of 24 bytes (u64 start, end, value)", path);
	*n = size / 24;
	buf = malloc(size ? size : 1);
	if (!buf)
		die("out of memory reading", path);
	if (size && fread(buf, 1, size, f) != (size_t)size)
		die("short read", path);
	fclose(f);
	for (size_t i = 0; i < *n; i++) {
		uint64_t s = buf[3 * i], e = buf[3 * i + 1], v = buf[3 * i + 2];

		/* xa_mk_value() keeps 63 bits; an empty range is not a store. */
		if (s >= e || v > LONG_MAX) {
			fprintf(stderr, "memattr_maple: triple %zu (%llu, %llu, %llu): "
				"need start < end and value <= LONG_MAX\n", i,
				(unsigned long long)s, (unsigned long long)e,
				(unsigned long long)v);
			exit(2);
		}
	}
	return buf;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/*
 * Final contents as merged runs of non-zero values; returns the run count
 * and the tree's own (unmerged) entry count in *entries.
 */
static size_t write_runs(struct maple_tree *mt, const char *path, size_t *entries)
{
	FILE *f = fopen(path, "wb");
	uint64_t run[3] = { 0, 0, 0 };	/* pending run: start, end, value */
	size_t runs = 0;
	void *entry;
	MA_STATE(mas, mt, 0, 0);

	if (!f)
		die(strerror(errno), path);
	rcu_read_lock();
	mas_for_each(&mas, entry, ULONG_MAX) {
		uint64_t v;

		if (!xa_is_value(entry)) {
			fprintf(stderr, "memattr_maple: [%lu, %lu] holds a non-value entry %p\n",
				mas.index, mas.last, entry);
			exit(3);
		}
		v = xa_to_value(entry);
		(*entries)++;
		/* mas.last is inclusive; ULONG_MAX cannot come from a stream. */
		if (run[2] == v && run[1] == mas.index) {
			run[1] = (uint64_t)mas.last + 1;
			continue;
		}
		if (run[2]) {
			fwrite(run, sizeof(run), 1, f);
			runs++;
		}
		run[0] = mas.index;
		run[1] = (uint64_t)mas.last + 1;
		run[2] = v;
	}
	rcu_read_unlock();
	if (run[2]) {
		fwrite(run, sizeof(run), 1, f);
		runs++;
	}
	if (fclose(f))
		die(strerror(errno), path);
	return runs;
}

#define USAGE "usage: memattr_maple STREAM RUNS_OUT [ROUNDS] [--harness-nowait] " \
	"[--slab=harness|freelist]"

int main(int argc, char **argv)
{
	const char *stream = NULL, *out = NULL;
	long rounds = 1;
	uint64_t *ops;
	size_t n;
	int pos = 0;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--harness-nowait"))
			harness_nowait = true;
		else if (!strcmp(argv[i], "--slab=harness"))
			freelist_slab = false;
		else if (!strcmp(argv[i], "--slab=freelist"))
			freelist_slab = true;
		else if (pos == 0 && ++pos)
			stream = argv[i];
		else if (pos == 1 && ++pos)
			out = argv[i];
		else if (pos == 2 && ++pos) {
			char *end;

			rounds = strtol(argv[i], &end, 10);
			if (*end || rounds < 1 || rounds > 1000)
				die("ROUNDS must be an integer in 1..1000", argv[i]);
		} else
			die(USAGE, NULL);
	}
	if (!out)
		die(USAGE, NULL);

	ops = read_stream(stream, &n);
	maple_tree_init();
	rcu_register_thread();

	for (long r = 0; r < rounds; r++) {
		struct maple_tree tree;
		unsigned long nodes;
		double t0, t1;

		mt_init_flags(&tree, 0);
		/* Allocations without __GFP_DIRECT_RECLAIM: see the top comment. */
		kmem_cache_set_non_kernel(maple_node_cache, harness_nowait ? 0 : UINT_MAX);
		t0 = now();
		for (size_t i = 0; i < n; i++) {
			const uint64_t *op = ops + 3 * i;
			void *entry = op[2] ? xa_mk_value(op[2]) : NULL;

			if (mtree_store_range(&tree, op[0], op[1] - 1, entry, GFP_KERNEL)) {
				fprintf(stderr, "memattr_maple: store %zu failed\n", i);
				exit(3);
			}
		}
		t1 = now();
		nodes = live_nodes();
		printf("round=%ld stores=%zu seconds=%.6f stores_per_s=%.0f nodes=%lu node_bytes=%zu slab=%s\n",
		       r, n, t1 - t0, n / (t1 - t0), nodes, sizeof(struct maple_node),
		       freelist_slab ? "freelist" : "harness");
		fflush(stdout);
		if (r == rounds - 1) {
			size_t entries = 0, runs = write_runs(&tree, out, &entries);

			printf("runs=%zu entries=%zu\n", runs, entries);
		}
		mtree_destroy(&tree);
	}

	rcu_unregister_thread();
	free(ops);
	return 0;
}
