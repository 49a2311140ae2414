"""Bare parameters (privacy/bare.py), the graph checks (privacy/graph.py) and
privacy.convert: exact where the engine accepts a model, a refusal naming the
parameter (or layer) and the fix where it cannot be exact."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privacy import PrivacyEngine
from privacy.convert import replace_batchnorm
from tests.helpers.privacy import clipped_mean, flat_norms, per_example_grads, relative_error, step_in_micro_batches

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


class BareOps(nn.Module):
    """Bare parameters in every accepted use: expand and cat (a token), add (a
    position embedding), div by a function of one, an attention mask gathered
    from a table by a buffer, where, repeat as an expand, sub in place on the data."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(4, 4)
        self.token = nn.Parameter(torch.randn(1, 1, 4, generator=g))
        self.pos = nn.Parameter(torch.randn(1, 4, 4, generator=g))
        self.scale = nn.Parameter(torch.randn(4, generator=g))
        self.table = nn.Parameter(torch.randn(5, 2, generator=g))
        self.slope = nn.Parameter(torch.randn(1, 1, 1, 2, generator=g))
        self.shift = nn.Parameter(torch.randn(2, generator=g))
        self.register_buffer("index", torch.randint(0, 5, (4, 4), generator=g))

    def forward(self, x):  # x: [b, 3, 4]
        b = x.shape[0]
        x = torch.cat([self.token.expand(b, -1, -1), x], 1)  # [b, 4, 4]
        x = self.linear(x + self.pos) / (1 + self.scale.square())
        q = x.view(b, 4, 2, 2).transpose(1, 2)  # [b, heads 2, 4, 2]
        bias = self.table[self.index.view(-1)].view(4, 4, 2).permute(2, 0, 1)  # [2, 4, 4]
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=bias)
        out = torch.where(out > 0, out, out * self.slope.repeat(b, 1, 1, 1))
        out -= self.shift
        return out.square().sum((1, 2, 3))


def run(model, inputs, splits, max_norm, expected_batch):
    engine = PrivacyEngine(model, max_grad_norm=max_norm, noise_multiplier=0.0, expected_batch_size=expected_batch)
    return step_in_micro_batches(engine, model, inputs, splits)


def test_bare_parameters_in_every_accepted_use_match_reference():
    torch.manual_seed(0)
    model = BareOps()
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    reference = per_example_grads(model, x)
    norms = flat_norms(reference)
    max_norm = norms.median().item()
    expected = clipped_mean(reference, max_norm, 5.0)
    engine_norms = run(model, (x,), (1, 4), max_norm, 5.0)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        assert relative_error(p.grad, expected[name]) <= 1e-5, name


def test_a_bare_parameter_is_the_parameter_again_after_detach():
    model = BareOps()
    engine = PrivacyEngine(model, 1.0, 0.0, 1.0)
    engine.detach()
    assert "token" not in model.__dict__ and isinstance(model.token, nn.Parameter)
    model(torch.randn(2, 3, 4)).sum().backward()
    assert model.token.grad is not None


# ----------------------------------------------------------------------------- refusals

class UsedOutsideItsLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.layer.weight, self.layer.bias).sum((1, 2))


class Escapes(nn.Module):
    """``offset * 2`` is computed from the parameter alone and used after the
    module's forward has returned (as HF Swin's relative position bias is): it
    meets the batch in the parent, exactly. ``offset`` itself escaping is the
    parameter again there: refused."""

    def __init__(self, derived: bool):
        super().__init__()
        self.derived = derived
        self.linear = nn.Linear(4, 4)
        self.offset = nn.Parameter(torch.linspace(0.5, 2.0, 4))

    def forward(self, x):
        return self.linear(x), self.offset * 2 if self.derived else self.offset


class EscapesParent(nn.Module):
    def __init__(self, derived: bool = False):
        super().__init__()
        self.inner = Escapes(derived)

    def forward(self, x):
        y, extra = self.inner(x)
        return (y + extra).sum((1, 2))


class MatmulBare(nn.Module):
    """A hand-written linear layer: a bare parameter contracted with the batch."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return (x @ self.weight).sum((1, 2))


class TiedBare(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = self.linear.weight  # the same tensor, registered on the root too

    def forward(self, x):
        return (self.linear(x) * self.scale[0]).sum((1, 2))


class RowsByPosition(nn.Module):
    """[b, T, D] -> [T x b, D] rows ordered by position, then by example: a
    layer on them has T x b rows that are NOT T consecutive rows per example."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        b, t, d = x.shape
        rows = self.linear(x.transpose(0, 1).reshape(t * b, d))
        return rows.reshape(t, b, d).square().sum((0, 2))


class RowsThroughFlip(nn.Module):
    """Rows grouped per example (``flip=False``: proved, as Swin's windows are),
    or made by an operator the proof does not know (``flip=True``)."""

    def __init__(self, flip: bool = True):
        super().__init__()
        self.flip = flip
        self.first = nn.Linear(4, 4)
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        b, t, d = x.shape
        h = self.first(x)
        h = torch.flip(h, dims=(2,)) if self.flip else h.permute(0, 2, 1).roll(1, dims=2).transpose(1, 2)
        rows = self.linear(h.reshape(b * t, d))
        return rows.reshape(b, t, d).square().sum((1, 2))


