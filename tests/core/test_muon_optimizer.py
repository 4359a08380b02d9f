"""The Muon optimizer object: torch.optim cross-checks, state_dict, non-finite gradients, RMS report."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

import core_reference as ref
from muon_megatron import GateUp, Muon, NonFiniteGradientError, muon_param_groups
from muon_megatron.core.newton_schulz import MOONLIGHT_SINGULAR_VALUE_BAND

LR, WD = 1e-2, 0.1
INIT_STD = 0.02


class TinyBlock(torch.nn.Module):
    """Embedding, two hidden matrices (one fused gate|up), a norm gain, a bias and a head."""

    def __init__(self, vocab=32, hidden=24, ffn=40):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, 2 * ffn)
        self.fc2 = torch.nn.Linear(ffn, hidden, bias=False)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=INIT_STD)

    def forward(self, tokens):
        x = self.norm(self.embed(tokens))
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.lm_head(self.fc2(torch.nn.functional.silu(gate) * up))


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (4, 9), generator=g) for _ in range(n)]


def make_model(seed=0):
    torch.manual_seed(seed)
    return TinyBlock()


def train(model, opt, data):
    for tokens in data:
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()


# --- torch.optim.Muon ----------------------------------------------------------------------------
# torch.optim.Muon (torch >= 2.9, see torch/optim/_muon.py) with adjust_lr_fn="match_rms_adamw":
#   buf.lerp_(g, 1 - mu); u = g.lerp(buf, mu) (Nesterov); O = NS5_bf16(u / max(||u||, eps));
#   W *= 1 - lr * wd; W -= lr * 0.2 * sqrt(max(A, B)) * O.
# Its EMA buffer is (1 - mu) times our sum-form buffer, so its NS input is (1 - mu) times ours, a
# scalar the Frobenius normalisation removes; eps is clamped instead of added (a relative 1e-7
# difference). Same update, then, for whole 2-D matrices: it knows no splits.

# With torch's NS swapped for a float64 one and ours in float64, only float32 weight rounding and
# the eps placement separate the two.
TORCH_MUON_FLOAT64_NS_REL = 1e-5
# Both in bf16: the inputs differ by the scalar (1 - mu) before rounding and torch fuses b*M + c*M@M
# into one addmm, so bf16 rounding differs; bound as for the bf16 formula tests.
TORCH_MUON_BF16_REL = 0.08


def _torch_ns_float64(grad, ns_coefficients, ns_steps, eps):
    a, b, c = ns_coefficients
    X = grad.double()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


@pytest.mark.parametrize("ns", ["float64", "bfloat16"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_optim_muon_match_rms_adamw(ns, nesterov, monkeypatch):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    if ns == "float64":
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", _torch_ns_float64)
    g = torch.Generator().manual_seed(21)
    shapes = [(48, 48), (96, 32), (32, 96)]
    W0s = [torch.randn(*s, generator=g) * INIT_STD for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in W0s]
    theirs = [torch.nn.Parameter(w.clone()) for w in W0s]
    opt = Muon(ours, lr=LR, weight_decay=WD, nesterov=nesterov, ns_dtype=getattr(torch, ns))
    torch_opt = torch.optim.Muon(theirs, lr=LR, weight_decay=WD, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
    tol = TORCH_MUON_FLOAT64_NS_REL if ns == "float64" else TORCH_MUON_BF16_REL
    for a, b, w0 in zip(ours, theirs, W0s):
        assert ref.rel_err(a.detach() - w0, b.detach() - w0) <= tol


# --- AdamW groups --------------------------------------------------------------------------------


def test_adamw_only_optimizer_equals_torch_adamw_bitwise():
    model, twin = make_model(), make_model()
    opt = Muon([{"params": list(model.parameters()), "use_muon": False}], lr=LR, weight_decay=WD)
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    data = batches(5)
    train(model, opt, data)
    train(twin, torch_opt, data)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_adamw_group_beside_muon_groups_equals_torch_adamw_bitwise():
    """In a mixed optimizer the AdamW parameters follow torch.optim.AdamW exactly, given the same
    gradients (the Muon side is replayed on the twin by a second, Muon-only optimizer)."""
    model, twin = make_model(), make_model()
    groups = muon_param_groups(model)
    opt = Muon(groups, lr=LR, weight_decay=WD)
    names = dict(model.named_parameters())
    adamw_names = [n for gr in groups if not gr["use_muon"] for n in gr["names"]]
    assert set(adamw_names) == {"embed.weight", "norm.weight", "norm.bias", "fc1.bias", "lm_head.weight"}
    twin_params = dict(twin.named_parameters())
    torch_opt = torch.optim.AdamW([twin_params[n] for n in adamw_names], lr=LR, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=WD)
    twin_muon = Muon([{"params": [twin_params[n] for n in gr["names"]], "split": gr.get("split")}
                      for gr in groups if gr["use_muon"]], lr=LR, weight_decay=WD)
    for tokens in batches(4):
        for m, o in ((model, opt), (twin, None)):
            m.zero_grad()
            loss_of(m, tokens).backward()
        opt.step()
        torch_opt.step()
        twin_muon.step()
    for n in adamw_names:
        assert torch.equal(names[n], twin_params[n]), n
    for n in set(names) - set(adamw_names):
        assert torch.equal(names[n], twin_params[n]), n


# --- state_dict ----------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    k, more = 3, 3
    data = batches(k + more, seed=1)
    splits = {"fc1.weight": GateUp()}

    model = make_model()
    opt = Muon(muon_param_groups(model, splits=splits), lr=LR, weight_decay=WD)
    train(model, opt, data[:k])
    saved_model = copy.deepcopy(model.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    train(model, opt, data[k:])  # uninterrupted

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_opt = Muon(muon_param_groups(resumed, splits=splits), lr=0.5, weight_decay=0.0)
    buffer.seek(0)
    resumed_opt.load_state_dict(torch.load(buffer))  # weights_only=True, torch's default
    assert resumed_opt.param_groups[0]["lr"] == LR
    assert any(gr.get("split") == GateUp() for gr in resumed_opt.param_groups)
    train(resumed, resumed_opt, data[k:])

    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_state_dict_holds_momentum_and_adamw_moments():
    model = make_model()
    opt = Muon(muon_param_groups(model), lr=LR)
    train(model, opt, batches(1))
    state = opt.state_dict()["state"]
    kinds = sorted({tuple(sorted(s)) for s in state.values()})
    assert kinds == [("exp_avg", "exp_avg_sq", "step"), ("momentum_buffer",)]
    assert len(state) == len(list(model.parameters()))


# --- non-finite gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_step_and_names_parameter(bad_value):
    model = make_model()
    opt = Muon(muon_param_groups(model), lr=LR)
    train(model, opt, batches(2))
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())

    opt.zero_grad()
    loss_of(model, batches(1, seed=9)[0]).backward()
    model.fc2.weight.grad[1, 2] = bad_value
    with pytest.warns(RuntimeWarning, match=r"'fc2\.weight'") as record:
        opt.step()
    assert "fc1.weight" not in str(record[0].message)
    assert opt.skipped_steps == 1

    for name, value in model.state_dict().items():
        assert torch.equal(value, params_before[name]), name
    after = opt.state_dict()
    for index, s in state_before["state"].items():
        for key, value in s.items():
            assert torch.equal(after["state"][index][key], value), (index, key)


def test_nonfinite_gradient_in_adamw_parameter_is_named_too():
    model = make_model()
    opt = Muon(muon_param_groups(model), lr=LR)
    loss_of(model, batches(1)[0]).backward()
    model.norm.weight.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"'norm\.weight'"):
        opt.step()
    assert not opt.state  # not even the first step's state was created


def test_nonfinite_gradient_raises_when_asked():
    model = make_model()
    opt = Muon(muon_param_groups(model), lr=LR, nonfinite="raise")
    before = copy.deepcopy(model.state_dict())
    loss_of(model, batches(1)[0]).backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"'fc1\.weight'"):
        opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --- update RMS report ---------------------------------------------------------------------------


def test_update_rms_is_about_0_2_lr_for_full_rank_square_matrices(caplog):
    """Default scale 0.2 sqrt(n) on an n x n O with singular values in the NS band gives
    RMS = 0.2 * lr * sqrt(mean sigma_i^2): inside 0.2 lr times the band (MOONLIGHT_SINGULAR_VALUE_BAND),
    plus bf16's margin."""
    g = torch.Generator().manual_seed(31)
    Ws = [torch.nn.Parameter(torch.randn(64, 64, generator=g) * INIT_STD) for _ in range(3)]
    opt = Muon([{"params": Ws, "names": ["a", "b", "c"]}], lr=LR, report_update_rms=True)
    lo, hi = MOONLIGHT_SINGULAR_VALUE_BAND
    with caplog.at_level(logging.INFO, logger="muon_megatron.core.base"):
        for _ in range(3):
            for W in Ws:
                W.grad = torch.randn(64, 64, generator=g)  # Gaussian: full rank, well conditioned
            opt.step()
            rms = opt.last_update_rms[0]
            assert 0.2 * LR * (lo - 0.05) <= rms <= 0.2 * LR * (hi + 0.05)
            assert rms == pytest.approx(0.2 * LR, rel=0.25)
    assert "update RMS" in caplog.text


