"""Augmentation multiplicity: ``engine.backward(per_view_loss, views=K)``.

Each example is K consecutive rows of the loss (its augmented views); its
gradient is the mean of its views' gradients, clipped as one (De et al. 2022).
The reference is torch.func: vmap over examples of the gradient of the mean of
one example's K view losses, in float64, then clipped. The grouping of views is
the engine's alone here: a mutant that clips each view as its own example, or
groups rows other than consecutively, moves the clipped sum by far more than
the tolerance, since the clip binds for some examples.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from privacy import PrivacyEngine
from tests.privacy_helpers import OddLayers, TinyViT, clipped_mean, flat_norms, relative_error

VIEWS = 3


class BareMLP(nn.Module):
    """Two Linear layers, with a bare parameter (a gain used in the module's own
    forward) between them: a rule's rows and a bare copy's rows per view."""

    def __init__(self, d=6, hidden=8):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, hidden))
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x, y):
        h = F.gelu(self.fc1(x)) * self.gain
        return (self.fc2(h).squeeze(1) - y) ** 2


class Windows(nn.Module):
    """A layer on rows grouped several per view (as Swin's windows): the engine
    proves that grouping relative to the loss's rows, then multiplies by K."""

    def __init__(self, d=4):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.linear = nn.Linear(d, d)

    def forward(self, x, y):
        b, t, d = x.shape
        h = self.first(x).permute(0, 2, 1).roll(1, dims=2).transpose(1, 2)
        rows = self.linear(h.reshape(b * t, d)).reshape(b, t, d)
        return (rows.sum((1, 2)) - y) ** 2


def mlp_views(b, g):
    return torch.randn(b, VIEWS, 6, generator=g), torch.randn(b, VIEWS, generator=g)


def vit_views(b, g):
    return torch.randn(b, VIEWS, 3, 16, 16, generator=g), torch.randint(0, 10, (b, VIEWS), generator=g)


def odd_views(b, g):
    return torch.randn(b, VIEWS, 2, 8, 8, generator=g), torch.randn(b, VIEWS, generator=g)


def window_views(b, g):
    return torch.randn(b, VIEWS, 3, 4, generator=g), torch.randn(b, VIEWS, generator=g)


CASES = {"mlp": (BareMLP, mlp_views), "vit": (TinyViT, vit_views), "conv": (OddLayers, odd_views),
         "windows": (Windows, window_views)}


def build(kind: str, b: int = 5):
    torch.manual_seed(0)
    make, batch = CASES[kind]
    return make(), batch(b, torch.Generator().manual_seed(1))


def view_rows(t: torch.Tensor) -> torch.Tensor:
    """[b, K, ...] -> [b K, ...]: example i's views are rows i K .. i K + K - 1."""
    return t.flatten(0, 1)


def mean_of_views_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> [b, *shape] float64: each example's gradient of the mean of its views' losses."""
    model = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y

    def loss_of_one(params, xs, ys):  # xs, ys: one example's K views, as a batch of K
        return functional_call(model, (params, frozen), (xs, ys)).mean()

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def engine_step(model, inputs, splits, max_norm, expected, views=VIEWS, **engine_args):
    """One step over micro-batches of ``splits`` examples; (norms, stats), p.grad set."""
    engine = PrivacyEngine(model, max_grad_norm=max_norm, noise_multiplier=0.0, expected_batch_size=expected,
                           **engine_args)
    norms, start = [], 0
    for size in splits:
        part = [view_rows(t[start:start + size]) for t in inputs]
        engine.backward(model(*part), views=views)
        norms.append(engine.per_example_norms)
        start += size
    stats = engine.finish_step()
    engine.detach()
    return torch.cat(norms), stats


@pytest.mark.parametrize("kind", list(CASES))
def test_clipped_mean_of_views_matches_torch_func(kind):
    model, inputs = build(kind)
    reference = mean_of_views_grads(model, *inputs)
    norms = flat_norms(reference)
    max_norm = norms.median().item()
    assert (norms > max_norm * 1.01).any() and (norms < max_norm * 0.99).any()
    expected = clipped_mean(reference, max_norm, 4.0)
    engine_norms, stats = engine_step(model, inputs, (2, 3), max_norm, 4.0)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-5, atol=0)
    assert stats["examples"] == 5 and stats["clip_fraction"] in (0.4, 0.6)  # the median example: either
    whole = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, param in trainable(model):
        error = (param.grad - expected[name]).norm()
        assert error <= 1e-5 * expected[name].norm() + 1e-7 * whole, (name, error.item())


@pytest.mark.parametrize("kind", list(CASES))
def test_two_pass_mode_with_views_equals_the_one_pass_engine(kind):
    """Its second backward is of sum_i c_i (mean of example i's view losses); that
    backward rounds as it goes (the mode's documented limit), hence 2e-5."""
    model, inputs = build(kind)
    max_norm = flat_norms(mean_of_views_grads(model, *inputs)).median().item()
    one_norms, one_stats = engine_step(model, inputs, (2, 3), max_norm, 4.0)
    one = {n: p.grad.clone() for n, p in trainable(model)}
    model.zero_grad()
    two_norms, two_stats = engine_step(model, inputs, (2, 3), max_norm, 4.0, two_pass=True)
    torch.testing.assert_close(two_norms, one_norms, rtol=1e-6, atol=0)
    assert two_stats == pytest.approx(one_stats, rel=1e-6)
    for name, param in trainable(model):
        assert relative_error(param.grad, one[name]) < 2e-5, name


@pytest.mark.parametrize("kind", ["mlp", "vit", "conv"])
def test_each_example_adds_at_most_c_over_all_its_views(kind):
    model, inputs = build(kind, b=3)
    max_norm = 0.5 * flat_norms(mean_of_views_grads(model, *inputs)).min().item()  # binds for every example
    for i in range(3):
        engine_step(model, [t[i:i + 1] for t in inputs], (1,), max_norm, 1.0)
        contribution = torch.cat([p.grad.double().flatten() for _, p in trainable(model)]).norm().item()
        assert max_norm * (1 - 1e-4) <= contribution <= max_norm * (1 + 1e-6)
        model.zero_grad()


@pytest.mark.parametrize("kind", ["mlp", "vit", "conv"])
def test_identical_views_equal_one_view(kind):
    model, (x, y) = build(kind)
    one = [x[:, :1], y[:, :1]]
    repeated = [t.expand(-1, VIEWS, *t.shape[2:]) for t in one]
    max_norm = flat_norms(mean_of_views_grads(model, *one)).median().item()
    norms_one, _ = engine_step(model, one, (2, 3), max_norm, 4.0, views=1)
    grads_one = {n: p.grad.clone() for n, p in trainable(model)}
    model.zero_grad()
    norms_k, _ = engine_step(model, repeated, (2, 3), max_norm, 4.0)
    torch.testing.assert_close(norms_k, norms_one, rtol=1e-5, atol=0)
    for name, param in trainable(model):
        torch.testing.assert_close(param.grad, grads_one[name], rtol=1e-5, atol=1e-7 * max_norm)


def test_views_are_refused_unless_they_divide_the_rows():
    model, (x, y) = build("mlp")
    engine = PrivacyEngine(model, 1.0, 0.0, 4.0)
    for views in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="views must be an int >= 1"):
            engine.backward(model(view_rows(x), view_rows(y)), views=views)
    with pytest.raises(ValueError, match=r"has 14 rows, not a multiple of views=3"):
        engine.backward(model(view_rows(x)[:14], view_rows(y)[:14]), views=VIEWS)


class ViewsMixed(nn.Module):
    """A layer whose rows are the loss's rows reversed: the views of one example
    are no longer consecutive there, which the grouping proof cannot show."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, y):
        h = x.requires_grad_() * 1.0
        return self.linear(torch.cat([h, h], 0)).sum(1)[: x.shape[0]] - y


def test_unproved_rows_are_refused_naming_the_views():
    model = ViewsMixed()
    engine = PrivacyEngine(model, 1.0, 0.0, 4.0)
    with pytest.raises(ValueError, match=r"linear: its output has 24 rows in dim 0 but the loss has 12 rows "
                                         r"\(3 views of each of 4 examples\)"):
        engine.backward(model(torch.randn(12, 4), torch.randn(12)), views=VIEWS)
