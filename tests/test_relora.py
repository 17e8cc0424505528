import math
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from relora_dist.relora.layer import (DEFAULT_TARGETS, ReLoRAConfigError, ReLoRALinear, cumulative_rank,
                                draw_lora_A, effective_rank, flat_slice_delta,
                                freeze_for_full_rank, freeze_for_relora_phase, lora_delta,
                                lora_delta_rows, magnitude_threshold, prune_generator, prune_mask, relora_modules,
                                set_adapters_active, wrap_model)

transformers = pytest.importorskip("transformers")

R, ALPHA = 8, 16.0
N_WRAPPED = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                   max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 16), generator=g)


@pytest.fixture(scope="module")
def ids():
    return batch()


# ----------------------------------------------------------------------------------- wrapping

def test_wrapped_logits_bit_identical(ids):
    model = tiny_llama()
    with torch.no_grad():
        ref = model(ids).logits
    names = wrap_model(model, DEFAULT_TARGETS, R, ALPHA, 0.1, seed=3)
    assert len(names) == N_WRAPPED and names == sorted(names)
    assert set(names) == set(relora_modules(model))
    with torch.no_grad():
        inactive = model(ids).logits
        set_adapters_active(model, True)
        active = model(ids).logits  # B == 0 right after init
    assert torch.equal(ref, inactive)
    assert torch.equal(ref, active)
    m = relora_modules(model)[names[0]]
    assert m.scale == ALPHA / R and m.adapter_active
    assert "r=8" in repr(m) and "adapter_active=True" in repr(m)
    assert not m.lora_A.requires_grad and not m.lora_B.requires_grad
    assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B))
    assert torch.equal(m.lora_A, draw_lora_A(m.lora_A.shape, 3, 0, names[0]))


def test_state_dict_names_and_no_copy():
    model = tiny_llama()
    before = dict(model.state_dict())
    q = model.model.layers[0].self_attn.q_proj
    w_obj = q.weight
    wrap_model(model, None, R, ALPHA, 0.0)
    after = model.state_dict()
    base_keys = [k for k in after if not k.endswith((".lora_A", ".lora_B"))]
    assert base_keys == list(before)
    assert len(after) - len(before) == 2 * N_WRAPPED
    assert "model.layers.0.self_attn.q_proj.weight" in after
    assert "model.layers.0.self_attn.q_proj.lora_A" in after
    new_q = model.model.layers[0].self_attn.q_proj
    assert isinstance(new_q, ReLoRALinear) and new_q.weight is w_obj
    for k in before:
        assert after[k].data_ptr() == before[k].data_ptr()
    assert isinstance(new_q.lora_dropout, nn.Identity)
    assert new_q.lora_A.shape == (R, 64) and new_q.lora_B.shape == (64, R)
    down = model.model.layers[0].mlp.down_proj
    assert down.lora_A.shape == (R, 128) and down.lora_B.shape == (64, R)