def test_update_rms_reports_applied_update_of_each_group_weight_decay_excluded():
    """With weight decay on, the reported RMS is that of what was applied beyond the decay,
    W_1 - W_0 (1 - lr wd), per group index. The decay is made large (W shrinks by 20 %) so that
    counting it in would change the RMS well beyond the tolerance."""
    wd = 20.0
    model = make_model()
    opt = Muon(muon_param_groups(model), lr=LR, weight_decay=wd, report_update_rms=True)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(1))
    index = {id(p): i for i, p in enumerate(model.parameters())}
    assert set(opt.last_update_rms) == set(range(len(opt.param_groups)))
    for gi, group in enumerate(opt.param_groups):
        deltas = torch.cat([(p.detach().double() - before[index[id(p)]].double() * (1 - LR * wd)).flatten()
                            for p in group["params"]])
        assert opt.last_update_rms[gi] == pytest.approx(float(deltas.square().mean().sqrt()), rel=1e-4)
        with_decay = torch.cat([(p.detach() - before[index[id(p)]]).double().flatten() for p in group["params"]])
        assert abs(float(with_decay.square().mean().sqrt()) - opt.last_update_rms[gi]) > 0.1 * opt.last_update_rms[gi]


def test_update_rms_report_off_by_default():
    model = make_model()
    opt = Muon(muon_param_groups(model), lr=LR)
    train(model, opt, batches(1))
    assert opt.last_update_rms == {}


def test_rms_of_moonlight_scaled_update_is_shape_independent():
    """The point of 0.2 sqrt(max(A, B)): tall, wide and square matrices all step by ~0.2 lr RMS."""
    g = torch.Generator().manual_seed(41)
    for shape in [(32, 128), (128, 32), (80, 80)]:
        W = torch.nn.Parameter(torch.zeros(*shape))
        W.grad = torch.randn(*shape, generator=g)
        opt = Muon([W], lr=LR, weight_decay=0.0, ns_dtype=torch.float32, report_update_rms=True)
        opt.step()
        assert opt.last_update_rms[0] == pytest.approx(0.2 * LR, rel=0.25)
