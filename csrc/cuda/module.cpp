// The Python module vlr_kernels._cuda. Importing it loads this library, whose static initialisers run the
// torch.library registrations of every csrc/cuda/*_binding.cpp (TORCH_LIBRARY_FRAGMENT(vlr_kernels, ...)); the module
// itself exports nothing. Plain CPython API instead of torch/extension.h: the latter costs ~20 s of compile time.
#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _cuda
#endif
#define VLR_CONCAT_(a, b) a##b
#define VLR_CONCAT(a, b) VLR_CONCAT_(a, b)
#define VLR_STR_(a) #a
#define VLR_STR(a) VLR_STR_(a)

static PyModuleDef vlr_cuda_module = {
    PyModuleDef_HEAD_INIT, VLR_STR(TORCH_EXTENSION_NAME),
    "vlr_kernels CUDA ops, registered as torch.ops.vlr_kernels.* when this module is imported", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC VLR_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&vlr_cuda_module); }
