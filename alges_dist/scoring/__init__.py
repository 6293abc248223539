"""Per-frame ALGES embeddings and uncertainty scores from one forward pass.

DESIGN "The math". With z the head conv's input (unfolded over its kh x kw taps),
p the softmax of the logits and y = argmax p the pseudo-label, the cross-entropy of
pixel (i, j) has the head-weight gradient G_ij = (p_ij - onehot(y_ij)) (outer) z_ij.

- ALGES-img (Eq. 4): the mean of G_ij over (valid) output pixels, i.e. the gradient
  of the frame's mean pseudo-label cross-entropy with respect to the head weight.
  Closed form: R = dL/dlogits = (p - onehot(y)) / n_valid, carried back through the
  head's upsampling (its adjoint, two small matrices), then sum_uv R_uv (outer) z_uv
  (alges_img.py). No backward pass, no per-pixel K x D tensor.
- ALGES-sem (Eq. 6): for each class k, the sum over pixels predicted as k of
  ||G_ij||_F = ||p_ij - onehot(y_ij)||_2 * ||z_ij||_2 (alges_sem.py).
  Upsampling heads (FPN, DeepLabV3Plus): the pixels are the OUTPUT pixels, the ones
  the pseudo-labels and the ignore mask live on, and G_ij is the exact gradient of
  pixel (i, j)'s cross-entropy, whose input vector is the upsampled unfolded z,
  U(z)_ij. So ALGES-img is still the mean of the same G_ij whose norms ALGES-sem sums,
  and both are checked against autograd. ||U(z)_ij|| is computed from inner products
  of neighbouring z vectors at the conv's resolution (input_norms.py), never by
  upsampling z itself.
- entropy (natural log), margin (p1 - p2) and least_confidence (1 - p1): means over
  valid pixels. feature: adaptive average pool of z (all pixels) for core-set.

Everything runs under torch.no_grad(): the backbone never requires grad. The model is
in eval mode for the call (BatchNorm running stats untouched) and its modes are
restored afterwards. Only the network runs under autocast; the math above is fp32.

Modules: batch.py (score_batch, the public entry), projection.py (the JL projection),
closed_form.py (the per-pixel math, eager: the CPU path), compiled.py (the same math for
torch.compile: the CUDA path), alges_img.py, alges_sem.py, input_norms.py (the kernels).
"""

from alges_dist.scoring.batch import (
    MATH_PATHS,
    SCALAR_SCORE_NAMES,
    SCORE_NAMES,
    head_scores,
    resolve_math_path,
    score_batch,
    score_dims,
)
from alges_dist.scoring.projection import ProjectionCache, gaussian_projection_matrix

__all__ = [
    "MATH_PATHS",
    "SCALAR_SCORE_NAMES",
    "SCORE_NAMES",
    "ProjectionCache",
    "gaussian_projection_matrix",
    "head_scores",
    "resolve_math_path",
    "score_batch",
    "score_dims",
]