def test_bias_linear_and_from_linear():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6, bias=True)
    x = torch.randn(3, 10)
    ref = lin(x)
    m = ReLoRALinear(lin, 2, 4.0, 0.0, name="x")
    assert m.bias is lin.bias and m.weight is lin.weight
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias", "lora_A", "lora_B"]
    m.adapter_active = True
    assert torch.equal(m(x), ref)
    m2 = ReLoRALinear(nn.Linear(10, 6, bias=False), 2, 4.0)
    assert m2.bias is None
    assert [n for n, _ in m2.named_parameters()] == ["weight", "lora_A", "lora_B"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_w,x_grad,shape", [(True, True, (2, 5)), (False, True, (7,)), (True, False, (2, 5))])
def test_adapted_linear_equals_the_autograd_formula_fp64(bias, frozen_w, x_grad, shape):
    """The active adapter's fused forward/backward (relora._AdaptedLinear, fewer operator launches)
    against ``F.linear(x, W, b) + scale * F.linear(F.linear(x, A), B)`` through autograd, in fp64:
    output and every gradient equal to 1e-12 (in fact bit for bit here)."""
    torch.manual_seed(0)
    m = ReLoRALinear(nn.Linear(12, 10, bias=bias), 3, 7.0).double()
    m.adapter_active = True
    with torch.no_grad():
        m.lora_B.normal_()
    m.lora_A.requires_grad_(True)
    m.lora_B.requires_grad_(True)
    m.weight.requires_grad_(not frozen_w)
    x0 = torch.randn(*shape, 12, dtype=torch.float64)
    up = torch.randn(*shape, 10, dtype=torch.float64)

    def run(fn):
        x = x0.clone().requires_grad_(x_grad)
        for p in m.parameters():
            p.grad = None
        y = fn(x)
        (y * up).sum().backward()
        grads = [x.grad] + [p.grad for p in m.parameters()]
        return y.detach(), grads

    F = torch.nn.functional
    y_ref, g_ref = run(lambda x: F.linear(x, m.weight, m.bias) + m.scale * F.linear(F.linear(x, m.lora_A), m.lora_B))
    y, g = run(m)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    assert [t is None for t in g] == [t is None for t in g_ref]
    assert (g[0] is None) != x_grad and (g[1] is None) == frozen_w
    for a, b in zip(g, g_ref):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_first_step_adapter_grads(ids):
    """Reference bug (github.com/Guitaricet/relora/issues/18): A = B = 0 at wrap makes every adapter grad exactly 0."""
    model = tiny_llama()
    wrap_model(model, DEFAULT_TARGETS, R, ALPHA, 0.1)
    set_adapters_active(model, True)
    trainable = freeze_for_relora_phase(model, train_extra=True)
    assert "model.embed_tokens.weight" in trainable and "lm_head.weight" in trainable
    assert not any(n.endswith("q_proj.weight") for n in trainable)
    model.train()
    model(ids, labels=ids).loss.backward()
    mods = relora_modules(model)
    for name, m in mods.items():
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0, name
        # with B == 0, dL/dA = scale * B^T (...) == 0 exactly
        assert m.lora_A.grad is None or torch.count_nonzero(m.lora_A.grad) == 0, name
        assert m.weight.grad is None, name
    assert model.model.embed_tokens.weight.grad is not None
    with torch.no_grad():
        for m in mods.values():
            m.lora_B -= 0.1 * m.lora_B.grad
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    for name, m in mods.items():
        assert m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0, name
        assert m.lora_B.grad.abs().sum() > 0, name


def test_freeze_modes():
    model = tiny_llama()
    names = wrap_model(model, DEFAULT_TARGETS, R, ALPHA, 0.0)
    lora_names = sorted(f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))
    assert sorted(freeze_for_relora_phase(model, train_extra=False)) == lora_names
    full = freeze_for_full_rank(model)
    all_names = [n for n, _ in model.named_parameters()]
    assert full == [n for n in all_names if n not in lora_names]
    for n, p in model.named_parameters():
        assert p.requires_grad == (n not in lora_names)
    with pytest.raises(ReLoRAConfigError, match="wrap_model"):
        freeze_for_relora_phase(tiny_llama(), True)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(r=0), "r=0"),
    (dict(r=-3), "r=-3"),
    (dict(r=2.5), "r=2.5"),
    (dict(alpha=0.0), "alpha=0.0"),
    (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(alpha=float("nan")), "alpha=nan"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(target_patterns=[r"self_attn\.q_proj$", r"mlp\.nonexistent$"]),
     r"pattern 'mlp\\.nonexistent$' matches no nn.Linear module"),
    (dict(target_patterns=["("]), "not a valid regex"),
    (dict(target_patterns=[]), "non-empty list"),
    (dict(r=65), "r=65 exceeds min(in, out) for module 'model.layers.0.mlp.down_proj' "
                 "(weight [64, 128]): use r <= 64"),
])
def test_wrap_errors(kwargs, needle):
    model = tiny_llama()
    args = dict(target_patterns=DEFAULT_TARGETS, r=R, alpha=ALPHA, dropout=0.1)
    args.update(kwargs)
    with pytest.raises(ReLoRAConfigError) as ei:
        wrap_model(model, **args)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg
    assert isinstance(ei.value, ValueError)
    assert not relora_modules(model)  # nothing modified on error


def test_wrap_error_lists_available_names_and_double_wrap():
    model = tiny_llama()
    with pytest.raises(ReLoRAConfigError, match="available Linear names: .*lm_head|available Linear names: .*proj"):
        wrap_model(model, ["attention.query"], R, ALPHA, 0.0)
    wrap_model(model, DEFAULT_TARGETS, R, ALPHA, 0.0)
    with pytest.raises(ReLoRAConfigError, match="already ReLoRA-wrapped"):
        wrap_model(model, DEFAULT_TARGETS, R, ALPHA, 0.0)


