// SPDX-License-Identifier: MIT
// register_clamp.cpp - binds clamp_folio_ranges, the exhaustive PFN-walk check and the host
// load-latency probe that gmem bench quotes beside its cold figures.
#include "common.hpp"
#include "gmem/host.hpp"
#include "gmem/pfn_check.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {
namespace {

} // namespace

void register_clamp(py::module_ &m)
{
    m.def(
        "_host_load_latency_ns",
        [](py::handle b, py::handle s) {
            uint64_t bytes = to_u64(b, "bytes"), steps = to_u64(s, "steps");
            if (bytes > (uint64_t(1) << 30))
                throw invalid("bytes", "must be at most 2**30, got " + std::to_string(bytes));
            if (steps > (uint64_t(1) << 26))
                throw invalid("steps", "must be at most 2**26, got " + std::to_string(steps));
            py::gil_scoped_release nogil;
            return host_load_latency_ns(bytes, steps);
        },
        py::arg("bytes"), py::arg("steps"),
        "Nanoseconds per dependent load through @bytes of memory (gmem bench's context).");
    m.def(
        "check_pfn_exhaustive",
        [](py::handle o) {
            unsigned size_order = unsigned(std::min<uint64_t>(to_u64(o, "size_order"), 99));
            PfnCheckReport rep;
            {
                py::gil_scoped_release nogil; // pure C++ on objects it creates itself
                rep = check_pfn_exhaustive(size_order);
            }
            py::dict d;
            d["ok"] = rep.ok;
            d["files"] = rep.files;
            d["layouts"] = rep.layouts;
            d["ranges"] = rep.ranges;
            if (!rep.ok) {
                py::list layout, expected, emitted;
                for (const Folio &f : rep.layout)
                    layout.append(py::make_tuple(f.index, f.order, f.pfn));
                for (const PfnRange &r : rep.expected)
                    expected.append(py::make_tuple(r.start_pfn, r.end_pfn));
                for (const PfnRange &r : rep.emitted)
                    emitted.append(py::make_tuple(r.start_pfn, r.end_pfn));
                d["layout"] = layout;
                d["start"] = rep.start;
                d["end"] = rep.end;
                d["expected"] = expected;
                d["emitted"] = emitted;
                d["what"] = rep.what;
            }
            return d;
        },
        py::arg("size_order"));
    m.def(
        "clamp_folio_ranges",
        [](py::handle i, py::handle o, py::handle p, py::handle s, py::handle e,
           py::handle out_arg) -> py::object {
            Columns cols = to_columns(i, o, p, "index", "order", "pfn");
            uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
            check_start_end(start, end);
            std::optional<OutRows> into;
            if (!out_arg.is_none()) {
                into.emplace(out_arg);
                py::object may_share = py::module_::import("numpy").attr("may_share_memory");
                const std::pair<const char *, py::handle> inputs[] = {
                    {"index", cols.a}, {"order", cols.b}, {"pfn", cols.c}};
                for (const auto &in : inputs)
                    if (may_share(into->array, in.second).cast<bool>())
                        throw invalid("out", std::string("must not share memory with ") +
                                                 in.first);
            }
            size_t n = cols.n;
            const uint64_t *ip = cols.a.data(), *op = cols.b.data(), *pp = cols.c.data();
            size_t first = 0, count = 0;
            {
                // Safe without the GIL: the three arrays are contiguous and referenced here.
                py::gil_scoped_release nogil;
                // The caller's buffer keeps its contents if the layout is bad: validated
                // whole before the pass that writes.
                if (into)
                    check_folio_layout(ip, op, pp, n);
                count = count_clamped(ip, op, n, start, end, &first);
            }
            py::array_t<uint64_t> fresh;
            PfnRange *ranges;
            if (into) {
                ranges = into->rows(count);
            } else {
                fresh = new_u64_2d(count, 2);
                ranges = reinterpret_cast<PfnRange *>(fresh.mutable_data());
            }
            {
                py::gil_scoped_release nogil;
                clamp_folio_ranges(ip, op, pp, n, first, count, start, end, ranges);
            }
            return into ? into->answer(count) : py::object(fresh);
        },
        py::arg("index"), py::arg("order"), py::arg("pfn"), py::arg("start"), py::arg("end"),
        py::arg("out") = py::none());
}


} // namespace gmem_bind
