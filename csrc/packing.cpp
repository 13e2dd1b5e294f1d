// Packing of pairs into microbatches and balancing across data-parallel ranks. Twins of
// vlr_runtime/data/packing.py: same greedy rules and the same tie-breaking, so both give identical plans.
#include <algorithm>
#include <numeric>
#include <queue>
#include <stdexcept>
#include <utility>

#include "data_index.h"

namespace vlr {

namespace {

// Items by decreasing key, ties by increasing index (a stable order every rank reproduces).
template <typename T>
std::vector<int64_t> order_desc(const T* key, int64_t n) {
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [key](int64_t x, int64_t y) { return key[x] > key[y]; });
    return order;
}

}  // namespace

std::vector<int64_t> balance_ranks(const DoubleArray& costs, int64_t num_ranks) {
    if (num_ranks <= 0) throw std::invalid_argument("num_ranks must be positive");
    const int64_t n = costs.size();
    const double* c = costs.data();
    std::vector<int64_t> owner(n);
    // Min-heap of (load, rank): the least-loaded rank, lowest rank on ties, takes the next largest item.
    using Entry = std::pair<double, int64_t>;
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    for (int64_t r = 0; r < num_ranks; ++r) heap.emplace(0.0, r);
    for (int64_t i : order_desc(c, n)) {
        auto [load, r] = heap.top();
        heap.pop();
        owner[i] = r;
        heap.emplace(load + c[i], r);
    }
    return owner;
}

std::vector<int64_t> pack_into_bins(const Int64Array& tokens, const DoubleArray& costs, int64_t num_bins,
                                    int64_t token_budget) {
    if (num_bins <= 0) throw std::invalid_argument("num_bins must be positive");
    const int64_t n = tokens.size();
    if (costs.size() != n) throw std::invalid_argument("tokens and costs differ in length");
    const int64_t* tok = tokens.data();
    const double* c = costs.data();
    std::vector<int64_t> bin_tokens(num_bins, 0), owner(n);
    std::vector<double> bin_cost(num_bins, 0.0);
    for (int64_t i : order_desc(tok, n)) {
        int64_t best = -1;
        for (int64_t b = 0; b < num_bins; ++b)
            if (bin_tokens[b] + tok[i] <= token_budget && (best < 0 || bin_cost[b] < bin_cost[best])) best = b;
        if (best < 0) return {};
        owner[i] = best;
        bin_tokens[best] += tok[i];
        bin_cost[best] += c[i];
    }
    return owner;
}

}  // namespace vlr