def test_wrap_refuses_linear_subclass():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)

    with pytest.raises(ReLoRAConfigError, match="NonDynamicallyQuantizableLinear"):
        wrap_model(M(), [r"out_proj$"], 2, 4.0, 0.0)


# ----------------------------------------------------------------------------------- draws

def test_draw_lora_A_deterministic_and_distinct():
    a = draw_lora_A((16, 256), 42, 0, "model.layers.0.self_attn.q_proj")
    assert a.dtype == torch.float32
    assert torch.equal(a, draw_lora_A((16, 256), 42, 0, "model.layers.0.self_attn.q_proj"))
    for other in (draw_lora_A((16, 256), 42, 1, "model.layers.0.self_attn.q_proj"),
                  draw_lora_A((16, 256), 42, 0, "model.layers.0.self_attn.k_proj"),
                  draw_lora_A((16, 256), 43, 0, "model.layers.0.self_attn.q_proj")):
        assert not torch.equal(a, other)
    bound = 1 / math.sqrt(256)
    assert a.abs().max() <= bound
    assert abs(a.mean()) < 0.05 * bound
    assert a.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)
    # global RNG is not consumed
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    draw_lora_A((4, 4), 0, 0, "m")
    assert torch.equal(torch.rand(1), x)


@pytest.mark.spawn
def test_draw_lora_A_stable_across_processes():
    a = draw_lora_A((3, 5), 7, 2, "layers.1.mlp.up_proj")
    code = ("import torch; from relora_dist.relora.layer import draw_lora_A; "
            "print(repr(draw_lora_A((3, 5), 7, 2, 'layers.1.mlp.up_proj').flatten().tolist()))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert eval(out.stdout.strip()) == a.flatten().tolist()


# ----------------------------------------------------------------------------------- deltas

def test_lora_delta_and_rows():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 23, generator=g)
    B = torch.randn(37, 5, generator=g)
    full = lora_delta(A, B, 0.25)
    assert full.dtype == torch.float32 and full.shape == (37, 23)
    torch.testing.assert_close(full, 0.25 * (B.double() @ A.double()).float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(lora_delta_rows(A, B, 0.25, 10, 20), full[10:20])
    assert lora_delta_rows(A, B, 0.25, 4, 4).shape == (0, 23)
    assert lora_delta(A.bfloat16(), B.bfloat16(), 0.5).dtype == torch.float32
    with pytest.raises(ReLoRAConfigError):
        lora_delta_rows(A, B, 0.25, 5, 38)
    with pytest.raises(ReLoRAConfigError):
        lora_delta(B, A, 1.0)


def test_flat_slice_delta_exact():
    g = torch.Generator().manual_seed(1)
    out_f, in_f, r = 37, 23, 5
    A = torch.randn(r, in_f, generator=g)
    B = torch.randn(out_f, r, generator=g)
    full = lora_delta(A, B, 0.3).reshape(-1)
    n = full.numel()
    rng = random.Random(0)
    cases = [(0, n), (0, 0), (n, n), (5, 5), (0, in_f), (in_f, 2 * in_f), (3, 4), (in_f - 1, in_f + 1),
             (n - 1, n), (7, n - 3)]
    cases += [tuple(sorted((rng.randrange(n + 1), rng.randrange(n + 1)))) for _ in range(300)]
    for s, e in cases:
        got = flat_slice_delta(A, B, 0.3, s, e, in_f)
        assert got.shape == (e - s,) and got.dtype == torch.float32
        assert torch.equal(got, full[s:e]), (s, e)
    # ZeRO-3 style partition: concatenating every rank's slice rebuilds the whole delta
    for world in (1, 2, 3, 8):
        per = math.ceil(n / world)
        parts = [flat_slice_delta(A, B, 0.3, min(k * per, n), min((k + 1) * per, n), in_f) for k in range(world)]
        assert torch.equal(torch.cat(parts), full)
    # accuracy against an fp64 reference product: within fp32 rounding of the exact value
    exact = (0.3 * (B.double() @ A.double())).reshape(-1)
    assert (full.double() - exact).abs().max() <= 2 ** -23 * exact.abs().max()
    with pytest.raises(ReLoRAConfigError):
        flat_slice_delta(A, B, 0.3, 5, n + 1, in_f)
    with pytest.raises(ReLoRAConfigError):
        flat_slice_delta(A, B, 0.3, 6, 5, in_f)
    with pytest.raises(ReLoRAConfigError):
        flat_slice_delta(A, B, 0.3, 0, 5, in_f + 1)


def test_merge_identity(ids):
    model = tiny_llama()
    wrap_model(model, DEFAULT_TARGETS, R, ALPHA, 0.1)
    set_adapters_active(model, True)
    assert all(not m.training for m in relora_modules(model).values())  # eval mode inherited
    mods = relora_modules(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ref = model(ids).logits
        for m in mods.values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
        pre = model(ids).logits
        for name, m in mods.items():
            m.weight += lora_delta(m.lora_A, m.lora_B, m.scale).to(m.weight.dtype)
            m.lora_B.zero_()
            m.lora_A.copy_(draw_lora_A(m.lora_A.shape, 0, 1, m.relora_name))
        post = model(ids).logits
        set_adapters_active(model, False)
        unmerged_base = model(ids).logits
        set_adapters_active(model, True)
    assert not torch.allclose(post, ref, atol=1e-3)  # the adapters did change the function
    assert torch.equal(unmerged_base, post)  # B == 0 again: adapters contribute exactly nothing
    torch.testing.assert_close(post, pre, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- pruning

def test_prune_zero_and_errors():
    t = torch.randn(10, 10)
    assert not prune_mask(t, "zero", 0.5, None).any()
    assert prune_mask(torch.empty(0), "magnitude", 0.5, None).shape == (0,)
    with pytest.raises(ReLoRAConfigError, match="unknown optimizer prune mode 'topk'"):
        prune_mask(t, "topk", 0.5, None)
    for p in (-0.1, 1.1, float("nan")):
        with pytest.raises(ReLoRAConfigError):
            prune_mask(t, "random", p, None)


def test_prune_random_deterministic():
    t = torch.randn(300, 400)
    m1 = prune_mask(t, "random", 0.9, prune_generator(0, 3, "layers.0.q_proj.lora_A", "exp_avg"))
    m2 = prune_mask(t, "random", 0.9, prune_generator(0, 3, "layers.0.q_proj.lora_A", "exp_avg"))
    m3 = prune_mask(t, "random", 0.9, prune_generator(0, 3, "layers.0.q_proj.lora_A", "exp_avg_sq"))
    m4 = prune_mask(t, "random", 0.9, prune_generator(0, 4, "layers.0.q_proj.lora_A", "exp_avg"))
    assert m1.dtype == torch.bool and m1.shape == t.shape
    assert torch.equal(m1, m2) and not torch.equal(m1, m3) and not torch.equal(m1, m4)
    assert 1 - m1.float().mean().item() == pytest.approx(0.9, abs=0.005)
    assert prune_mask(t, "random", 0.0, prune_generator(0, 0, "a", "b")).all()
    assert not prune_mask(t, "random", 1.0, prune_generator(0, 0, "a", "b")).any()


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 0.9, 0.99, 1.0])
def test_prune_magnitude(p):
    t = torch.randn(97, 53, dtype=torch.float64)  # distinct values
    keep = prune_mask(t, "magnitude", p, None)
    n = t.numel()
    assert (~keep).sum().item() == max(1, math.ceil(p * n))
    if keep.any() and (~keep).any():
        assert t.abs()[keep].min() > t.abs()[~keep].max()
    if p in (0.0, 1.0):  # agrees with the quantile definition at the ends
        torch.testing.assert_close(keep, t.abs() > torch.quantile(t.abs().flatten(), p))
    kb = prune_mask(t.bfloat16(), "magnitude", p, None)
    assert kb.shape == t.shape


def test_prune_magnitude_huge_tensor():
    n = 2 ** 24 + 5
    t = torch.randn(n, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        torch.quantile(t.abs(), 0.9)  # why kthvalue is needed
    keep = prune_mask(t, "magnitude", 0.9, None)
    assert keep.shape == (n,)
    n_pruned = n - int(keep.sum())
    assert math.ceil(0.9 * n) <= n_pruned <= math.ceil(0.9 * n) + 100  # + ties in fp32 randn
    thr = torch.kthvalue(t.abs(), math.ceil(0.9 * n)).values
    assert torch.equal(keep, t.abs() > thr)
    # The quantile rule past torch.quantile's limit: numpy's linear quantile (fp64) as reference.
    np = pytest.importorskip("numpy")
    q = magnitude_threshold(t, 0.9, "quantile")
    assert q.item() == pytest.approx(float(np.quantile(t.abs().numpy(), 0.9)), rel=1e-6)
    n_q = n - int((t.abs() > q).sum())  # the reference's rule: keep |t| > threshold
    assert math.floor(0.9 * (n - 1)) + 1 <= n_q <= n_pruned


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_prune_quantile_rule_is_torch_quantile(p):
    """relora.prune_threshold=quantile: the threshold is bitwise torch.quantile(|t|, p) (linear
    interpolation), so the reference's `|t| > threshold` prunes floor(p*(n-1)) + 1 entries, one
    fewer than kthvalue's ceil(p*n) when p*n's fractional part is below p (a 128 x 1024 lora_A at
    p = 0.99: 129761 against 129762, distinct values); ties (a repeated order statistic) included."""
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=g) for n in (1, 2, 97, 1000, 128 * 1024)]
    tensors += [torch.randint(0, 4, (1001,), generator=g).float(), torch.randn(33, 7, generator=g).bfloat16()]
    for t in tensors:
        ref = torch.quantile(t.abs().float().flatten(), p)
        assert torch.equal(magnitude_threshold(t, p, "quantile"), ref), (t.shape, p)
        keep = prune_mask(t, "magnitude", p, None, threshold_rule="quantile")
        assert torch.equal(keep, t.abs().float() > ref)
    t = (torch.randperm(128 * 1024, generator=g) + 1).float() / (128 * 1024)  # distinct, exact in fp32
    n_quantile = int((~prune_mask(t, "magnitude", p, None, threshold_rule="quantile")).sum())
    n_kthvalue = int((~prune_mask(t, "magnitude", p, None)).sum())
    if p < 1:  # at p = 1 both prune everything
        assert n_quantile == math.floor(p * (t.numel() - 1)) + 1
    assert n_kthvalue - n_quantile == {0.0: 0, 0.5: 0, 0.9: 1, 0.99: 1, 1.0: 0}[p]
    with pytest.raises(ReLoRAConfigError, match="unknown magnitude threshold rule 'median'"):
        magnitude_threshold(t, p, "median")


