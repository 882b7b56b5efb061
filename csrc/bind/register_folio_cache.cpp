// SPDX-License-Identifier: MIT
// register_folio_cache.cpp - binds FolioCache, the page cache on its own.
#include "common.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {
namespace {

} // namespace

void register_folio_cache(py::module_ &m)
{
    PYBIND11_NUMPY_DTYPE(FolioRow, index, order, pfn, pins, mapped, uptodate);
    m.attr("FOLIO_DTYPE") = py::dtype::of<FolioRow>();

    py::class_<FolioCache>(m, "FolioCache")
        .def(py::init<>())
        .def("__len__",
             [](const FolioCache &c) {
                 Guard lk(c.lock(), Mode::Read);
                 return c.nr_folios();
             })
        .def_property_readonly("nr_pages",
                               [](const FolioCache &c) {
                                   Guard lk(c.lock(), Mode::Read);
                                   return c.nr_pages();
                               })
        .def_property_readonly("memory_bytes",
                               [](const FolioCache &c) {
                                   Guard lk(c.lock(), Mode::Read);
                                   return c.memory_bytes();
                               })
        .def(
            "add_folio",
            [](FolioCache &c, py::handle i, py::handle o, py::handle p, bool uptodate) {
                uint64_t index = to_u64(i, "index"), pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(c.lock(), Mode::Write);
                c.add(index, order, pfn, uptodate);
            },
            py::arg("index"), py::arg("order"), py::arg("pfn"), py::arg("uptodate") = false)
        .def(
            "add_folios",
            [](FolioCache &c, py::handle i, py::handle o, py::handle p) {
                Columns cols = to_columns(i, o, p, "index", "order", "pfn");
                Guard lk(c.lock(), Mode::Write);
                lk.nogil([&] {
                    c.add_many(cols.a.data(), cols.b.data(), cols.c.data(), cols.n);
                    return 0;
                });
            },
            py::arg("index"), py::arg("order"), py::arg("pfn"))
        .def(
            "remove_folio",
            [](FolioCache &c, py::handle i) {
                uint64_t index = to_u64(i, "index");
                Guard lk(c.lock(), Mode::Write);
                Folio f = c.remove(index);
                return py::make_tuple(f.index, f.order, f.pfn);
            },
            py::arg("index"))
        .def(
            "lookup",
            [](const FolioCache &c, py::handle i) -> py::object {
                uint64_t index = to_u64(i, "index");
                Guard lk(c.lock(), Mode::Read);
                Folio f;
                if (!c.lookup(index, &f))
                    return py::none();
                return py::make_tuple(f.index, f.order, f.pfn);
            },
            py::arg("index"))
        .def(
            "split",
            [](FolioCache &c, py::handle i, py::handle o) {
                uint64_t index = to_u64(i, "index");
                unsigned new_order = to_order(o, "new_order");
                Guard lk(c.lock(), Mode::Write);
                c.split(index, new_order);
            },
            py::arg("index"), py::arg("new_order"))
        .def(
            "split_range",
            [](FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                Guard lk(c.lock(), Mode::Write);
                return c.split_range(start, end);
            },
            py::arg("start"), py::arg("end"))
        .def(
            "folios",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, NO_PFN);
                check_start_end(start, end);
                Guard lk(c.lock(), Mode::Read);
                return folio_rows(c.folios(start, end));
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "pfn_ranges",
            [](const FolioCache &c, py::handle s, py::handle e, py::handle o) -> py::object {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                std::optional<OutRows> into;
                if (!o.is_none())
                    into.emplace(o);
                Guard lk(c.lock(), Mode::Read);
                size_t n = c.count(start, end);
                py::array_t<uint64_t> fresh;
                PfnRange *ranges;
                if (into) {
                    ranges = into->rows(n);
                } else {
                    fresh = new_u64_2d(n, 2);
                    ranges = reinterpret_cast<PfnRange *>(fresh.mutable_data());
                }
                lk.nogil([&] { return c.pfn_ranges(start, end, ranges); });
                return into ? into->answer(n) : py::object(fresh);
            },
            py::arg("start"), py::arg("end"), py::arg("out") = py::none())
        .def(
            "pfn_batches",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                Guard lk(c.lock(), Mode::Read);
                py::list batches;
                c.walk_batches(start, end, [&](const Folio *, const PfnRange *r, unsigned n) {
                    auto a = new_u64_2d(n, 2);
                    std::memcpy(a.mutable_data(), r, n * sizeof(PfnRange));
                    batches.append(a);
                });
                return batches;
            },
            py::arg("start"), py::arg("end"))
        .def(
            "page_pfns",
            [](const FolioCache &c, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                check_start_end(start, end);
                check_page_count(start, end);
                py::array_t<uint64_t> out(py::ssize_t(end - start));
                Guard lk(c.lock(), Mode::Read);
                uint64_t *p = out.mutable_data();
                lk.nogil([&] {
                    c.page_pfns(start, end, p);
                    return 0;
                });
                return out;
            },
            py::arg("start"), py::arg("end"))
        .def("dump",
             [](const FolioCache &c) {
                 Guard lk(c.lock(), Mode::Read);
                 return c.dump();
             })
        .def("__repr__", [](const FolioCache &c) {
            Guard lk(c.lock(), Mode::Read);
            return "<gmem." + first_line(c.dump()) + ">";
        });
}

} // namespace gmem_bind
