"""How a reset re-initialises the adapter (relora.reinit), the backend-agnostic part.

* ``random`` (the paper): A ~ Kaiming-uniform from (seed, restart index, module name), B = 0.
* ``gradient``: A = the top-r right singular vectors of the frozen weight's gradient G at the reset
  (the subspace GaLore projects onto and LoRA-GA initialises A with), B = 0. B's first gradient is
  s * G A^T, the largest a rank-r A of this norm can give, where a random A catches ~r/in of it.
* ``project``: A as gradient; the adapters' Adam moments are carried into the new subspace instead of
  pruned (``project_b_moments``).

G needs no extra forward or backward. The step before a reset runs at LR 0 and the merge does not
change the function, so the gradient of that step's loss w.r.t. the effective weight W + s*B*A IS the
gradient at the reset point. Each ReLoRALinear sees it as g^T x (g: the gradient of its output, x its
input) and, during that one step, folds it into a randomized two-sided sketch (Tropp, Yurtsever, Udell,
Cevher, "Practical sketching algorithms for low-rank matrix approximation", SIAM J. Matrix Anal.
Appl. 2017, Alg. 4 + 7) instead of forming the out x in matrix:

    Y = G @ Omega  [out, k]        Z = Psi @ G  [l, in]        k = min(2r, in, out), l = min(2k + 1, out)

Both are linear in G, so every rank sketches its own micro-batches and one SUM all-reduce (of
(out + in) x ~3r floats per module, about 3x the adapter) gives the sketch of the global batch's
gradient, whatever the engine shards: x and g are whole activations under ZeRO-2, ZeRO-3 and FSDP2.
From it: Q = qr(Y), X = lstsq(Psi Q, Z), G ~ Q X, A = top-r right singular vectors of X.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from relora_dist.relora.algebra import _generator, _stable_seed
from relora_dist.relora.rules import REINITS  # noqa: F401  (the values, defined with the other rules)

# Rows of today's A (Kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in))) have E|a|^2 = in * (1/in) / 3: the
# orthonormal singular vectors are scaled to this norm, so s*B*A and A's Adam updates keep their size.
A_ROW_NORM = 1.0 / math.sqrt(3.0)


def sketch_sizes(r: int, out_features: int, in_features: int) -> tuple[int, int]:
    """(k, l): range and co-range sketch widths. Oversampling k = 2r and l = 2k + 1 is the rule of
    Tropp et al. (§4.5); capped where the sketch would be the whole matrix anyway."""
    k = min(2 * r, in_features, out_features)
    return k, min(2 * k + 1, out_features)


class GradSketch:
    """The two sketches of one ReLoRALinear's weight gradient, summed over the micro-batches of one
    step (the first `limit` of them on this rank; 0 = all). Omega and Psi are Gaussian, drawn from
    (seed, restart index, module name): identical on every rank, so the sums over ranks are the
    sketch of the summed gradient."""

    def __init__(self, r: int, out_features: int, in_features: int, seed: int, restart_index: int,
                 name: str, device: torch.device, limit: int = 0):
        k, l = sketch_sizes(r, out_features, in_features)
        g = _generator(_stable_seed("grad_sketch", int(seed), int(restart_index), name))
        self.omega = torch.randn(in_features, k, generator=g).to(device)
        self.psi = torch.randn(l, out_features, generator=g).to(device)
        self.Y = torch.zeros(out_features, k, device=device)
        self.Z = torch.zeros(l, in_features, device=device)
        self.r, self.limit, self.seen = r, limit, 0

    def observe(self, x: Tensor, out: Tensor) -> None:
        """Called by ReLoRALinear.forward: sketch g^T x once out's gradient g arrives."""
        if not (torch.is_grad_enabled() and out.requires_grad) or (self.limit and self.seen >= self.limit):
            return
        self.seen += 1
        x2 = x.detach().reshape(-1, x.shape[-1])

        def hook(grad: Tensor) -> None:
            xf = x2.to(self.Y.dtype)
            g = grad.detach().reshape(-1, grad.shape[-1]).to(self.Y.dtype)
            self.Y.addmm_(g.t(), xf @ self.omega)      # G Omega = g^T (x Omega)
            self.Z.addmm_((g @ self.psi.t()).t(), xf)  # Psi G = (g Psi^T)^T x

        out.register_hook(hook)

    def flat(self) -> Tensor:
        return torch.cat([self.Y.reshape(-1), self.Z.reshape(-1)])

    def load_flat(self, t: Tensor) -> None:
        self.Y.copy_(t[:self.Y.numel()].view_as(self.Y))
        self.Z.copy_(t[self.Y.numel():].view_as(self.Z))

    def top_right_subspace(self) -> Tensor:
        """A [r, in], fp32 on the CPU: orthonormal rows scaled to A_ROW_NORM spanning the sketched
        gradient's top-r right singular subspace, each row's sign fixed (largest entry positive)
        so that the result does not depend on the solver's sign choice."""
        Y, Z, psi = (t.detach().to("cpu", torch.float64) for t in (self.Y, self.Z, self.psi))
        Q = torch.linalg.qr(Y).Q
        X = torch.linalg.lstsq(psi @ Q, Z).solution  # [k, in]: G ~ Q X
        Vh = torch.linalg.svd(X, full_matrices=False).Vh[:self.r]
        sign = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
        sign[sign == 0] = 1.0
        return (Vh * sign * A_ROW_NORM).float()


def project_b_moments(exp_avg: Tensor, exp_avg_sq: Tensor, A_old: Tensor, A_new: Tensor) -> tuple[Tensor, Tensor]:
    """B's Adam moments carried from the old adapter's A into the new one's.

    B's gradient is s * G A^T. What the old moments know of G is G A_old^T; the least-squares G
    consistent with it is G A_old^T (A_old A_old^T)^-1 A_old, whose gradient under A_new is
    g_old M with M = (A_old A_old^T)^-1 A_old A_new^T [r, r]. So exp_avg (linear in the gradients)
    becomes exp_avg M exactly, and exp_avg_sq (a mean of squares) exp_avg_sq (M*M): exact when the
    r coordinates' gradients are uncorrelated, the same diagonal assumption Adam makes. A_new = A_old
    gives M = I (the moments unchanged); a new subspace orthogonal to the old gives 0 (pruned)."""
    A_old64, A_new64 = A_old.double(), A_new.double()
    M = torch.linalg.lstsq(A_old64 @ A_old64.t(), A_old64 @ A_new64.t()).solution
    return ((exp_avg.double() @ M).to(exp_avg.dtype),
            (exp_avg_sq.double() @ (M * M)).to(exp_avg_sq.dtype))
