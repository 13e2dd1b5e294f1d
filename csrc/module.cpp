// pybind11 bindings of vlr_runtime._C: the native data-path hot loops. Arrays are numpy int64/float64
// (pass tensor.numpy()); errors in the inputs raise ValueError like the Python twins.
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>

#include "data_index.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "Native data-path hot loops of vlr_runtime (Python twins in vlr_runtime/data/)";
    m.def(
        "mrope_position_ids",
        [](const vlr::Int64Array& ids, const vlr::Int64Array& cu, const vlr::Int64Array& grids, int64_t image_token_id,
           int64_t merge, std::optional<vlr::Int64Array> prefix, std::optional<vlr::Int64Array> split) {
            return vlr::mrope_position_ids(ids, cu, grids, image_token_id, merge, prefix ? &*prefix : nullptr,
                                           split ? &*split : nullptr);
        },
        py::arg("input_ids"), py::arg("cu_seqlens"), py::arg("group_grid_thw"), py::arg("image_token_id"),
        py::arg("spatial_merge_size"), py::arg("prefix_lens") = py::none(), py::arg("split_lens") = py::none(),
        "[3, T] int64 M-RoPE position ids of a packed token axis");
    m.def(
        "vision_window_index",
        [](const vlr::Int64Array& grids, int64_t merge, int64_t window_size, int64_t patch_size) {
            auto r = vlr::vision_window_index(grids, merge, window_size, patch_size);
            vlr::Int64Array cu(static_cast<py::ssize_t>(r.cu_window_seqlens.size()));
            std::copy(r.cu_window_seqlens.begin(), r.cu_window_seqlens.end(), cu.mutable_data());
            return py::make_tuple(r.window_index, r.reverse_index, cu);
        },
        py::arg("grid_thw"), py::arg("spatial_merge_size"), py::arg("window_size"), py::arg("patch_size"),
        "(window_index [U], reverse_index [U], cu_window_seqlens [W+1]) int64");
    m.def("balance_ranks", &vlr::balance_ranks, py::arg("costs"), py::arg("num_ranks"),
          "rank of each item (longest-processing-time first)");
    m.def("pack_into_bins", &vlr::pack_into_bins, py::arg("tokens"), py::arg("costs"), py::arg("num_bins"),
          py::arg("token_budget"), "bin of each item, or [] when the items do not fit");
}
