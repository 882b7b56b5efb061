// SPDX-License-Identifier: MIT
// u64tree.hpp - U64Tree, the sorted u64 -> u64 store under IntervalMap and FolioCache.
//
// DOC: U64Tree
//
// A B+ tree with small leaves.  Leaves hold up to LeafCap (64) entries, keys in one array
// and values in the next, and are chained in key order for walks; inner nodes hold up to
// InnerCap (128) children and the separators between them.  A leaf stores each key as a
// 32-bit offset from its own 64-bit base, so an entry costs 12 bytes, not 16, and the keys
// a search reads fit in four cache lines:
//
//                      root [ sep 4096 | sep 9000 ]
//                         /          |          \_
//     leaves:   [0 7 12 ..] --> [4096 5000 ..] --> [9000 9001 ..] --> null
//
// Every key of child i is >= sep[i - 1] and < sep[i].  A separator is the first key of
// its right child when it is made (a split), and only a bound afterwards: erasing a
// leaf's first key leaves it in place, so a leaf's first key may sit above its fence.
// Unused key slots of a leaf hold NONE32 (no offset is NONE32), so a leaf needs no count.
// The keys of a leaf lie within [base, base + 2**32 - 2]: a key that does not fit (only a
// sparse key set has one) gets a leaf of its own at the end of the leaf it falls beside,
// and two leaves merge only when their keys fit one base.
//
// A lookup reads one inner node per level, prefetching the separators below before it
// searches them, so that their cache lines arrive in parallel rather than one per step of
// the binary search; 10**6 entries make two inner levels.  The leaf is prefetched whole
// only once the leaves pass 8 MiB (leaves_outgrow_cache()).  Inserting into a
// full node splits it in O(log n); a key past the end of a full node starts a new node
// instead, so a file populated front to back fills every node: 12.5 bytes per entry,
// inner nodes included.  A key past the last one goes straight into the last leaf while it
// has room, without a descent.  Erasing merges a small node into a neighbour when both fit in
// half a node, and drops empty nodes.
//
// reserve(n) keeps spare nodes so that the next n inserts cannot fail on allocation
// (each insert allocates at most one node per level).  The tree does no locking: its
// owner serialises access.
#pragma once

#include <algorithm>
#include <cstddef>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace gmem {

template <unsigned LeafCap = 64, unsigned InnerCap = 128>
class U64Tree {
    static_assert(LeafCap >= 8 && InnerCap >= 8, "nodes must hold a handful of entries");

public:
    /// No key is NONE.
    static constexpr uint64_t NONE = ~uint64_t(0);
    /// Offsets past a leaf's last entry are NONE32, so a leaf needs no count (784 bytes).
    static constexpr uint32_t NONE32 = ~uint32_t(0);
    /// Keys of one leaf lie within [base, base + SPAN).
    static constexpr uint64_t SPAN = NONE32;
    struct Leaf {
        uint64_t base;
        uint32_t off[LeafCap]; // key - base
        uint64_t val[LeafCap];
        Leaf *next;
    };

private:
    struct Inner {
        uint64_t n;                 // children; first, in the line of the first separators
        uint64_t sep[InnerCap - 1]; // sep[i] separates child[i] from child[i + 1]
        void *child[InnerCap];
    };

    static constexpr unsigned MAX_DEPTH = 32;

    // The inner nodes from the root down to a leaf, and the child taken at each.
    struct Path {
        Inner *node[MAX_DEPTH];
        uint32_t slot[MAX_DEPTH];
    };

public:
    /// A position: a leaf and a slot inside it.  end() is {nullptr, 0}.
    struct Pos {
        Leaf *leaf;
        uint32_t slot;
        bool operator==(const Pos &o) const { return leaf == o.leaf && slot == o.slot; }
        bool operator!=(const Pos &o) const { return !(*this == o); }
    };

    U64Tree() = default;
    U64Tree(const U64Tree &) = delete;
    U64Tree &operator=(const U64Tree &) = delete;
    U64Tree(U64Tree &&o) noexcept { swap(*this, o); }
    U64Tree &operator=(U64Tree &&o) noexcept
    {
        swap(*this, o);
        return *this;
    }
    ~U64Tree()
    {
        clear();
        for (Leaf *l : spare_leaves_)
            delete l;
        for (Inner *in : spare_inners_)
            delete in;
    }

    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    Pos end() const { return Pos{nullptr, 0}; }
    Pos begin() const { return size_ ? Pos{head_, 0} : end(); }

