// SPDX-License-Identifier: MIT
// lockable.hpp - the reader/writer lock each shared core object carries.
//
// The core data structures do not lock internally (kernel style: the caller holds the
// owner's lock, like the inode's invalidate lock).  Whoever hands an object to several
// threads - the Python bindings, which drop the GIL in long loops - takes lock() shared
// for queries and exclusive for updates.
//
// ModelLock also remembers which thread holds it exclusively, so that an arch hook that
// calls back into the model it was called from (same thread, lock already held) can be
// told apart from another thread that simply has to wait.
#pragma once

#include <atomic>
#include <shared_mutex>
#include <thread>

namespace gmem {

class ModelLock {
public:
    void lock()
    {
        m_.lock();
        owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    }
    bool try_lock()
    {
        if (!m_.try_lock())
            return false;
        owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
        return true;
    }
    void unlock()
    {
        owner_.store(std::thread::id(), std::memory_order_relaxed);
        m_.unlock();
    }
    /// Timed variants, for a waiter that must look around now and then (deadlock, signals).
    template <class Duration>
    bool try_lock_for(Duration d)
    {
        if (!m_.try_lock_for(d))
            return false;
        owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
        return true;
    }
    template <class Duration>
    bool try_lock_shared_for(Duration d)
    {
        return m_.try_lock_shared_for(d);
    }
    void lock_shared() { m_.lock_shared(); }
    bool try_lock_shared() { return m_.try_lock_shared(); }
    void unlock_shared() { m_.unlock_shared(); }
    /// Does the calling thread hold the lock exclusively (i.e. are we inside its operation)?
    bool held_by_me() const
    {
        return owner_.load(std::memory_order_relaxed) == std::this_thread::get_id();
    }
    /// The thread holding the lock exclusively, or std::thread::id() (none, or readers).
    std::thread::id owner() const { return owner_.load(std::memory_order_relaxed); }

private:
    std::shared_timed_mutex m_;
    std::atomic<std::thread::id> owner_{};
};

class Lockable {
public:
    ModelLock &lock() const { return lock_; }

private:
    mutable ModelLock lock_;
};

} // namespace gmem
