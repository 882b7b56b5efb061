// SPDX-License-Identifier: MIT
// register_interval_map.cpp - binds IntervalMap, the attribute store.
#include "common.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {
namespace {

} // namespace

void register_interval_map(py::module_ &m)
{
    py::class_<IntervalMap>(m, "IntervalMap")
        .def(py::init([](py::handle nr_pages, py::handle dflt) {
                 return new IntervalMap(to_u64(nr_pages, "nr_pages"), to_u64(dflt, "default"));
             }),
             py::arg("nr_pages"), py::arg("default") = 0)
        .def_property_readonly("nr_pages", &IntervalMap::nr_pages)
        .def_property_readonly("memory_bytes",
                               [](const IntervalMap &im) {
                                   Guard lk(im.lock(), Mode::Read);
                                   return im.memory_bytes();
                               })
        .def("__len__",
             [](const IntervalMap &im) {
                 Guard lk(im.lock(), Mode::Read);
                 return im.nr_runs();
             })
        .def(
            "store",
            [](IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                uint64_t value = to_u64(v, "value");
                Guard lk(im.lock(), Mode::Write);
                im.store(start, end, value);
            },
            py::arg("start"), py::arg("end"), py::arg("value"))
        .def(
            "load",
            [](const IntervalMap &im, py::handle i) {
                uint64_t index = to_u64(i, "index");
                Guard lk(im.lock(), Mode::Read);
                return im.load(index);
            },
            py::arg("index"))
        .def(
            "range_has",
            [](const IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                uint64_t start = to_u64(s, "start"), end = to_u64(e, "end");
                uint64_t value = to_u64(v, "value");
                Guard lk(im.lock(), Mode::Read);
                return im.range_has(start, end, value);
            },
            py::arg("start"), py::arg("end"), py::arg("value"))
        .def(
            "runs",
            [](const IntervalMap &im, py::handle s, py::handle e) {
                uint64_t start = to_u64(s, "start"), end = to_end(e, im.nr_pages());
                Guard lk(im.lock(), Mode::Read);
                size_t n = im.count_runs(start, end);
                auto out = new_u64_2d(n, 3);
                auto *rows = reinterpret_cast<Run *>(out.mutable_data());
                lk.nogil([&] { return im.runs(start, end, rows, n); });
                return out;
            },
            py::arg("start") = 0, py::arg("end") = py::none())
        .def(
            "store_many",
            [](IntervalMap &im, py::handle s, py::handle e, py::handle v) {
                Columns cols = to_columns(s, e, v, "starts", "ends", "values");
                Guard lk(im.lock(), Mode::Write);
                // The arrays are our own contiguous copies or views we hold references to.
                lk.nogil([&] {
                    im.store_many(cols.a.data(), cols.b.data(), cols.c.data(), cols.n);
                    return 0;
                });
            },
            py::arg("starts"), py::arg("ends"), py::arg("values"))
        .def("dump",
             [](const IntervalMap &im) {
                 Guard lk(im.lock(), Mode::Read);
                 return im.dump();
             })
        .def("__repr__", [](const IntervalMap &im) {
            Guard lk(im.lock(), Mode::Read);
            return "<gmem." + first_line(im.dump()) + ">";
        });
}

} // namespace gmem_bind