    uint64_t key(Pos p) const { return p.leaf->base + p.leaf->off[p.slot]; }
    uint64_t val(Pos p) const { return p.leaf->val[p.slot]; }
    void set_val(Pos p, uint64_t v) { p.leaf->val[p.slot] = v; }

    Pos next(Pos p) const
    {
        if (++p.slot < LeafCap && p.leaf->off[p.slot] != NONE32)
            return p;
        return Pos{p.leaf->next, 0}; // leaves in the chain are never empty
    }

    /// The entry before @p (which must have one); prev(end()) is the last entry.
    Pos prev(Pos p) const
    {
        if (p.leaf && p.slot > 0)
            return Pos{p.leaf, p.slot - 1};
        return floor(p.leaf ? first_key(p.leaf) - 1 : ~uint64_t(0));
    }

    /// Raw leaf access for tight loops: the leaf after @l (nullptr at the end), and the
    /// @leaf_size(l) entries of @l: key i is leaf_base(l) + leaf_offs(l)[i].
    static const Leaf *next_leaf(const Leaf *l) { return l->next; }
    static uint64_t leaf_base(const Leaf *l) { return l->base; }
    static const uint32_t *leaf_offs(const Leaf *l) { return l->off; }
    static const uint64_t *leaf_vals(const Leaf *l) { return l->val; }
    static uint32_t leaf_size(const Leaf *l) { return nr(l); }

    /// First entry whose key is >= @k.
    Pos lower_bound(uint64_t k) const
    {
        if (!size_)
            return end();
        Leaf *l = find_leaf(k);
        uint32_t s = rank_lt(l, 0, LeafCap, k);
        return s < LeafCap && l->off[s] != NONE32 ? Pos{l, s} : Pos{l->next, 0};
    }

    /// First entry whose key is > @k.
    Pos upper_bound(uint64_t k) const
    {
        return k == ~uint64_t(0) ? end() : lower_bound(k + 1);
    }

    /// Last entry whose key is <= @k, or end() when every key is larger.
    Pos floor(uint64_t k) const
    {
        if (!size_)
            return end();
        if (k == NONE)
            k--; // no key is NONE
        Leaf *l = find_leaf(k);
        uint32_t s = rank_le(l, 0, LeafCap, k);
        if (s)
            return Pos{l, s - 1};
        // Every key of the leaf is above @k (its fence is stale): the entry is the last
        // one of the leaf before.
        Path path;
        descend(k, &path, nullptr);
        Leaf *p = pred_leaf(path);
        return p ? Pos{p, nr(p) - 1} : end();
    }

