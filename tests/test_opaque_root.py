"""A top-level forward that neither torch.fx nor torch.export captures runs as written, its submodules'
layers opened into blocks (passes/opaque_root.py, passes/opaque_children.py).

`Detector` is built as torchvision's detection models' forwards are (RetinaNet, FCOS, SSD): it iterates
over its list of targets, which torch.fx cannot, and branches on a floating-point activation, which
torch.export refuses. Compiled with capture="auto", its layers must be blocks whose statistics equal
plain hooks on the uncompiled model (tests/references.py) at 1e-10 in float64, on batches taking either
side of the branch; its losses and gradients over several steps must be the module's own; one
RuntimeWarning says why and what it means. The explicit capture modes, a forward that raises on its
inputs, and a model with no layer to open keep their errors.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gnfx
from references import cross_entropy
from steps import compile_for_statistics, step_beside
from test_opaque_children import assert_statistics_match

DTYPE = torch.float64
CLASSES = 3
LINEARS = ["body.0", "body.2", "head"]
FALLBACK = "used by the Python code of the model's own forward, which runs at every call"


class Detector(nn.Module):
    """Checks each target's boxes (`for target in targets`), then a conv, a traceable body and a head,
    with a branch on the images' values between them, and a temperature of its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, CLASSES)
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.to(DTYPE)

    def forward(self, images, targets):
        for target in targets:
            boxes = target["boxes"]
            if (boxes[:, 2:] <= boxes[:, :2]).any():
                raise ValueError("All bounding boxes should have positive height and width")
        x = torch.stack(images)
        h = self.body(torch.relu(self.conv(x)).mean((2, 3)))
        if x.mean() > 0:
            h = 0.5 * h
        return self.head(h) / self.temperature


def detector_batch(seed, n=4):
    """(images, labels, targets): n (3, 6, 6) images, their labels and one valid box each."""
    g = torch.Generator().manual_seed(seed)
    images = list(torch.randn(n, 3, 6, 6, generator=g, dtype=DTYPE))
    corner = torch.rand(n, 1, 2, generator=g, dtype=DTYPE)
    targets = [{"boxes": torch.cat([c, c + 1], 1)} for c in corner]
    return images, torch.randint(0, CLASSES, (n,), generator=g), targets


def side_batches(sides):
    """A batch for each side (True: halved) of the branch."""
    out = []
    for side in sides:
        seed = next(s for s in range(1000 * len(out) + 1, 1000 * len(out) + 100)
                    if bool(torch.stack(detector_batch(s)[0]).mean() > 0) == side)
        out.append(detector_batch(seed))
    return out