def test_sharded_magnitude_thresholds_follow_the_rule():
    """relora_steps._magnitude_thresholds finds each threshold over the whole tensor, whether one
    rank holds it whole or its fragments are assembled first, by the configured rule (one rank
    here; the fragments of two ranks are summed into the same buffer the same way)."""
    from types import SimpleNamespace

    from relora_dist.backends.optimizer_state import ADAM_KEYS
    from relora_dist.relora.steps import _magnitude_thresholds

    backend = SimpleNamespace(world_size=1, rank=0, shards=SimpleNamespace(
        comm_device=torch.device("cpu"), all_reduce_sum_=lambda t, dst=None: None))
    g = torch.Generator().manual_seed(2)
    full = [torch.randn(n, generator=g) for n in (300, 4096)]
    local = {key: [(0, f * (i + 1)) for f in full] for i, key in enumerate(ADAM_KEYS)}
    for whole in ([True, True], [False, False]):
        for rule in ("kthvalue", "quantile"):
            thr = _magnitude_thresholds(backend, local, [f.numel() for f in full], whole, 0.99, rule)
            for i, key in enumerate(ADAM_KEYS):
                want = [magnitude_threshold(f * (i + 1), 0.99, rule) for f in full]
                assert torch.equal(thr[key], torch.stack(want)), (whole, rule, key)
    assert not torch.equal(thr["exp_avg"], _magnitude_thresholds(backend, local, [300, 4096], whole, 0.99)["exp_avg"])