    /// Insert (@k, @v); @k must not be present, nor NONE.  Throws std::bad_alloc having
    /// changed nothing.
    void insert(uint64_t k, uint64_t v)
    {
        if (!root_) {
            Leaf *l = take_leaf();
            l->next = nullptr;
            root_ = head_ = tail_ = l;
        }
        // Past the last key, with room in the last leaf: no descent.  The last leaf has
        // no upper bound, so this is where the search would end.  A file filled front to
        // back descends once per leaf instead of once per key.
        if (tail_->off[LeafCap - 1] == NONE32) {
            uint32_t n = nr(tail_);
            if (n && k > tail_->base + tail_->off[n - 1] && k - tail_->base < SPAN) {
                tail_->off[n] = uint32_t(k - tail_->base);
                tail_->val[n] = v;
                size_++;
                return;
            }
        }
        Path path;
        Leaf *l = descend(k, &path, nullptr);
        uint32_t n = nr(l), s = rank_lt(l, 0, LeafCap, k); // slots past n are NONE32
        if (!fit(l, n, k, k)) {
            // Too far from the leaf's keys for one base: @k gets a leaf of its own.  It
            // lies past every key of the leaf (s == n) or before every one (s == 0).
            Leaf *r = take_leaf_after(path, l);
            if (s == n) {
                leaf_put(r, 0, 0, k, v);
                size_++;
                add_child(path, height_, k, r);
                return;
            }
            // Before every key: the entries move to the new leaf, @k stays here alone.
            r->base = l->base;
            std::memcpy(r->off, l->off, n * sizeof(uint32_t));
            std::memcpy(r->val, l->val, n * sizeof(uint64_t));
            std::fill(l->off, l->off + LeafCap, NONE32);
            leaf_put(l, 0, 0, k, v);
            size_++;
            add_child(path, height_, first_key(r), r);
            return;
        }
        if (n == LeafCap) {
            Leaf *r = take_leaf_after(path, l);
            if (s == LeafCap) {
                // Appending past a full leaf: start a new one, keep this one full.
                leaf_put(r, 0, 0, k, v);
                size_++;
                add_child(path, height_, k, r);
                return;
            }
            uint32_t keep = LeafCap / 2;
            uint64_t sep = l->base + l->off[keep];
            r->base = sep;
            for (uint32_t i = keep; i < LeafCap; i++)
                r->off[i - keep] = uint32_t(l->base + l->off[i] - sep);
            std::memcpy(r->val, l->val + keep, (LeafCap - keep) * sizeof(uint64_t));
            std::fill(l->off + keep, l->off + LeafCap, NONE32);
            if (s > keep)
                leaf_put(r, LeafCap - keep, s - keep, k, v);
            else
                leaf_put(l, keep, s, k, v);
            size_++;
            add_child(path, height_, sep, r);
            return;
        }
        leaf_put(l, n, s, k, v);
        size_++;
    }

    /// The entries with @lo <= key <= @hi (@lo <= @hi): [a, b).  One search when they share a leaf;
    /// then a and b may be one past the leaf's last entry (valid for prev() and replace()).
    struct Span {
        Pos a, b;
        bool one_leaf;
    };
    Span span(uint64_t lo, uint64_t hi) const
    {
        if (!size_)
            return Span{end(), end(), false};
        uint64_t upper = 0;
        bool bounded = false;
        Leaf *l = descend(lo, nullptr, &upper, &bounded);
        uint32_t s = rank_lt(l, 0, LeafCap, lo);
        if (!bounded || hi < upper) // every key <= hi that is >= lo lives in this leaf
            return Span{Pos{l, s}, Pos{l, rank_le(l, 0, LeafCap, hi)}, true}; // SIMD rank
        Pos a = s < LeafCap && l->off[s] != NONE32 ? Pos{l, s} : Pos{l->next, 0};
        return Span{a, upper_bound(hi), false};
    }

    /*
     * replace - erase the entries of @sp (found by span(lo, hi)) and insert the @k sorted
     * entries @keys/@vals, all within [lo, hi] (lo <= hi).  The common case, everything inside one
     * leaf with room to spare, is one memmove; anything else falls back to erase + insert.
     */
    void replace(Span sp, uint64_t lo, uint64_t hi, const uint64_t *keys, const uint64_t *vals,
                 unsigned k)
    {
        if (!k && sp.a == sp.b)
            return; // nothing in [lo, hi] and nothing to put back: a store of what is there
        if (sp.one_leaf) {
            Leaf &l = *sp.a.leaf;
            uint32_t from = sp.a.slot, to = sp.b.slot;
            if (to - from == k && same_entries(l, from, keys, vals, k))
                return; // the entries are already these (a store of what is there)
            uint32_t was = nr(&l);
            uint32_t n = was - (to - from) + k;
            // fit() may move the base, which keeps every slot where it is.
            if (n <= LeafCap && n > 0 && (!k || fit(&l, was, keys[0], keys[k - 1]))) {
                uint32_t tail = was - to;
                std::memmove(l.off + from + k, l.off + to, tail * sizeof(uint32_t));
                std::memmove(l.val + from + k, l.val + to, tail * sizeof(uint64_t));
                for (unsigned i = 0; i < k; i++) {
                    l.off[from + i] = uint32_t(keys[i] - l.base);
                    l.val[from + i] = vals[i];
                }
                std::fill(l.off + n, l.off + std::max(n, was), NONE32);
                size_ = size_ - (to - from) + k;
                return;
            }
        }
        erase_range(lo, hi);
        erase(hi);
        for (unsigned i = 0; i < k; i++)
            insert(keys[i], vals[i]);
    }

