// The Python module vlr_kernels._cuda. Importing it runs the static torch.library registrations of every
// csrc/cuda/*_binding.cpp (TORCH_LIBRARY_FRAGMENT(vlr_kernels, ...)); it exports nothing itself.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "vlr_kernels CUDA ops, registered as torch.ops.vlr_kernels.*"; }