# ----------------------------------------------------------------------------------- ranks

def test_effective_rank_counts_what_fp64_svdvals_counts():
    """The Gram/eigvalsh count equals the fp64 SVD count on merged-adapter deltas (fp32 sums of
    rank-r products, with fp32 round-off), wide and tall, and on full-rank and graded spectra."""
    g = torch.Generator().manual_seed(3)
    cases = []
    for out_f, in_f, r, terms in ((48, 96, 4, 3), (96, 48, 8, 2), (64, 64, 16, 5)):
        d = sum(torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g) for _ in range(terms))
        cases.append(d.float())
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    cases.append((u * torch.logspace(0, -8, 40, dtype=torch.float64)) @ u.T)  # 1e-4 cut at index 20
    cases.append(torch.randn(30, 50, generator=g))
    for d in cases:
        s = torch.linalg.svdvals(d.double())
        assert effective_rank(d) == int((s > 1e-4 * s.max()).sum()), d.shape


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 7, 20):
        delta = torch.randn(50, k, generator=g) @ torch.randn(k, 40, generator=g)
        assert effective_rank(delta) == min(k, 40)
    assert effective_rank(torch.zeros(8, 9)) == 0
    assert effective_rank(torch.randn(30, 20, generator=g)) == 20
    with pytest.raises(ReLoRAConfigError):
        effective_rank(torch.zeros(3))