    /// Erase every entry with @lo <= key < @hi: one search per leaf it touches.
    void erase_range(uint64_t lo, uint64_t hi)
    {
        while (lo < hi && size_) {
            Path path;
            Leaf *l = descend(lo, &path, nullptr);
            uint32_t n = nr(l), s = rank_lt(l, 0, LeafCap, lo); // slots past n are NONE32
            if (s == n) {
                if (!l->next || first_key(l->next) >= hi)
                    return;
                l = descend(first_key(l->next), &path, nullptr);
                n = nr(l);
                s = 0;
            }
            uint32_t t = s + rank_lt(l, s, n - s, hi);
            if (t == s)
                return;
            cut(l, n, s, t);
            settle_leaf(path, l);
            if (t < n)
                return;
        }
    }

    void erase(uint64_t k)
    {
        if (k != NONE)
            erase_range(k, k + 1);
    }

    void clear()
    {
        if (root_)
            free_subtree(root_, height_);
        root_ = nullptr;
        head_ = tail_ = nullptr;
        height_ = 0;
        size_ = 0;
        nr_leaves_ = nr_inners_ = 0;
    }

    friend void swap(U64Tree &a, U64Tree &b) noexcept
    {
        std::swap(a.root_, b.root_);
        std::swap(a.head_, b.head_);
        std::swap(a.tail_, b.tail_);
        std::swap(a.height_, b.height_);
        std::swap(a.size_, b.size_);
        std::swap(a.nr_leaves_, b.nr_leaves_);
        std::swap(a.nr_inners_, b.nr_inners_);
        a.spare_leaves_.swap(b.spare_leaves_);
        a.spare_inners_.swap(b.spare_inners_);
    }

    /// Bytes this tree holds on the heap: nodes in use and spare, and the spare lists.
    size_t memory_bytes() const
    {
        return (nr_leaves_ + spare_leaves_.size()) * sizeof(Leaf) +
               (nr_inners_ + spare_inners_.size()) * sizeof(Inner) +
               spare_leaves_.capacity() * sizeof(Leaf *) +
               spare_inners_.capacity() * sizeof(Inner *);
    }

    /*
     * reserve - make the next @n inserts allocation-free.  An insert allocates at most one
     * leaf, and an inner node only when a node of the level below was allocated, so n
     * inserts need n leaves and n inner nodes per level the tree may reach: the levels it
     * has, the one a root split adds, and one per factor of InnerCap / 2 in n.  For an
     * update that must not fail half-way: reserve before its point of no return, as the
     * kernel reserves its attribute entries (xa_reserve in kvm_vm_set_mem_attributes).
     * Throws std::bad_alloc having changed nothing observable.
     */
    void reserve(size_t n)
    {
        size_t levels = height_ + 1;
        for (size_t m = n; m > 1; m /= InnerCap / 2)
            levels++;
        top_up(spare_leaves_, n);
        top_up(spare_inners_, n * levels);
    }

private:
    void *root_ = nullptr; // a Leaf when height_ == 0, else an Inner
    Leaf *head_ = nullptr; // the first leaf of the chain
    Leaf *tail_ = nullptr; // and the last
    unsigned height_ = 0;  // inner levels above the leaves
    size_t size_ = 0;
    size_t nr_leaves_ = 0, nr_inners_ = 0;
    std::vector<Leaf *> spare_leaves_; // reserved nodes
    std::vector<Inner *> spare_inners_;

    /* Number of the @n sorted values at @a that are <= @k: a branch-free binary search. */
    template <class T>
    static uint32_t rank_le(const T *a, uint32_t n, T k)
    {
        if (!n)
            return 0;
        const T *base = a;
        while (n > 1) {
            uint32_t half = n / 2;
            base = base[half - 1] <= k ? base + half : base;
            n -= half;
        }
        return uint32_t(base - a) + (*base <= k);
    }