def compiled(model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compile_for_statistics(model, optimizer="kfac", **options)
        images, y, targets = detector_batch(0)
        cross_entropy(c(images, targets=targets), y).backward()  # captured at this first call, which warns
        c.step()
        c.zero_grad()
    return c


def test_the_layers_of_the_opaque_forward_are_blocks_called_by_it():
    """Before: a CaptureError ("neither torch.fx nor torch.export could capture Detector")."""
    c = compiled(Detector())
    assert c.layers.form == "eager" and list(c.layers.leaves) == [""]
    assert [b.name for b in c.layers] == ["conv", *LINEARS]
    assert all(b.called_by == "" and not (b.model_input or b.model_output) for b in c.layers)
    assert [(f.param, f.reason) for f in c.layers.fallbacks] == [("temperature", f"{FALLBACK} (neither torch.fx "
                                                                                   f"nor torch.export captured it)")]
    assert [n for n, p in c.named_parameters()] == [n for n, p in Detector().named_parameters()]
    report = c.report()
    assert "block conv (called by the Python code of the model's own (opaque) forward)" in report
    assert "  (the model itself): neither torch.fx nor torch.export captured it" in report
    assert "    body: not opened: an nn.Sequential, whose children the opaque code may call one by one" in report
    assert "    body.0: opened" in report and "    body.2: opened" in report and "    head: opened" in report


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_statistics_of_its_layers_equal_the_hooks_on_either_side_of_its_branch(approx):
    model = Detector()
    c = compiled(model, kfac_approx=approx)
    for images, y, targets in side_batches([False, True, False]):
        assert_statistics_match(c, model, LINEARS, images, y, approx, targets=targets)


def test_losses_and_gradients_over_steps_are_the_modules_own():
    model = Detector()
    c = compiled(model, lr=0.1)
    reference = copy.deepcopy(model)
    for images, y, targets in side_batches([True, False, True, False]):
        loss, loss_ref = cross_entropy(c(images, targets=targets), y), cross_entropy(reference(images, targets), y)
        assert torch.equal(loss, loss_ref)
        step_beside(c, model, reference, loss, loss_ref)
    assert c.optimizer.steps == 5 and not torch.equal(model.head.weight, Detector().head.weight)


def test_one_warning_names_both_failures_and_what_runs_eagerly():
    c = gnfx.compile(Detector(), optimizer="kfac", lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            images, y, targets = detector_batch(seed)
            cross_entropy(c(images, targets=targets), y).backward()
            c.step()
            c.zero_grad()
    said = [str(w.message) for w in caught if "neither torch.fx nor torch.export" in str(w.message)]
    assert len(said) == 1 and all(w.category is RuntimeWarning for w in caught if str(w.message) in said)
    message = said[0]
    assert "torch.fx could not trace" in message and "for target in targets:" in message
    assert "torch.export could not capture" in message and "if x.mean() > 0:" in message
    assert "Detector's own forward runs as its Python code at every call" in message
    assert "layers of the submodules it calls are curvature blocks" in message
    assert "parameters its own code uses directly fall back to the diagonal preconditioner" in message


def test_a_submodule_kept_opaque_on_request_stays_whole():
    c = compiled(Detector(), leaf_modules=["body"])
    assert [b.name for b in c.layers] == ["conv", "head"]
    assert {f.param: f.reason for f in c.layers.fallbacks if f.param.startswith("body.")} == {
        name: "inside leaf module 'body' (requested with leaf_modules)"
        for name in ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias")}


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_explicit_capture_modes_keep_their_errors(capture):
    images, y, targets = detector_batch(0)
    c = gnfx.compile(Detector(), optimizer="kfac", lr=0.1, capture=capture)
    with pytest.raises(gnfx.CaptureError, match=f"torch.{capture} could not"):
        c(images, targets=targets)


def test_a_forward_that_raises_on_its_inputs_raises_its_own_error():
    images, y, targets = detector_batch(0)
    targets[1]["boxes"][0, 2] = -5.0
    c = gnfx.compile(Detector(), optimizer="kfac", lr=0.1)
    with pytest.raises(ValueError, match="positive height and width") as err:
        c(images, targets=targets)
    assert "Detector's own forward raises this" in "\n".join(err.value.__notes__)


class OwnWeights(nn.Module):
    """A top-level branch on a value and only parameters of its own: no layer to open."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        h = x @ self.w
        return -h if h.sum() > 0 else h


def test_a_forward_with_no_layer_to_open_is_still_a_capture_error():
    c = gnfx.compile(OwnWeights(), optimizer="kfac", lr=0.1)
    with pytest.raises(gnfx.CaptureError, match="neither torch.fx nor torch.export could capture OwnWeights") as err:
        c(torch.randn(5, 4))
    assert "if h.sum() > 0" in str(err.value) and "torch.cond" in str(err.value)


class RoutedLayers(nn.Module):
    """ultralytics' YOLO built small: the forward iterates its nn.Sequential `layers` and routes their
    outputs (the third layer takes the first's and the second's, concatenated, as a Concat layer's `f`
    indices say), and, given a dict (the trainer's batch), returns its own loss through a criterion built
    on the first call and kept on the module (`BaseModel.loss`: `self.criterion = self.init_criterion()`)
    whose class weights are a tensor; its branch on a floating-point activation leaves it to neither
    torch.fx nor torch.export."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(12, CLASSES))
        self.to(DTYPE)

    def predict(self, x):
        first = self.layers[0](x).tanh()
        outputs = [first, self.layers[1](first)]
        for layer in list(self.layers)[2:]:
            outputs.append(layer(torch.cat(outputs[-2:], 1)))
        logits = outputs[-1]
        return 0.5 * logits if logits.mean() > 0 else logits

    def forward(self, x):
        if isinstance(x, dict):
            if getattr(self, "class_weights", None) is None:
                self.class_weights = torch.arange(1, CLASSES + 1, dtype=x["x"].dtype)
            return nn.functional.cross_entropy(self.predict(x["x"]), x["y"], weight=self.class_weights)
        return self.predict(x)


def routed_batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, generator=g, dtype=DTYPE), "y": torch.randint(0, CLASSES, (n,), generator=g)}


def test_layers_of_a_sequential_the_opaque_forward_iterates_are_blocks_stepping_as_the_module():
    """Before: the nn.Sequential was opened whole, its graph never ran (the forward calls its layers, not
    it), and the first backward raised a GnfxError ("uses the parameter 'layers.2.bias' other than by
    calling 'layers'"). The losses and gradients over steps must be the module's own."""
    model = RoutedLayers()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, stat_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one warning that the forward runs eagerly
        for seed in range(4):
            b = routed_batch(seed)
            step_beside(c, model, reference, c(b), reference(b))
    assert c.layers.form == "eager" and [b.name for b in c.layers] == ["layers.0", "layers.1", "layers.2"]
    assert not c.layers.fallbacks and c.optimizer.steps == 4
    assert c.layers.opened["layers"].startswith("not opened: an nn.Sequential")


def test_statistics_of_the_layers_of_an_iterated_sequential_equal_the_hooks():
    model = RoutedLayers()
    c = compiled_routed = compile_for_statistics(model, optimizer="kfac")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(2):
            b = routed_batch(seed)
            assert_statistics_match(compiled_routed, model, ["layers.0", "layers.1", "layers.2"], b["x"], b["y"])
    assert c.layers.form == "eager"


def test_an_attribute_the_forward_builds_while_captured_is_built_again_from_real_tensors():
    """Before: torch.export's attempt left `class_weights` a FakeTensor on the module, the eager calls'
    loss computed with it, and the step raised a data-dependent GuardOnDataDependentSymNode. Now the
    attribute is gone after the capture, the first eager call builds it as the module does, and the
    losses are the module's own."""
    model = RoutedLayers()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(3):
            b = routed_batch(seed)
            loss, loss_ref = c(b), reference(b)
            assert torch.equal(loss, loss_ref)
            step_beside(c, model, reference, loss, loss_ref)
    assert type(model.class_weights) is torch.Tensor
    torch.testing.assert_close(model.class_weights, torch.arange(1.0, CLASSES + 1, dtype=DTYPE), rtol=0, atol=0)


class NormedBlock(nn.Module):
    """A block whose first layer is weight-normalized by torch.nn.utils.parametrizations (HuBERT's
    positional convolution is)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6))
        self.out = nn.Linear(6, CLASSES)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)))


class NormedDetector(nn.Module):
    """A weight-normalized block under a forward that branches on a floating-point activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = NormedBlock()
        self.to(DTYPE)

    def forward(self, x):
        h = self.block(x)
        return 0.5 * h if h.mean() > 0 else h


def test_a_parametrized_layer_inside_an_opened_child_steps_as_the_module():
    """Before: the first call raised torch's "Serialization of parametrized modules is only supported through
    state_dict()": the opened child's twin shallow-copied the parametrized Linear with copy.copy."""
    model = NormedDetector()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, stat_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(3):
            b = routed_batch(seed)
            loss, loss_ref = cross_entropy(c(b["x"]), b["y"]), cross_entropy(reference(b["x"]), b["y"])
            assert torch.equal(loss, loss_ref)
            step_beside(c, model, reference, loss, loss_ref)
    assert c.layers.form == "eager" and c.layers.opened["block"].startswith("opened")
    assert "block.out" in [b.name for b in c.layers]


class DrawingDetector(nn.Module):
    """Decides with a torch draw on concrete values (`torch.rand(1).item()`, as HuBERT's mask spans do), then
    branches on a floating-point activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, CLASSES)
        self.to(DTYPE)

    def forward(self, x):
        h = self.fc(x)
        if torch.rand(1).item() < 0.5:
            h = 2 * h
        return 0.5 * h if h.mean() > 0 else h


def test_capturing_draws_nothing_from_torchs_generator():
    """Before: torch.fx's attempt ran `torch.rand(1)`, so the first call after the seed drew the module's
    second number, not its first, and every draw after it was shifted by one."""
    model = DrawingDetector()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    x = routed_batch(0)["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (1, 3, 4):  # first draws on either side of 0.5, the first of them at the capturing call
            torch.manual_seed(seed)
            out, after = c(x), torch.rand(1)
            torch.manual_seed(seed)
            assert torch.equal(out, reference(x)) and torch.equal(after, torch.rand(1))
    assert c.layers.form == "eager"
