// Native hot loops of the data path (pybind11 module vlr_runtime._C). Python twins: vlr_runtime/data/*.py.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace vlr {

using Int64Array = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;
using DoubleArray = pybind11::array_t<double, pybind11::array::c_style | pybind11::array::forcecast>;

// [3, T] M-RoPE position ids of a packed token axis (see vlr_runtime/data/positions.py).
Int64Array mrope_position_ids(const Int64Array& input_ids, const Int64Array& cu_seqlens, const Int64Array& grids,
                              int64_t image_token_id, int64_t merge, const Int64Array* prefix_lens,
                              const Int64Array* split_lens);

struct WindowIndex {
    Int64Array window_index;
    Int64Array reverse_index;
    std::vector<int64_t> cu_window_seqlens;
};

// Vision window permutation of merged units and window boundaries (see vlr_runtime/data/windows.py).
WindowIndex vision_window_index(const Int64Array& grids, int64_t merge, int64_t window_size, int64_t patch_size);

// Longest-processing-time assignment of items to ranks (see vlr_runtime/data/packing.py).
std::vector<int64_t> balance_ranks(const DoubleArray& costs, int64_t num_ranks);

// Items into exactly num_bins bins under a token budget, least-cost bin first; empty vector if they do not fit.
std::vector<int64_t> pack_into_bins(const Int64Array& tokens, const DoubleArray& costs, int64_t num_bins,
                                    int64_t token_budget);

}  // namespace vlr
