"""relora.reinit: the gradient sketch and the moment projection (relora_dist/relora/reinit.py) against exact
references, and the three variants in real trainings: world 1, and 2 ranks against 1 process."""

import pytest
import torch
from torch import nn

from relora_dist.relora.reinit import A_ROW_NORM, GradSketch, project_b_moments
from relora_dist.relora.layer import ReLoRALinear, draw_lora_A
from tests.dist_utils import engine, run_world, tiny_overrides


def _projector(A: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto A's row space (fp64)."""
    Q = torch.linalg.qr(A.double().t()).Q
    return Q @ Q.t()


def _sketched_layer(n_tokens: int, r: int, decay: bool, micro: int = 1, seed: int = 0):
    """A wrapped 48 -> 40 linear, its exact weight gradient over `micro` micro-batches and the
    sketch of the same backward passes."""
    torch.manual_seed(seed)
    lin = nn.Linear(48, 40, bias=False)
    m = ReLoRALinear(lin, r=r, alpha=r, name="layer")
    m.adapter_active = True
    m.weight.requires_grad_(True)
    m.lora_A.requires_grad_(True)
    m.lora_B.requires_grad_(True)
    m.grad_sketch = GradSketch(r, 40, 48, seed=0, restart_index=1, name="layer", device=torch.device("cpu"))
    scale = torch.logspace(0, -3, 48) if decay else torch.ones(48)
    for _ in range(micro):
        x = torch.randn(n_tokens, 48) * scale
        (m(x) ** 2).sum().backward()
    return m.weight.grad.double(), m.grad_sketch


def test_sketch_of_a_low_rank_gradient_gives_its_top_subspace_exactly():
    """6 tokens: rank(G) <= 6 <= k = 2r = 8, so the sketch holds G exactly and A spans the top-r right
    singular vectors of the exact weight gradient (autograd on W)."""
    G, sketch = _sketched_layer(n_tokens=6, r=4, decay=False)
    A = sketch.top_right_subspace()
    Vr = torch.linalg.svd(G).Vh[:4]
    assert (_projector(A) - _projector(Vr)).abs().max() < 1e-6
    # rows orthonormal, scaled to the norm of a Kaiming-uniform row
    torch.testing.assert_close(A.double() @ A.double().t(), torch.eye(4, dtype=torch.float64) * A_ROW_NORM ** 2,
                               rtol=0, atol=1e-6)


def test_sketch_of_a_full_rank_gradient_captures_its_top_subspace():
    """256 tokens with a decaying input spectrum (full-rank G): A captures >= 95% of the energy the
    exact top-r subspace captures (a random A: ~r/in = 8%)."""
    G, sketch = _sketched_layer(n_tokens=256, r=4, decay=True)
    A = sketch.top_right_subspace().double()
    best = (torch.linalg.svdvals(G)[:4] ** 2).sum()
    assert (G @ _projector(A)).norm() ** 2 / best > 0.95
    rand = draw_lora_A((4, 48), 0, 1, "layer").double()
    assert (G @ _projector(rand)).norm() ** 2 / best < 0.5


def test_sketches_add_over_micro_batches():
    """The sketch is linear in G: two micro-batches give the sketch of the summed gradient, which is
    what makes one SUM all-reduce over ranks the sketch of the global batch."""
    G, sketch = _sketched_layer(n_tokens=5, r=4, decay=False, micro=2)
    torch.testing.assert_close(sketch.Y.double(), G @ sketch.omega.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sketch.Z.double(), sketch.psi.double() @ G, rtol=1e-4, atol=1e-4)


def test_no_sketch_outside_training():
    _, sketch = _sketched_layer(n_tokens=4, r=4, decay=False)
    lin = ReLoRALinear(nn.Linear(48, 40), r=4, alpha=4)
    lin.grad_sketch = sketch
    with torch.no_grad():
        lin(torch.randn(3, 48))
    assert sketch.seen == 1  # the evaluation forward was not counted


def test_project_b_moments():
    torch.manual_seed(0)
    A_old, G = torch.randn(4, 48), torch.randn(40, 48)
    m, v = G @ A_old.t(), (G @ A_old.t()) ** 2
    # the same subspace: unchanged
    m2, v2 = project_b_moments(m, v, A_old, A_old)
    torch.testing.assert_close(m2, m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, v, rtol=1e-5, atol=1e-5)
    # an orthogonal subspace: nothing is known there
    basis = torch.linalg.qr(torch.randn(48, 48)).Q
    A_a, A_b = basis[:, :4].t().contiguous(), basis[:, 4:8].t().contiguous()
    m3, v3 = project_b_moments(G @ A_a.t(), (G @ A_a.t()) ** 2, A_a, A_b)
    assert m3.abs().max() < 1e-5 and v3.abs().max() < 1e-5
    # exact for the part of G in A_old's row space: m = G P_old A_new^T
    A_new = torch.randn(4, 48)
    m4, _ = project_b_moments(m, v, A_old, A_new)
    torch.testing.assert_close(m4.double(), G.double() @ _projector(A_old) @ A_new.double().t(), rtol=1e-4, atol=1e-4)


RUN = {"relora.enabled": True, "relora.warm_start_steps": 3, "relora.cycle_length": 3, "relora.first_warmup": 0,
       "relora.restart_warmup": 1, "relora.r": 8, "relora.alpha": 16, "train.max_steps": 9,
       "relora.optimizer_reset": "magnitude", "relora.prune_ratio": 0.9}
FIRST_RESET = 6  # the reset follows step 6 (3 warm-start steps + one 3-step cycle)


@pytest.mark.spawn
def test_each_variant_at_world_1(tiny_data, tmp_path):
    runs = [tiny_overrides(tiny_data, tmp_path / v, **RUN, **{"relora.reinit": v}) for v in ("random", "gradient", "project")]
    results = run_world(1, "reinit_runs", [], tmp_path / "w1", runs=runs)[0]
    rnd, grad, proj = results[0], results[1], results[2]
    # random is today's re-init: A drawn from (seed, restart index 1, module name); no sketch kept
    for n, A in rnd["A"].items():
        assert torch.equal(A, draw_lora_A(A.shape, 0, 1, rnd["names"][n]))
    # the sketch does not touch training: identical up to and including the first step after the
    # reset (B = 0: the function is the same whatever A is)
    for other in (grad, proj):
        torch.testing.assert_close(other["losses"][:FIRST_RESET + 1], rnd["losses"][:FIRST_RESET + 1], rtol=0, atol=0)
        assert other["sketches_left"] == 0 and torch.isfinite(other["losses"]).all()
    for n, A in grad["A"].items():
        A64 = A.double()
        torch.testing.assert_close(A64 @ A64.t(), torch.eye(A.shape[0], dtype=torch.float64) * A_ROW_NORM ** 2,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(proj["A"][n], A, rtol=0, atol=0)  # project draws the same A
    assert not torch.equal(grad["losses"], rnd["losses"])
    for n, moments in proj["moments"].items():
        if n.endswith(".A"):  # A's moments zeroed, B's carried (not pruned to 10%)
            assert all(t.abs().max() == 0 for t in moments.values())
        else:
            assert (moments["exp_avg_sq"] > 0).float().mean() > 0.5
            assert (grad["moments"][n]["exp_avg_sq"] > 0).float().mean() < 0.2


# 2 ranks against 1 process, the same global batch: sketches summed over ranks vs over micro-batches.
@pytest.mark.spawn
@pytest.mark.parametrize("backend,variant", [("zero2", "gradient"), ("fsdp2", "project"), ("zero3", "gradient")])
def test_two_ranks_match_one_process(tiny_data, tmp_path, backend, variant):
    ds_config, selects = engine(backend)
    runs = lambda d: [tiny_overrides(tiny_data, d, **RUN, **selects, **{"relora.reinit": variant})]  # noqa: E731
    one = run_world(1, "reinit_runs", [], tmp_path / "w1", ds_config=ds_config, runs=runs(tmp_path / "a"))[0][0]
    two = run_world(2, "reinit_runs", [], tmp_path / "w2", ds_config=ds_config, runs=runs(tmp_path / "b"))[0][0]
    # A's subspace: the sketches differ only in summation order (fp32, ~1e-7 relative)
    for n, A in one["A"].items():
        assert (_projector(two["A"][n]) - _projector(A)).abs().max() < 1e-3, n
    # the loss after the reset, over the rest of the run: as the engines' own 2-rank tests allow
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-4, atol=1e-4)
