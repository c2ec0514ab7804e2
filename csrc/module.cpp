// The extension module exists only so that importing hf_efficient._C runs the static
// TORCH_LIBRARY registrations of the other translation units; it exports no Python functions.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {
      PyModuleDef_HEAD_INIT, "_C",
      "hf_efficient C++ CPU kernels; use them through torch.ops.hf_efficient.*", -1, nullptr};
  return PyModule_Create(&def);
}
