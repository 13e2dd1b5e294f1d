// Index computations of the data path that run once per batch on the CPU: M-RoPE 3D position ids of packed
// sequences and the vision window permutation. Twins of vlr_runtime/data/positions.py and windows.py (same
// results, checked by property tests); here they are single linear passes with no temporaries.
#include "data_index.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace vlr {

namespace {

int64_t at(const Int64Array& a, int64_t i) { return a.data()[i]; }

}  // namespace

// Positions restart at 0 in every segment. A segment with the shared-prompt layout [prompt | chosen | rejected]
// is walked as two branches: [0, split) from position 0, then [split, len) from the position reached after the
// prompt, i.e. as if the rejected part directly followed the prompt.
Int64Array mrope_position_ids(const Int64Array& input_ids, const Int64Array& cu_seqlens, const Int64Array& grids,
                              int64_t image_token_id, int64_t merge, const Int64Array* prefix_lens,
                              const Int64Array* split_lens) {
    const int64_t total = input_ids.size();
    const int64_t n_seg = cu_seqlens.size() - 1;
    if (n_seg < 0 || at(cu_seqlens, 0) != 0 || at(cu_seqlens, n_seg) != total)
        throw std::invalid_argument("cu_seqlens must run from 0 to T=" + std::to_string(total));
    if (grids.ndim() != 2 || grids.shape(1) != 3) throw std::invalid_argument("group grids must be [G, 3]");
    const int64_t n_groups = grids.shape(0);
    if ((prefix_lens == nullptr) != (split_lens == nullptr))
        throw std::invalid_argument("prefix_lens and split_lens go together (shared-prompt layout)");
    if (prefix_lens && (prefix_lens->size() != n_seg || split_lens->size() != n_seg))
        throw std::invalid_argument("prefix_lens/split_lens need one entry per segment");
    const int64_t* ids = input_ids.data();
    const int64_t* g = grids.data();
    Int64Array out({int64_t(3), total});
    int64_t* pt = out.mutable_data();
    int64_t* ph = pt + total;
    int64_t* pw = ph + total;
    int64_t group = 0;
    for (int64_t s = 0; s < n_seg; ++s) {
        const int64_t a = at(cu_seqlens, s), b = at(cu_seqlens, s + 1);
        if (b < a) throw std::invalid_argument("cu_seqlens must be non-decreasing");
        const int64_t len = b - a;
        const int64_t pre = prefix_lens ? at(*prefix_lens, s) : len;
        const int64_t spl = split_lens ? at(*split_lens, s) : len;
        if (pre < 0 || pre > spl || spl > len)
            throw std::invalid_argument("need 0 <= prefix_len <= split_len <= segment length for every segment");
        int64_t pos = 0, pos_after_prompt = pre == 0 ? 0 : -1;
        int64_t i = 0;
        while (i < len) {
            if (i == spl) pos = pos_after_prompt;
            const int64_t branch_end = i < spl ? spl : len;
            if (ids[a + i] != image_token_id) {
                pt[a + i] = ph[a + i] = pw[a + i] = pos;
                ++pos;
                ++i;
            } else {
                if (group >= n_groups) throw std::invalid_argument("more image tokens than the image groups need");
                const int64_t t = g[3 * group], h = g[3 * group + 1], w = g[3 * group + 2];
                if (t <= 0 || h <= 0 || w <= 0 || h % merge || w % merge)
                    throw std::invalid_argument("group grids must be positive with h, w multiples of merge");
                const int64_t lh = h / merge, lw = w / merge, n = t * lh * lw;
                if (i + n > branch_end || (i < pre && i + n > pre))
                    throw std::invalid_argument("an image group straddles a segment or prompt/response boundary");
                for (int64_t j = 0; j < n; ++j) {
                    if (ids[a + i + j] != image_token_id)
                        throw std::invalid_argument("an image group's tokens are not contiguous");
                    pt[a + i + j] = pos + j / (lh * lw);
                    ph[a + i + j] = pos + (j % (lh * lw)) / lw;
                    pw[a + i + j] = pos + j % lw;
                }
                pos += std::max(lh, lw);
                i += n;
                ++group;
            }
            if (i == pre && pos_after_prompt < 0) pos_after_prompt = pos;
        }
    }
    if (group != n_groups) throw std::invalid_argument("fewer image tokens than the image groups need");
    return out;
}

WindowIndex vision_window_index(const Int64Array& grids, int64_t merge, int64_t window_size, int64_t patch_size) {
    if (grids.ndim() != 2 || grids.shape(1) != 3) throw std::invalid_argument("grid_thw must be [I, 3]");
    const int64_t ws = window_size / merge / patch_size;
    if (ws <= 0) throw std::invalid_argument("window_size smaller than one merged unit");
    const int64_t n_img = grids.shape(0);
    const int64_t* g = grids.data();
    int64_t units = 0;
    for (int64_t k = 0; k < n_img; ++k) {
        if (g[3 * k] <= 0 || g[3 * k + 1] <= 0 || g[3 * k + 2] <= 0 || g[3 * k + 1] % merge || g[3 * k + 2] % merge)
            throw std::invalid_argument("grid h and w must be positive multiples of spatial_merge_size");
        units += g[3 * k] * (g[3 * k + 1] / merge) * (g[3 * k + 2] / merge);
    }
    WindowIndex r{Int64Array(units), Int64Array(units), {0}};
    int64_t* wi = r.window_index.mutable_data();
    int64_t* rev = r.reverse_index.mutable_data();
    const int64_t unit = merge * merge;
    int64_t slot = 0, base = 0;
    for (int64_t k = 0; k < n_img; ++k) {
        const int64_t t = g[3 * k], lh = g[3 * k + 1] / merge, lw = g[3 * k + 2] / merge;
        for (int64_t f = 0; f < t; ++f)
            for (int64_t r0 = 0; r0 < lh; r0 += ws)
                for (int64_t c0 = 0; c0 < lw; c0 += ws) {
                    const int64_t r1 = std::min(r0 + ws, lh), c1 = std::min(c0 + ws, lw);
                    for (int64_t rr = r0; rr < r1; ++rr)
                        for (int64_t cc = c0; cc < c1; ++cc) {
                            const int64_t u = base + (f * lh + rr) * lw + cc;
                            wi[slot] = u;
                            rev[u] = slot;
                            ++slot;
                        }
                    r.cu_window_seqlens.push_back(slot * unit);
                }
        base += t * lh * lw;
    }
    return r;
}

}  // namespace vlr