    /*
     * Number of the LeafCap offsets at @a that are <= @q.  They are sorted (NONE32 past the
     * last entry), so that is also the rank of @q: one compare picks the half it lies in
     * (a select, not a branch), then SSE2 compares of four offsets each, none waiting for
     * another, count inside that half, where a binary search takes six dependent steps.
     */
    static uint32_t count_le(const uint32_t *a, uint32_t q)
    {
#if defined(__SSE2__)
        if constexpr (LeafCap % 16 == 0) { // two halves of pairs of four
            constexpr unsigned HALF = LeafCap / 2;
            const uint32_t skip = HALF & (uint32_t(0) - uint32_t(a[HALF - 1] <= q));
            a += skip;
            const __m128i bias = _mm_set1_epi32(INT32_MIN); // unsigned order, signed compare
            const __m128i qv = _mm_xor_si128(_mm_set1_epi32(int32_t(q)), bias);
            __m128i above0 = _mm_setzero_si128(), above1 = _mm_setzero_si128();
            for (unsigned i = 0; i < HALF; i += 8) { // two sums: half the dependent chain
                __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(a + i));
                __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(a + i + 4));
                above0 = _mm_sub_epi32(above0, _mm_cmpgt_epi32(_mm_xor_si128(v0, bias), qv));
                above1 = _mm_sub_epi32(above1, _mm_cmpgt_epi32(_mm_xor_si128(v1, bias), qv));
            }
            __m128i above = _mm_add_epi32(above0, above1);
            above = _mm_add_epi32(above, _mm_shuffle_epi32(above, 0x4e));
            above = _mm_add_epi32(above, _mm_shuffle_epi32(above, 0xb1));
            return skip + HALF - uint32_t(_mm_cvtsi128_si32(above));
        }
