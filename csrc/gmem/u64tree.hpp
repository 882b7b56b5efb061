// SPDX-License-Identifier: MIT
// u64tree.hpp - U64Tree, the sorted u64 -> u64 store under IntervalMap and FolioCache.
//
// DOC: U64Tree
//
// A two-level B+ tree: sorted leaves of up to Cap (key, value) pairs, and one flat array
// holding the first key of every leaf.  A lookup is a binary search over the leaf keys
// (one cache-friendly array) followed by one inside a leaf:
//
//     first_:   [ 0      | 4096    | 9000 ]
//                 |         |         |
//     leaves:   [0 7 12..] [4096 ..] [9000 9001 ..]
//
// Both levels are contiguous arrays, so a walk over consecutive keys touches memory in
// order; that is what makes the PFN walk run at a few ns per folio.  Appending in key
// order fills leaves completely (a full leaf that receives a key past its end starts a
// new leaf instead of splitting), so a file populated front to back costs 16 bytes per
// entry; random inserts split leaves in half as a B-tree does.
//
// The tree does no locking: its owner serialises access.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace gmem {

template <unsigned Cap = 256>
class U64Tree {
    static_assert(Cap >= 8, "leaves must hold a handful of entries");

    struct Leaf {
        uint32_t n = 0;
        uint64_t key[Cap];
        uint64_t val[Cap];
    };

public:
    /// A position: leaf number and slot inside it.  `leaf == nr_leaves()` is the end.
    struct Pos {
        size_t leaf;
        uint32_t slot;
        bool operator==(const Pos &o) const { return leaf == o.leaf && slot == o.slot; }
        bool operator!=(const Pos &o) const { return !(*this == o); }
    };

    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    size_t nr_leaves() const { return leaves_.size(); }
    Pos end() const { return Pos{leaves_.size(), 0}; }
    Pos begin() const { return Pos{0, 0}; }

    uint64_t key(Pos p) const { return leaves_[p.leaf]->key[p.slot]; }
    uint64_t val(Pos p) const { return leaves_[p.leaf]->val[p.slot]; }
    void set_val(Pos p, uint64_t v) { leaves_[p.leaf]->val[p.slot] = v; }

    Pos next(Pos p) const
    {
        if (++p.slot == leaves_[p.leaf]->n) {
            p.leaf++;
            p.slot = 0;
        }
        return p;
    }

    Pos prev(Pos p) const
    {
        if (p.slot == 0) {
            p.leaf--;
            p.slot = leaves_[p.leaf]->n - 1;
        } else {
            p.slot--;
        }
        return p;
    }

    /// Raw leaf access for tight loops: keys and values of leaf @li, @n entries.
    const uint64_t *leaf_keys(size_t li) const { return leaves_[li]->key; }
    const uint64_t *leaf_vals(size_t li) const { return leaves_[li]->val; }
    uint32_t leaf_size(size_t li) const { return leaves_[li]->n; }

    /// First entry whose key is >= @k.
    Pos lower_bound(uint64_t k) const
    {
        if (leaves_.empty())
            return end();
        size_t li = leaf_for(k);
        const Leaf &l = *leaves_[li];
        uint32_t s = uint32_t(std::lower_bound(l.key, l.key + l.n, k) - l.key);
        if (s == l.n)
            return Pos{li + 1, 0};
        return Pos{li, s};
    }

    /// Last entry whose key is <= @k, or end() when every key is larger.
    Pos floor(uint64_t k) const
    {
        if (leaves_.empty() || k < first_[0])
            return end();
        size_t li = leaf_for(k);
        const Leaf &l = *leaves_[li];
        uint32_t s = uint32_t(std::upper_bound(l.key, l.key + l.n, k) - l.key);
        return Pos{li, s - 1}; // s >= 1: the leaf's first key is <= k
    }

    /// Insert (@k, @v); @k must not be present.
    void insert(uint64_t k, uint64_t v)
    {
        if (leaves_.empty()) {
            leaves_.push_back(take_leaf());
            first_.push_back(k);
        }
        size_t li = leaf_for(k);
        Leaf *l = leaves_[li].get();
        uint32_t s = uint32_t(std::lower_bound(l->key, l->key + l->n, k) - l->key);
        if (l->n == Cap) {
            if (s == Cap) {
                // Appending past a full leaf: start a new one, keep this one full.
                new_leaf_after(li);
                li++;
                l = leaves_[li].get();
                s = 0;
            } else {
                split(li);
                if (s > l->n) {
                    s -= l->n;
                    li++;
                    l = leaves_[li].get();
                }
            }
        }
        std::memmove(l->key + s + 1, l->key + s, (l->n - s) * sizeof(uint64_t));
        std::memmove(l->val + s + 1, l->val + s, (l->n - s) * sizeof(uint64_t));
        l->key[s] = k;
        l->val[s] = v;
        l->n++;
        if (s == 0)
            first_[li] = k;
        size_++;
    }

