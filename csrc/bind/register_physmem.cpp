// SPDX-License-Identifier: MIT
// register_physmem.cpp - binds PhysMem: the buddy allocator, contents, RMP and ownership.
#include "common.hpp"

namespace gmem_bind __attribute__((visibility("hidden"))) {
namespace {
py::array_t<uint64_t> shifted_runs(const IntervalMap &map, uint64_t base)
{
    auto runs = map.runs(0, map.nr_pages());
    auto out = new_u64_2d(runs.size(), 3);
    uint64_t *p = out.mutable_data();
    for (const Run &r : runs) {
        *p++ = r.start + base;
        *p++ = r.end + base;
        *p++ = r.value;
    }
    return out;
}

} // namespace

void register_physmem(py::module_ &m)
{
    py::class_<PhysMem, std::shared_ptr<PhysMem>>(m, "PhysMem")
        .def(py::init([](py::handle nr_pages, py::handle base_pfn, py::handle seed) {
                 return new PhysMem(to_u64(nr_pages, "nr_pages"), to_u64(base_pfn, "base_pfn"),
                                    to_u64(seed, "seed"));
             }),
             py::arg("nr_pages"), py::kw_only(), py::arg("base_pfn") = 0, py::arg("seed") = 0)
        .def_property_readonly("nr_pages", &PhysMem::nr_pages)
        .def_property_readonly("base_pfn", &PhysMem::base_pfn)
        .def_property_readonly("seed", &PhysMem::seed)
        .def_property_readonly("nr_free",
                               [](const PhysMem &pm) {
                                   Guard lk(pm.lock(), Mode::Read);
                                   return pm.nr_free();
                               })
        .def_property_readonly("nr_kept",
                               [](const PhysMem &pm) {
                                   Guard lk(pm.lock(), Mode::Read);
                                   return pm.nr_kept();
                               })
        .def(
            "alloc",
            [](PhysMem &pm, py::handle o) {
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Write);
                return pm.user_alloc(order);
            },
            py::arg("order"))
        .def(
            "free",
            [](PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Write);
                pm.user_free(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "take",
            [](PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Write);
                pm.user_take(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "is_free",
            [](const PhysMem &pm, py::handle p, py::handle o) {
                uint64_t pfn = to_u64(p, "pfn");
                unsigned order = to_order(o);
                Guard lk(pm.lock(), Mode::Read);
                pm.check_block(pfn, order);
                return pm.is_free(pfn, order);
            },
            py::arg("pfn"), py::arg("order"))
        .def(
            "fragment",
            [](PhysMem &pm, py::handle f) {
                double fraction = to_double(f, "fraction");
                Guard lk(pm.lock(), Mode::Write);
                lk.nogil([&] {
                    pm.fragment(fraction);
                    return 0;
                });
            },
            py::arg("fraction"))
        .def(
            "read",
            [](const PhysMem &pm, py::handle p) {
                uint64_t pfn = to_u64(p, "pfn");
                Guard lk(pm.lock(), Mode::Read);
                return pm.read(pfn);
            },
            py::arg("pfn"))
        .def(
            "write",
            [](PhysMem &pm, py::handle p, py::handle t) {
                uint64_t pfn = to_u64(p, "pfn"), token = to_u64(t, "token");
                Guard lk(pm.lock(), Mode::Write);
                pm.write(pfn, token);
            },
            py::arg("pfn"), py::arg("token"))
        .def("rmp_runs",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 return shifted_runs(pm.rmp(), pm.base_pfn());
             })
        .def("content_runs",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 auto runs = pm.contents(pm.base_pfn(), pm.nr_pages());
                 auto out = new_u64_2d(runs.size(), 3);
                 std::memcpy(out.mutable_data(), runs.data(), runs.size() * sizeof(Run));
                 return out;
             })
        .def("owner_runs",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 return shifted_runs(pm.owner(), pm.base_pfn());
             })
        .def("free_blocks",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 if (pm.nr_free_blocks() > FREE_BLOCKS_LISTED)
                     throw invalid("self", std::to_string(pm.nr_free_blocks()) +
                                               " free blocks are more than free_blocks() "
                                               "lists (2**24); nr_free counts them");
                 auto blocks = pm.free_blocks();
                 auto out = new_u64_2d(blocks.size(), 2);
                 uint64_t *p = out.mutable_data();
                 for (const FreeBlock &b : blocks) {
                     *p++ = b.pfn;
                     *p++ = b.order;
                 }
                 return out;
             })
        .def("dump",
             [](const PhysMem &pm) {
                 Guard lk(pm.lock(), Mode::Read);
                 return pm.dump();
             })
        .def("__repr__", [](const PhysMem &pm) {
            Guard lk(pm.lock(), Mode::Read);
            return "<gmem." + first_line(pm.dump()) + ">";
        });
}

} // namespace gmem_bind
