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
  // The row-sparse (lazy) AdamW step of one parameter: only the U listed rows of param [N, ...]
  // (row size R = numel / N), exp_avg and exp_avg_sq are read and written. rows [U] int64, distinct
  // and in [0, N); grad_rows [U, ...], row i being the gradient of row rows[i]; step: the
  // parameter's count after this step; anchor: its first n_a rows ([n_a, ...]) or absent;
  // anchor_weight: 1 (scalar), n_a (per row) or n_a R (per element) values, or absent (weight 1).
  // The maths: mmcl_fast/ops/modality_step.py (_reference_adamw_rows_).
  m.def(
      "modality_adamw_rows_(Tensor(a!) param, Tensor rows, Tensor grad_rows, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, float step, Tensor coefficients, int modality, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, Tensor? anchor, Tensor? anchor_weight, "
      "float anchor_lambda) -> ()");

  // Op family B: shared-key attention, flash-style (DESIGN.md section 5.2). k is [B or 1, H, Lk, D]
  // (1: a key bank shared by the batch), bias [B or 1, H, Lq, Lk]; lse and colsum are float32
  // (float64 for float64 inputs); colsum (the column sums of P over valid queries) and dbias are
  // empty tensors unless asked for. grad_colsum is the loss's gradient with respect to colsum;
  // grad_width [B, H, Lq] and grad_height [B, H, Lk] (acc) are the loss's gradients with respect
  // to the pooled score maps w_i = qv_i sum_j kv_j S_ij and u_j = kv_j sum_i qv_i S_ij (masked
  // by qv and kv): they add kv_j grad_width_i + qv_i grad_height_j to dS.
  // Dropout on P (dropout_p in [0, 1); dropout_seed: int64 [1] on q's device, required when
  // dropout_p > 0): out = (P Z) v with Z_ij = keep_ij / (1 - p), keep drawn by Philox4x32-10 from
  // the seed and (j >> 2, i, b H + h) (mmcl_fast/ops/shared_key_attention.py: dropout_keep), so
  // the backward, given the same p and seed, regenerates the forward's mask. lse and colsum are
  // of the undropped P; out (saved, passed back) is the dropped output.
  m.def(
      "ska_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? key_padding_mask, "
      "Tensor? query_padding_mask, float scale, bool need_colsum, float dropout_p=0., "
      "Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ska_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, "
      "Tensor? key_padding_mask, Tensor? query_padding_mask, Tensor out, Tensor lse, "
      "Tensor? grad_colsum, Tensor? grad_width, Tensor? grad_height, float scale, "
      "bool need_dbias, float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // The pooled score maps (width [B, H, Lq], height [B, H, Lk], acc) by their closed forms, and,
  // against the teacher's maps (acc, or absent), the asymmetric ReLU distance per (b, h) (dist
  // [B, H]) with its gradients with respect to width and height (empty when that teacher is
  // absent). The maths: mmcl_fast/ops/shared_key_attention.py.
  m.def(
      "ska_score_maps(Tensor q, Tensor k, Tensor? bias, Tensor? key_padding_mask, "
      "Tensor? query_padding_mask, Tensor? teacher_width, Tensor? teacher_height, float scale, "
      "bool normalize) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Op family C: embedding modulation and the knowledge-graph kernels (DESIGN.md section 6).
  // Contract (the maths and every shape/dtype): mmcl_fast/ops/modulated_embedding.py and
  // mmcl_fast/ops/filtered_rank.py. "acc" below is float32 (float64 for float64 inputs).
  //
  // tables [M, N, D], index [B] int64, gamma/beta [M, D], gate_logits [B, M] or [M] or absent,
  // modality_mask [N, M] bool or absent -> out [B, D], gates [B, M] acc (the masked softmax).
  m.def(
      "modulated_embedding_forward(Tensor tables, Tensor index, Tensor gamma, Tensor beta, "
      "Tensor? gate_logits, Tensor? modality_mask) -> (Tensor, Tensor)");
  // -> grad_tables (dense [M, N, D], or when sparse the COO values [M, B, D]), grad_gamma [M, D],
  //    grad_beta [M, D], grad_logits [B, M] acc (per sample; the caller sums it for shared gates)
  m.def(
      "modulated_embedding_backward(Tensor grad_out, Tensor tables, Tensor index, Tensor gamma, "
      "Tensor beta, Tensor gates, bool sparse) -> (Tensor, Tensor, Tensor, Tensor)");
  // out_k = (1 - 1/i) prev_k + (1/i) sigma_k new_k / max(||new_k||_F, eps); sigma [K] acc;
  // -> outs, norms [K] acc (||new_k||_F)
  m.def(
      "interpolate_weights_forward(Tensor[] prev, Tensor[] new, Tensor sigma, float i, float eps) "
      "-> (Tensor[], Tensor)");
  // -> grad_new (list), grad_sigma [K] acc; grad_prev is (1 - 1/i) grad_out, done by the caller
  m.def(
      "interpolate_weights_backward(Tensor[] grad_out, Tensor[] new, Tensor sigma, Tensor norms, "
      "float i, float eps) -> (Tensor[], Tensor)");
  // per-tensor sums_k = sum w_k (p_k - a_k)^2 -> [K] acc; w absent (1), one element, per row
  // ([p.size(0)]) or per element (p's shape)
  m.def("anchor_penalty_forward(Tensor[] params, Tensor[] anchors, Tensor?[] weights) -> Tensor");
  // grad_p_k = 2 grad_k w_k (p_k - a_k), grad [K] acc
  m.def(
      "anchor_penalty_backward(Tensor grad, Tensor[] params, Tensor[] anchors, Tensor?[] weights) "
      "-> Tensor[]");
  // queries [B, D], entities [N, D], target [B] int64, filter CSR (indptr [B+1], indices [nnz],
  // int64, rows sorted ascending, duplicates counted once); score 0 transe_l1, 1 transe_l2,
  // 2 distmult, 3 complex, 4 rotate, 5 dot -> greater [B] int64, equal [B] int64 over the
  // candidates c < num_candidates, c != target, c not in the filter row
  m.def(
      "filtered_rank_counts(Tensor queries, Tensor entities, Tensor target, Tensor filter_indptr, "
      "Tensor filter_indices, int score, int num_candidates) -> (Tensor, Tensor)");
  // Knowledge-graph triple scores with negatives (mmcl_fast/ops/kge_scores.py): entities [U, D],
  // relations [b, Dr] (Dr = D, D / 2 for rotate's phases), heads / tails [b] int64, negatives
  // [b, K] int64 (the first num_head replace the head, the rest the tail), all ids in [0, U);
  // score 0 transe_l1, 1 transe_l2, 2 distmult, 3 complex, 4 rotate -> pos [b] acc, neg [b, K] acc
  m.def(
      "kge_scores_forward(Tensor entities, Tensor relations, Tensor heads, Tensor tails, "
      "Tensor negatives, int num_head, int score) -> (Tensor, Tensor)");
  // grad_pos [b] acc, grad_neg [b, K] acc -> grad_entities [U, D] (every occurrence accumulated),
  // grad_relations [b, Dr]; recomputed from the inputs (nothing of the forward is saved)
  m.def(
      "kge_scores_backward(Tensor grad_pos, Tensor grad_neg, Tensor entities, Tensor relations, "
      "Tensor heads, Tensor tails, Tensor negatives, int num_head, int score) -> (Tensor, Tensor)");
}
