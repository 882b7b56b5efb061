// SPDX-License-Identifier: MIT
// errors.hpp - the exceptions the core throws; csrc/bind/module.cpp maps each to
// its Python type.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace gmem {

/// A bad argument (the kernel's EINVAL): ValueError in Python.  The message names the
/// argument and what it may be.
struct InvalidArgument : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

/// Physical memory ran out (ENOMEM): gmem.OutOfMemory in Python.
struct OutOfMemory : std::runtime_error {
    using std::runtime_error::runtime_error;
};

/// A call the model cannot take now: an arch hook changing the file it was called from.
/// RuntimeError in Python.
struct Reentrant : std::logic_error {
    using std::logic_error::logic_error;
};

/// A bad-argument error for @arg, e.g. invalid("start", "must be < end (got 5 >= 3)").
inline InvalidArgument invalid(const char *arg, const std::string &why)
{
    return InvalidArgument(std::string(arg) + ": " + why);
}

inline std::string hex(uint64_t v)
{
    static const char digits[] = "0123456789abcdef";
    std::string s;
    do {
        s.insert(s.begin(), digits[v & 15]);
        v >>= 4;
    } while (v);
    return "0x" + s;
}

} // namespace gmem
