// SPDX-License-Identifier: MIT
// lockable.hpp - the reader/writer lock each shared core object carries.
//
// The core data structures do not lock internally (kernel style: the caller holds the
// owner's lock, like the inode's invalidate lock).  Whoever hands an object to several
// threads - the Python bindings, which drop the GIL in long loops - takes lock() shared
// for queries and exclusive for updates.
#pragma once

#include <shared_mutex>

namespace gmem {

class Lockable {
public:
    std::shared_mutex &lock() const { return lock_; }

private:
    mutable std::shared_mutex lock_;
};

} // namespace gmem
