// The one place where every op of mmcl_fast._C gets its schema. Kernels register implementations
// per dispatch key in csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu; the Python side adds the
// fake (meta) kernels and the autograd formulas (mmcl_fast/ops/<family>.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing mmcl_fast._C runs the static TORCH_LIBRARY initialisers; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mmcl_fast, m) {
  // Op family A: per-modality gradient-modulated optimizer steps (DESIGN.md section 4.2).
  // One call updates a list of tensors of one device and dtype that share one param group.
  m.def(
      "modality_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float[] steps, Tensor coefficients, "
      "int modality, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool noise, int seed, int noise_step, int[] tensor_ids, Tensor?[] anchors, "
      "Tensor?[] anchor_weights, float anchor_lambda) -> ()");
  m.def(
      "modality_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "int[] first_step, Tensor coefficients, int modality, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool noise, int seed, int noise_step, "
      "int[] tensor_ids, Tensor?[] anchors, Tensor?[] anchor_weights, float anchor_lambda) -> ()");
}