#endif
        return rank_le(a, LeafCap, q);
    }

    /* Number of the @n keys of leaf @l from slot @from on that are <= @k (or < @k). */
    static uint32_t rank_le(const Leaf *l, uint32_t from, uint32_t n, uint64_t k)
    {
        if (k < l->base)
            return 0;
        // Offsets of entries are below NONE32: a key past the leaf's span counts them all.
        uint64_t d = k - l->base;
        uint32_t q = uint32_t(d < SPAN ? d : SPAN - 1);
        return from == 0 && n == LeafCap ? count_le(l->off, q) : rank_le(l->off + from, n, q);
    }
    static uint32_t rank_lt(const Leaf *l, uint32_t from, uint32_t n, uint64_t k)
    {
        return k ? rank_le(l, from, n, k - 1) : 0;
    }

    static uint64_t first_key(const Leaf *l) { return l->base + l->off[0]; }

    // Do the @k entries of @l from slot @from hold @keys and @vals?
    static bool same_entries(const Leaf &l, uint32_t from, const uint64_t *keys,
                             const uint64_t *vals, unsigned k)
    {
        for (unsigned i = 0; i < k; i++)
            if (l.base + l.off[from + i] != keys[i] || l.val[from + i] != vals[i])
                return false;
        return true;
    }

    /*
     * fit - make the keys @a..@b (a <= b) expressible in leaf @l, which holds @n entries,
     * moving the base when that is enough: down to @a, or up to the first key.  False
     * when the leaf's keys and @a..@b span 2**32 - 1 or more; then @l is unchanged.
     */
    static bool fit(Leaf *l, uint32_t n, uint64_t a, uint64_t b)
    {
        if (a >= l->base && b - l->base < SPAN)
            return true;
        uint64_t lo = n ? std::min(a, first_key(l)) : a;
        uint64_t hi = n ? std::max(b, l->base + l->off[n - 1]) : b;
        if (hi - lo >= SPAN)
            return false;
        rebase(l, n, lo);
        return true;
    }

    // Express the @n keys of @l from base @b (<= every key, and within SPAN of all).
    static void rebase(Leaf *l, uint32_t n, uint64_t b)
    {
        for (uint32_t i = 0; i < n; i++)
            l->off[i] = uint32_t(l->base + l->off[i] - b);
        l->base = b;
    }

    /*
     * Are the leaves too many for a lookup's leaf to be in a cache, so that it is worth
     * asking for all its lines at once (its value's line then arrives with its offsets,
     * not one memory latency after them)?  In a smaller tree the leaf is usually cached,
     * and the 13 prefetches only push lines out of L1: a warm lookup took a third longer
     * with them, a cold one at 10**6 runs half a memory latency longer without.
     */
    bool leaves_outgrow_cache() const { return nr_leaves_ > (size_t(8) << 20) / sizeof(Leaf); }

    // Ask for the cache lines of the first @bytes at @p before they are searched.
    static void prefetch(const void *p, size_t bytes)
    {
        for (size_t off = 0; off < bytes; off += 64)
            __builtin_prefetch(static_cast<const char *>(p) + off);
    }

    // The leaf whose range holds @k: descend() for lookups, without the bookkeeping.
    Leaf *find_leaf(uint64_t k) const
    {
        void *node = root_;
        for (unsigned d = height_; d > 0; d--) {
            const Inner *in = static_cast<const Inner *>(node);
            node = in->child[rank_le(in->sep, uint32_t(in->n - 1), k)];
            if (d > 1)
                prefetch(node, offsetof(Inner, child));
            else if (leaves_outgrow_cache())
                prefetch(node, offsetof(Leaf, next));
        }
        return static_cast<Leaf *>(node);
    }

    /*
     * descend - the leaf whose range holds @k, recording the inner nodes on the way in
     * @path when given.  @upper receives the separator that bounds the leaf from above,
     * and @bounded whether there is one (the last leaf has none).
     */
    Leaf *descend(uint64_t k, Path *path, uint64_t *upper, bool *bounded = nullptr) const
    {
        void *node = root_;
        for (unsigned d = 0; d < height_; d++) {
            const Inner *in = static_cast<const Inner *>(node);
            uint32_t i = rank_le(in->sep, uint32_t(in->n - 1), k);
            if (path) {
                path->node[d] = const_cast<Inner *>(in);
                path->slot[d] = i;
            }
            if (bounded && i + 1 < in->n) {
                *upper = in->sep[i];
                *bounded = true;
            }
            node = in->child[i];
            if (d + 1 < height_) // the count and the separators, not the child pointers
                prefetch(node, offsetof(Inner, child));
            else if (leaves_outgrow_cache())
                prefetch(node, offsetof(Leaf, next));
        }
        return static_cast<Leaf *>(node);
    }

    // The leaf before the one @path leads to, or nullptr when it is the first.
    Leaf *pred_leaf(const Path &path) const
    {
        for (unsigned d = height_; d-- > 0;) {
            if (path.slot[d] == 0)
                continue;
            void *node = path.node[d]->child[path.slot[d] - 1];
            for (unsigned e = d + 1; e < height_; e++) {
                const Inner *in = static_cast<const Inner *>(node);
                node = in->child[in->n - 1];
            }
            return static_cast<Leaf *>(node);
        }
        return nullptr;
    }

    // Number of entries of leaf @l: the offsets before the first NONE32.
    static uint32_t nr(const Leaf *l) { return count_le(l->off, NONE32 - 1); }

    // Put (@k, @v) at slot @s of leaf @l, which holds @n < LeafCap entries and can
    // express @k (fit(); a leaf with none takes @k as its base).
    static void leaf_put(Leaf *l, uint32_t n, uint32_t s, uint64_t k, uint64_t v)
    {
        if (!n)
            l->base = k;
        std::memmove(l->off + s + 1, l->off + s, (n - s) * sizeof(uint32_t));
        std::memmove(l->val + s + 1, l->val + s, (n - s) * sizeof(uint64_t));
        l->off[s] = uint32_t(k - l->base);
        l->val[s] = v;
    }

    /*
     * take_leaf_after - a fresh leaf chained right after @l (reached by @path), taking
     * first every node that adding it to the parents can need: an insert that throws
     * std::bad_alloc leaves the tree as it was.
     */
    Leaf *take_leaf_after(const Path &path, Leaf *l)
    {
        unsigned full = 0;
        while (full < height_ && path.node[height_ - 1 - full]->n == InnerCap)
            full++;
        top_up(spare_leaves_, 1);
        top_up(spare_inners_, full + (full == height_));
        Leaf *r = take_leaf();
        r->next = l->next;
        l->next = r;
        if (tail_ == l)
            tail_ = r;
        return r;
    }

    static void inner_put(Inner *in, uint32_t j, uint64_t sep, void *child)
    {
        // @child becomes child j (j >= 1), @sep its lower bound sep[j - 1].
        std::memmove(in->child + j + 1, in->child + j, (in->n - j) * sizeof(void *));
        std::memmove(in->sep + j, in->sep + j - 1, (in->n - j) * sizeof(uint64_t));
        in->child[j] = child;
        in->sep[j - 1] = sep;
        in->n++;
    }

    /*
     * add_child - node @child, whose keys are >= @sep, was made right after the node
     * @path leads to at depth @d (the leaves are at depth height_): put it into the
     * parent, splitting parents as needed, and grow a new root when the old one splits.
     */
    void add_child(const Path &path, unsigned d, uint64_t sep, void *child)
    {
        while (d > 0) {
            Inner *in = path.node[d - 1];
            uint32_t j = path.slot[d - 1] + 1;
            if (in->n < InnerCap) {
                inner_put(in, j, sep, child);
                return;
            }
            Inner *r = take_inner();
            uint64_t up;
            if (j == InnerCap) {
                // Appending past a full node: start a new one, keep this one full.
                r->n = 1;
                r->child[0] = child;
                up = sep;
            } else {
                uint32_t keep = InnerCap / 2;
                r->n = InnerCap - keep;
                std::memcpy(r->child, in->child + keep, r->n * sizeof(void *));
                std::memcpy(r->sep, in->sep + keep, (r->n - 1) * sizeof(uint64_t));
                up = in->sep[keep - 1];
                in->n = keep;
                if (j <= keep)
                    inner_put(in, j, sep, child);
                else
                    inner_put(r, j - keep, sep, child);
            }
            sep = up;
            child = r;
            d--;
        }
        Inner *root = take_inner();
        root->n = 2;
        root->child[0] = root_;
        root->child[1] = child;
        root->sep[0] = sep;
        root_ = root;
        height_++;
    }

    // Drop slots [@from, @to) of leaf @l, which holds @n entries.
    void cut(Leaf *l, uint32_t n, uint32_t from, uint32_t to)
    {
        std::memmove(l->off + from, l->off + to, (n - to) * sizeof(uint32_t));
        std::memmove(l->val + from, l->val + to, (n - to) * sizeof(uint64_t));
        std::fill(l->off + n - (to - from), l->off + n, NONE32);
        size_ -= to - from;
    }

    // Remove child @j of @in (and the separator that bounds it).
    static void inner_drop(Inner *in, uint32_t j)
    {
        std::memmove(in->child + j, in->child + j + 1, (in->n - j - 1) * sizeof(void *));
        uint32_t s = j ? j - 1 : 0; // child 0 takes over its own lower bound
        if (in->n >= 2)
            std::memmove(in->sep + s, in->sep + s + 1, (in->n - 2 - s) * sizeof(uint64_t));
        in->n--;
    }

    /*
     * settle_leaf - leaf @l (reached by @path) lost entries: unlink and free it when
     * empty, else merge it with a neighbour under the same parent when both fit in half a
     * leaf, so that deletions cannot leave a tree of nearly empty leaves.
     */
    void settle_leaf(const Path &path, Leaf *l)
    {
        if (height_ == 0) {
            if (l->off[0] == NONE32)
                clear();
            return;
        }
        Inner *p = path.node[height_ - 1];
        uint32_t j = path.slot[height_ - 1];
        if (l->off[0] == NONE32) {
            Leaf *pred = pred_leaf(path);
            if (pred)
                pred->next = l->next;
            else
                head_ = l->next;
            if (tail_ == l)
                tail_ = pred;
            free_leaf(l);
            inner_drop(p, j);
        } else if (j + 1 < p->n && mergeable(l, static_cast<Leaf *>(p->child[j + 1]))) {
            merge_leaves(l, static_cast<Leaf *>(p->child[j + 1]));
            inner_drop(p, j + 1);
        } else if (j > 0 && mergeable(static_cast<Leaf *>(p->child[j - 1]), l)) {
            merge_leaves(static_cast<Leaf *>(p->child[j - 1]), l);
            inner_drop(p, j);
        } else {
            return;
        }
        settle_inner(path, height_ - 1);
    }

    // Whether leaf @l and @r, the leaf after it, fit in half a leaf with one base.
    static bool mergeable(const Leaf *l, const Leaf *r)
    {
        uint32_t nl = nr(l), nr_ = nr(r);
        return nl + nr_ <= LeafCap / 2 && r->base + r->off[nr_ - 1] - first_key(l) < SPAN;
    }

    // Move the entries of @r into @l, the leaf before it (mergeable()), and free @r.
    void merge_leaves(Leaf *l, Leaf *r)
    {
        uint32_t nl = nr(l), nr_ = nr(r);
        rebase(l, nl, first_key(l));
        for (uint32_t i = 0; i < nr_; i++)
            l->off[nl + i] = uint32_t(r->base + r->off[i] - l->base);
        std::memcpy(l->val + nl, r->val, nr_ * sizeof(uint64_t));
        l->next = r->next;
        if (tail_ == r)
            tail_ = l;
        free_leaf(r);
    }

    // Inner node @path.node[d] lost a child: the same rules one level up, and a root
    // left with one child makes way for it.
    void settle_inner(const Path &path, unsigned d)
    {
        for (;; d--) {
            Inner *in = path.node[d];
            if (d == 0) {
                if (!in->n) {
                    clear();
                    return;
                }
                while (height_ > 0 && static_cast<Inner *>(root_)->n == 1) {
                    Inner *old = static_cast<Inner *>(root_);
                    root_ = old->child[0];
                    free_inner(old);
                    height_--;
                }
                return;
            }
            Inner *p = path.node[d - 1];
            uint32_t j = path.slot[d - 1];
            if (!in->n) {
                free_inner(in);
                inner_drop(p, j);
            } else if (j + 1 < p->n &&
                       in->n + static_cast<Inner *>(p->child[j + 1])->n <= InnerCap / 2) {
                merge_inners(in, p->sep[j], static_cast<Inner *>(p->child[j + 1]));
                inner_drop(p, j + 1);
            } else if (j > 0 &&
                       static_cast<Inner *>(p->child[j - 1])->n + in->n <= InnerCap / 2) {
                merge_inners(static_cast<Inner *>(p->child[j - 1]), p->sep[j - 1], in);
                inner_drop(p, j);
            } else {
                return;
            }
        }
    }

    void merge_inners(Inner *l, uint64_t sep, Inner *r)
    {
        l->sep[l->n - 1] = sep;
        std::memcpy(l->sep + l->n, r->sep, (r->n - 1) * sizeof(uint64_t));
        std::memcpy(l->child + l->n, r->child, r->n * sizeof(void *));
        l->n += r->n;
        free_inner(r);
    }

    template <class T>
    static void top_up(std::vector<T *> &spare, size_t n)
    {
        if (spare.size() >= n)
            return;
        spare.reserve(n);
        while (spare.size() < n)
            spare.push_back(new T);
    }

    Leaf *take_leaf()
    {
        Leaf *l;
        if (spare_leaves_.empty()) {
            l = new Leaf;
        } else {
            l = spare_leaves_.back(); // reserved: cannot fail
            spare_leaves_.pop_back();
        }
        l->base = 0;
        std::fill(l->off, l->off + LeafCap, NONE32);
        nr_leaves_++;
        return l;
    }

    Inner *take_inner()
    {
        Inner *in;
        if (spare_inners_.empty()) {
            in = new Inner;
        } else {
            in = spare_inners_.back();
            spare_inners_.pop_back();
        }
        in->n = 0;
        nr_inners_++;
        return in;
    }

    void free_leaf(Leaf *l)
    {
        nr_leaves_--;
        delete l;
    }

    void free_inner(Inner *in)
    {
        nr_inners_--;
        delete in;
    }

    void free_subtree(void *node, unsigned h)
    {
        if (h == 0) {
            delete static_cast<Leaf *>(node);
            return;
        }
        Inner *in = static_cast<Inner *>(node);
        for (uint32_t i = 0; i < in->n; i++)
            free_subtree(in->child[i], h - 1);
        delete in;
    }
};

} // namespace gmem
