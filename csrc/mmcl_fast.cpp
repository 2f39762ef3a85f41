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

  // Op family B: shared-key attention, flash-style (DESIGN.md section 5.2). k is [B or 1, H, Lk, D]
  // (1: a key bank shared by the batch), bias [B or 1, H, Lq, Lk]; lse and colsum are float32
  // (float64 for float64 inputs); colsum (the column sums of P over valid queries) and dbias are
  // empty tensors unless asked for. grad_colsum is the loss's gradient with respect to colsum.
  m.def(
      "ska_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? key_padding_mask, "
      "Tensor? query_padding_mask, float scale, bool need_colsum) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ska_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, "
      "Tensor? key_padding_mask, Tensor? query_padding_mask, Tensor out, Tensor lse, "
      "Tensor? grad_colsum, float scale, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)");
}