@pytest.mark.parametrize("model, match", [
    (UsedOutsideItsLayer(), r"layer\.weight is used outside its layer's forward .*F\.linear"),
    (EscapesParent(), r"inner\.offset is used outside its layer's forward .*or outside its module's call"),
    (MatmulBare(), r"weight \(a bare parameter.* meets the batch in matmul .*nn\.Linear.*or freeze it"),
    (RowsByPosition(), r"linear: its output has 12 rows in dim 0 but the loss has 4 examples"),
    (RowsThroughFlip(), r"linear: .* FlipBackward0 \(the proof does not know this operator\)"),
])
def test_what_cannot_be_exact_is_refused_by_name(model, match):
    engine = PrivacyEngine(model, 1.0, 0.0, 4.0)
    with pytest.raises(ValueError, match=match):
        engine.backward(model(torch.randn(4, 3, 4)))


def _assert_exact_at_the_median_norm(model, x):
    """Micro-batches 2 + 3 of ``x``, clipped at the median per-example norm, against torch.func."""
    reference = per_example_grads(model, x)
    norms = flat_norms(reference)
    expected = clipped_mean(reference, norms.median().item(), 5.0)
    torch.testing.assert_close(run(model, (x,), (2, 3), norms.median().item(), 5.0), norms, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        assert relative_error(p.grad, expected[name]) <= 1e-5, name


def test_a_value_derived_from_bare_parameters_meets_the_batch_after_its_module_returned():
    model = EscapesParent(derived=True)
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    _assert_exact_at_the_median_norm(model, x)


class InputShift(nn.Module):
    """A bare parameter added to the model's input, which needs no gradient: the
    copy is deferred, and made when the sum enters the next layer."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.linspace(-1.0, 1.0, 4))
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x + self.shift).square().sum((1, 2))


def test_a_deferred_bare_value_entering_a_layer_is_exact():
    model = InputShift()
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    _assert_exact_at_the_median_norm(model, x)


def test_rows_grouped_per_example_are_proved_and_exact():
    torch.manual_seed(0)
    model = RowsThroughFlip(flip=False)
    x = torch.randn(5, 3, 4)
    _assert_exact_at_the_median_norm(model, x)


class WindowsOfTheInput(nn.Module):
    """A layer on rows made from the model's input alone: no graph to prove them by."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        b, t, d = x.shape
        return self.linear(x.reshape(b * t, d)).reshape(b, t, d).square().sum((1, 2))


def test_rows_made_from_the_input_alone_are_refused_until_it_requires_grad():
    torch.manual_seed(0)
    model = WindowsOfTheInput()
    x = torch.randn(4, 3, 4)
    engine = PrivacyEngine(model, 1.0, 0.0, 4.0)
    with pytest.raises(ValueError, match=r"linear's input has no autograd history .*requires_grad_\(\)"):
        engine.backward(model(x))
    engine.detach()
    reference = per_example_grads(model, x)
    max_norm = flat_norms(reference).median().item()
    expected = clipped_mean(reference, max_norm, 4.0)
    engine = PrivacyEngine(model, max_norm, 0.0, 4.0)
    for part in x.split(2):  # each micro-batch's images a leaf of its own, as a loader's are
        engine.backward(model(part.clone().requires_grad_()))
    engine.finish_step()
    engine.detach()
    for name, p in model.named_parameters():
        assert relative_error(p.grad, expected[name]) <= 1e-5, name


def test_tied_bare_parameter_is_refused():
    with pytest.raises(ValueError, match=r"parameter linear\.weight is shared with \.scale"):
        PrivacyEngine(TiedBare(), 1.0, 0.0, 4.0)


def test_batchnorm_is_refused_with_its_cure():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d\) normalises over the examples of a batch.*"
                                         r"use GroupNorm.*privacy\.convert\.replace_batchnorm\(model\)") as refused:
        PrivacyEngine(model, 1.0, 0.0, 4.0)
    assert "GroupNorm-free" not in str(refused.value)


# ----------------------------------------------------------------------------- privacy.convert

def test_replace_batchnorm_says_what_it_changed(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48),
                          nn.Sequential(nn.Conv1d(48, 6, 1), nn.BatchNorm1d(6, affine=False)))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.normal_()
    weight, bias = model[1].weight.clone(), model[1].bias.clone()
    with caplog.at_level(logging.INFO, logger="privacy.convert"):
        changes = replace_batchnorm(model)
    assert changes == ["1: BatchNorm2d(48) -> GroupNorm(24, 48)", "2.1: BatchNorm1d(6) -> GroupNorm(6, 6)"]
    assert all(change in caplog.text for change in changes)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 24  # the most groups <= 32 dividing 48
    torch.testing.assert_close(model[1].weight, weight)
    torch.testing.assert_close(model[1].bias, bias)
    assert not model[2][1].affine
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    PrivacyEngine(model, 1.0, 0.0, 4.0)  # accepted now
    assert replace_batchnorm(model) == []
    with pytest.raises(ValueError, match="max_groups must be >= 1"):
        replace_batchnorm(model, max_groups=0)


class NormTimesTwo(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_replace_batchnorm_keeps_timm_norm_act_and_refuses_unknown_subclasses():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    model = nn.Sequential(nn.Conv2d(3, 8, 1), norm_act.BatchNormAct2d(8, act_layer=nn.SiLU))
    (change,) = replace_batchnorm(model)
    assert change == "1: BatchNormAct2d(8) -> GroupNorm(8, 8) + its drop (Identity), act (SiLU)"
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        expected = F.silu(F.group_norm(model[0](x), 8, model[1].norm.weight, model[1].norm.bias, model[1].norm.eps))
        torch.testing.assert_close(model(x), expected)
    unknown = nn.Sequential(nn.BatchNorm2d(4), NormTimesTwo(4))
    with pytest.raises(ValueError, match=r"1 \(.*NormTimesTwo\) subclasses BatchNorm but overrides forward"):
        replace_batchnorm(unknown)
    assert isinstance(unknown[0], nn.BatchNorm2d)  # a refusal changes nothing