    /// First entry whose key is > @k: the keys are integers, so the first one >= k + 1.
    Pos upper_bound(uint64_t k) const
    {
        return k == ~uint64_t(0) ? end() : lower_bound(k + 1);
    }

    /// The entries with @lo <= key <= @hi: [a, b).  One search when they share a leaf.
    struct Span {
        Pos a, b;
    };
    Span span(uint64_t lo, uint64_t hi) const
    {
        Pos a = lower_bound(lo);
        if (a != end()) {
            const Leaf &l = *leaves_[a.leaf];
            if (l.key[l.n - 1] > hi) {
                uint32_t s = uint32_t(std::upper_bound(l.key + a.slot, l.key + l.n, hi) - l.key);
                return Span{a, Pos{a.leaf, s}};
            }
        }
        return Span{a, upper_bound(hi)};
    }

    /*
     * replace - erase the entries of @sp (found by span(lo, hi)) and insert the @k sorted
     * entries @keys/@vals, all within [lo, hi].  The common case, everything inside one
     * leaf with room to spare, is one memmove; anything else falls back to erase + insert.
     */
    void replace(Span sp, uint64_t lo, uint64_t hi, const uint64_t *keys, const uint64_t *vals,
                 unsigned k)
    {
        if (sp.a != end() && sp.a.leaf == sp.b.leaf) {
            Leaf &l = *leaves_[sp.a.leaf];
            uint32_t from = sp.a.slot, to = sp.b.slot;
            if (l.n - (to - from) + k <= Cap && l.n - (to - from) + k > 0) {
                uint32_t tail = l.n - to;
                std::memmove(l.key + from + k, l.key + to, tail * sizeof(uint64_t));
                std::memmove(l.val + from + k, l.val + to, tail * sizeof(uint64_t));
                for (unsigned i = 0; i < k; i++) {
                    l.key[from + i] = keys[i];
                    l.val[from + i] = vals[i];
                }
                l.n = l.n - (to - from) + k;
                size_ = size_ - (to - from) + k;
                first_[sp.a.leaf] = l.key[0];
                return;
            }
        }
        erase_range(lo, hi);
        erase(hi);
        for (unsigned i = 0; i < k; i++)
            insert(keys[i], vals[i]);
    }

    /// Erase every entry with @lo <= key < @hi.
    void erase_range(uint64_t lo, uint64_t hi)
    {
        if (lo >= hi || leaves_.empty())
            return;
        Pos a = lower_bound(lo);
        Pos b = lower_bound(hi);
        if (a == b)
            return;
        if (a.leaf == b.leaf) {
            Leaf *l = leaves_[a.leaf].get();
            cut(*l, a.slot, b.slot);
            after_shrink(a.leaf);
            return;
        }
        // Trim the tail of a's leaf, drop the leaves in between, trim the head of b's.
        Leaf *la = leaves_[a.leaf].get();
        cut(*la, a.slot, la->n);
        size_t first_dead = a.leaf + 1, last_dead = b.leaf; // [first_dead, last_dead)
        for (size_t i = first_dead; i < last_dead; i++)
            size_ -= leaves_[i]->n;
        if (b.leaf < leaves_.size()) {
            Leaf *lb = leaves_[b.leaf].get();
            cut(*lb, 0, b.slot);
            if (lb->n)
                first_[b.leaf] = lb->key[0];
        }
        leaves_.erase(leaves_.begin() + first_dead, leaves_.begin() + last_dead);
        first_.erase(first_.begin() + first_dead, first_.begin() + last_dead);
        // Now b's leaf sits right after a's; settle b first so a's index stays valid.
        if (first_dead < leaves_.size())
            after_shrink(first_dead);
        after_shrink(a.leaf);
    }

    void erase(uint64_t k)
    {
        Pos p = lower_bound(k);
        if (p == end() || key(p) != k)
            return;
        cut(*leaves_[p.leaf], p.slot, p.slot + 1);
        after_shrink(p.leaf);
    }

    void clear()
    {
        leaves_.clear();
        first_.clear();
        size_ = 0;
    }