def test_cumulative_rank_matches_merged_updates():
    assert cumulative_rank(8, 0, 64, 128) == 8
    assert cumulative_rank(8, 3, 64, 128) == 32
    assert cumulative_rank(8, 10, 64, 128) == 64
    with pytest.raises(ReLoRAConfigError):
        cumulative_rank(8, -1, 64, 128)
    out_f, in_f, r = 48, 40, 4
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(out_f, in_f)
    for restart in range(12):  # restart index = resets done; the live adapter is the last term
        A = draw_lora_A((r, in_f), 0, restart, "m")
        B = torch.randn(out_f, r, generator=g)
        total += lora_delta(A, B, 0.5)
        assert effective_rank(total) == cumulative_rank(r, restart, out_f, in_f)


@pytest.mark.parametrize("block_rows", [16, 256])
def test_flat_slice_bitexact_larger_shapes_and_blocks(monkeypatch, block_rows):
    """A BLAS matmul of a row subset can differ from the full product in the last bit; ours must
    not: every flat slice (random ones, and every rank's part at world 1, 2, 3 with sizes that do
    not divide) is bitwise the same elements of the full delta, with many blocks (16 rows) and
    with the default block, at 1 and 2 threads. The fp64 GEMM's only error is fp64 summation
    before one rounding to fp32: within 1 fp32 ulp of the exact fp64 product."""
    import relora_dist.relora.algebra as ra
    monkeypatch.setattr(ra, "_DELTA_BLOCK_ROWS", block_rows)
    g = torch.Generator().manual_seed(2)
    A = torch.randn(64, 301, generator=g)
    B = torch.randn(257, 64, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        full = lora_delta(A, B, 0.25).reshape(-1)
        torch.set_num_threads(2)
        assert torch.equal(lora_delta(A, B, 0.25).reshape(-1), full)
    finally:
        torch.set_num_threads(threads)
    rng = random.Random(1)
    n = full.numel()
    assert n % 2 and n % 3  # the last rank's slice is short at world 2 and 3
    for _ in range(15):
        s, e = sorted((rng.randrange(n + 1), rng.randrange(n + 1)))
        assert torch.equal(flat_slice_delta(A, B, 0.25, s, e, 301), full[s:e])
    for world in (1, 2, 3):
        per = -(-n // world)
        parts = [flat_slice_delta(A, B, 0.25, min(k * per, n), min((k + 1) * per, n), 301) for k in range(world)]
        assert torch.equal(torch.cat(parts), full), world
    exact = 0.25 * (B.double() @ A.double()).reshape(-1)
    ulp = torch.finfo(torch.float32).eps * exact.abs().float()
    assert torch.all((full.double() - exact).abs() <= ulp.double())


def test_batched_kthvalue_thresholds_equal_per_tensor():
    """The reset's batched threshold (one kthvalue per tensor size; on an accelerator, forced here)
    is each tensor's own, over several batches per size."""
    from relora_dist.relora import steps as relora_steps
    from relora_dist.relora.steps import _held_thresholds

    g = torch.Generator().manual_seed(5)
    frags = [torch.randn(n, generator=g).to(dt) for n, dt in
             ((96, torch.float32), (40, torch.bfloat16), (96, torch.bfloat16), (7, torch.float32), (40, torch.float32))]
    frags[0][:10] = 0.0  # ties
    batch, relora_steps._BATCH_ELEMENTS = relora_steps._BATCH_ELEMENTS, 100
    try:
        for rule in ("kthvalue", "quantile"):
            for ratio in (0.0, 0.5, 0.9, 1.0):
                got = dict(_held_thresholds(frags, ratio, rule, batched=True))
                assert sorted(got) == list(range(len(frags)))
                for j, f in enumerate(frags):
                    assert torch.equal(got[j], magnitude_threshold(f, ratio, rule)), (rule, ratio, j)
    finally:
        relora_steps._BATCH_ELEMENTS = batch
