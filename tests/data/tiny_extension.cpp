// A minimal extension for the build-and-load tests of peer_kernels.csrc (tests/test_faults.py): it
// compiles in seconds, unlike the real backend, and includes no torch headers.
#include <pybind11/pybind11.h>

int answer() { return 42; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