    friend void swap(U64Tree &a, U64Tree &b) noexcept
    {
        a.first_.swap(b.first_);
        a.leaves_.swap(b.leaves_);
        a.spare_.swap(b.spare_);
        std::swap(a.size_, b.size_);
    }

    /// Bytes this tree holds on the heap (leaves and the leaf index).
    size_t memory_bytes() const
    {
        return (leaves_.size() + spare_.size()) * sizeof(Leaf) +
               first_.capacity() * sizeof(uint64_t) +
               leaves_.capacity() * sizeof(std::unique_ptr<Leaf>);
    }

    /*
     * reserve - make the next @n inserts allocation-free: each adds at most one leaf, so
     * @n spare leaves and room for @n more in the leaf index.  For an update that must not
     * fail half-way: reserve before its point of no return, as the kernel reserves its
     * attribute entries (xa_reserve in kvm_vm_set_mem_attributes).  Throws std::bad_alloc
     * having changed nothing observable.
     */
    void reserve(size_t n)
    {
        size_t need = leaves_.size() + n + 1;
        if (leaves_.capacity() < need) // grow geometrically: exact sizes would copy per call
            leaves_.reserve(std::max(need, 2 * leaves_.capacity()));
        if (first_.capacity() < need)
            first_.reserve(std::max(need, 2 * first_.capacity()));
        while (spare_.size() < n)
            spare_.push_back(std::make_unique<Leaf>());
    }

private:
    std::vector<uint64_t> first_;
    std::vector<std::unique_ptr<Leaf>> leaves_;
    std::vector<std::unique_ptr<Leaf>> spare_; // reserved leaves
    size_t size_ = 0;

    // The leaf that holds, or would receive, key @k: the last one whose first key is <= k.
    size_t leaf_for(uint64_t k) const
    {
        size_t i = size_t(std::upper_bound(first_.begin(), first_.end(), k) - first_.begin());
        return i ? i - 1 : 0;
    }

    void new_leaf_after(size_t li)
    {
        leaves_.insert(leaves_.begin() + li + 1, take_leaf());
        first_.insert(first_.begin() + li + 1, 0); // set by the caller's insert at slot 0
    }

    std::unique_ptr<Leaf> take_leaf()
    {
        if (spare_.empty())
            return std::make_unique<Leaf>();
        std::unique_ptr<Leaf> l = std::move(spare_.back()); // reserved: cannot fail
        spare_.pop_back();
        l->n = 0;
        return l;
    }

    void split(size_t li)
    {
        new_leaf_after(li);
        Leaf *l = leaves_[li].get(), *r = leaves_[li + 1].get();
        uint32_t keep = l->n / 2;
        r->n = l->n - keep;
        std::memcpy(r->key, l->key + keep, r->n * sizeof(uint64_t));
        std::memcpy(r->val, l->val + keep, r->n * sizeof(uint64_t));
        l->n = keep;
        first_[li + 1] = r->key[0];
    }

    void cut(Leaf &l, uint32_t from, uint32_t to)
    {
        std::memmove(l.key + from, l.key + to, (l.n - to) * sizeof(uint64_t));
        std::memmove(l.val + from, l.val + to, (l.n - to) * sizeof(uint64_t));
        l.n -= to - from;
        size_ -= to - from;
    }

    // Leaf @li lost entries: drop it when empty, refresh its first key, and merge it into
    // a neighbour when both are less than half full, so deletions cannot leave a tree of
    // nearly empty leaves.
    void after_shrink(size_t li)
    {
        Leaf *l = leaves_[li].get();
        if (l->n == 0) {
            leaves_.erase(leaves_.begin() + li);
            first_.erase(first_.begin() + li);
            return;
        }
        first_[li] = l->key[0];
        if (li + 1 < leaves_.size() && l->n + leaves_[li + 1]->n <= Cap / 2)
            merge_next(li);
        else if (li > 0 && leaves_[li - 1]->n + l->n <= Cap / 2)
            merge_next(li - 1);
    }

    void merge_next(size_t li)
    {
        Leaf *l = leaves_[li].get(), *r = leaves_[li + 1].get();
        std::memcpy(l->key + l->n, r->key, r->n * sizeof(uint64_t));
        std::memcpy(l->val + l->n, r->val, r->n * sizeof(uint64_t));
        l->n += r->n;
        leaves_.erase(leaves_.begin() + li + 1);
        first_.erase(first_.begin() + li + 1);
    }
};

} // namespace gmem
