"""First contact with models written with einops: lucidrains' vit-pytorch and x-transformers.

    OMP_NUM_THREADS=1 PYTHONPATH=EINOPS:VIT_PYTORCH:X_TRANSFORMERS:THEIR_DEPS:. \
        python -m benchmarks.einops_probe [--models vit xt_lm] [--steps 5] [--timeout 600] [--out table.md]
    ... python -m benchmarks.einops_probe --scan [--models x_transformers.use_scalenorm]

Both libraries write their forwards with `einops.rearrange` / `repeat` / `reduce` and their patch
embeddings with `einops.layers.torch.Rearrange` modules. Each model is built from a small config (dim 64,
depth 2, 4 heads) from random weights and called as its users train it: the vision transformers (ViT,
SimpleViT, CaiT with and without its layer dropout, DeepViT, x-transformers' ViTransformerWrapper) on 8
random 32x32 images with `F.cross_entropy(model(images), labels)`; NaViT (with token dropout) on 5 images
of different sizes in 3 groups (a list of lists, as its users pass them); vit-pytorch's MAE wrapper as
`loss = mae(images)` (its own mean-squared error on the masked patches; its encoder a ViT with
`pool="mean"`: MAE slices a class token's row off the encoder's position table as if it were (1, T, d),
which vit-pytorch 1.26's (T, d) table breaks); x-transformers' TransformerWrapper(Decoder) as a language
model, `F.cross_entropy(logits.transpose(1, 2), targets)` (classes on dim 1), with absolute positions,
with rotary ones, and with RMSNorm and GLU feed-forwards, and through its AutoregressiveWrapper
(`loss = wrapper(ids)`); the ContinuousTransformerWrapper on a regression, `F.mse_loss(model(x), y)`.
Per model, each in a process of its own under `--timeout` seconds:

- exactness: in float64 with dropout off, 3 kfac steps at lr 1e-3: the largest |difference| of the loss
  and of any gradient between the compiled model and the original module at the same parameters;
- `--steps` steps of kfac at lr 1e-3, kfac with the model's `loss=` at its defaults (no lr: the
  quadratic-model step), shampoo and "auto" at lr 1e-3: the capture's form, the share of the
  trainable parameters in curvature blocks, the losses, gnfx's warnings (once each) and the seconds,
  or the error; and after the table, each parameter outside the curvature blocks with gnfx's reason.

With `--scan`, the SCAN models instead (more of vit-pytorch's files, x-transformers' Decoder options), one
row each: one kfac statistic step, its loss and gradient gaps (float64), the capture, the share in blocks
and the parameters outside them.

Neither library is a dependency of gnfx: unpack them (and einx, loguru, frozendict, torch-einops-utils
for x-transformers) without their dependencies and put them on PYTHONPATH; vit_pytorch's package
imports torchvision, which this probe avoids by importing its model files one by one, but for MAE,
whose file imports the package (benchmarks.torchvision_models says how to make torchvision importable).
The results: benchmarks/results/first_contact_9_einops.md.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

import gnfx
from benchmarks.child_rows import child_row, write_table
from benchmarks.lockstep import lockstep_gaps

BATCH, IMAGE, CLASSES, TOKENS, T = 8, 32, 10, 256, 32
VIT = dict(image_size=IMAGE, patch_size=4, num_classes=CLASSES, dim=64, depth=2, heads=4, mlp_dim=128)


def _vit_pytorch(module: str, cls: str):
    """vit_pytorch's model file `module` alone (its package's __init__ imports torchvision)."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        sys.exit("vit_pytorch is not importable: unpack it and put it on PYTHONPATH")
    path = f"{spec.submodule_search_locations[0]}/{module}.py"
    loaded = importlib.util.spec_from_file_location(f"_probe_vit_pytorch_{module}", path)
    file = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(file)
    return getattr(file, cls)


def _xt(name: str):
    return getattr(importlib.import_module("x_transformers"), name)


def _decoder(dropout: bool, wrapper: dict | None = None, **kwargs):
    p = 0.1 if dropout else 0.0
    return _xt("TransformerWrapper")(num_tokens=TOKENS, max_seq_len=64, emb_dropout=p, **(wrapper or {}),
                                     attn_layers=_xt("Decoder")(dim=64, depth=2, heads=4, attn_dropout=p,
                                                                ff_dropout=p, **kwargs))


def _vit_file(module: str, cls: str, **extra):
    """vit-pytorch's model `cls` of file `module`, with the arguments of VIT its constructor takes."""
    model = _vit_pytorch(module, cls)
    taken = inspect.signature(model.__init__).parameters
    return model(**{k: v for k, v in VIT.items() if k in taken}, **extra)


def _encoder(dropout: bool):
    p = 0.1 if dropout else 0.0
    return _xt("Encoder")(dim=64, depth=2, heads=4, attn_dropout=p, ff_dropout=p)


# name -> (builder(dropout), batch(generator), loss(model, batch), kfac's loss= or None)
def _images(g):
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _tokens(g):
    ids = torch.randint(0, TOKENS, (BATCH // 2, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _sequences(g):
    return torch.randn(BATCH // 2, T, 8, generator=g), torch.randn(BATCH // 2, T, 8, generator=g)


def _images_of_sizes(g):
    """NaViT's batch: 3 groups of 5 images of different sizes (multiples of the patch) and 5 labels."""
    sizes = [[(32, 32), (16, 32)], [(24, 16)], [(32, 16), (8, 8)]]
    return [[torch.randn(3, h, w, generator=g) for h, w in group] for group in sizes], \
        torch.randint(0, CLASSES, (5,), generator=g)


def _classify(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _classify_with_aux_loss(model, batch):
    """vit_with_decorr in training returns (logits, its decorrelation loss), which its users add."""
    logits, aux = model(batch[0])
    return F.cross_entropy(logits, batch[1]) + aux


def _language_model(model, batch):
    return F.cross_entropy(model(batch[0]).transpose(1, 2), batch[1])


def _regression(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _own_loss(model, batch):
    return model(batch[0])


MODELS = {
    "vit": (lambda d: _vit_pytorch("vit", "ViT")(**VIT, dropout=0.1 * d, emb_dropout=0.1 * d), _images, _classify,
            "cross_entropy"),
    "simple_vit": (lambda d: _vit_pytorch("simple_vit", "SimpleViT")(**VIT), _images, _classify, "cross_entropy"),
    "cait": (lambda d: _vit_pytorch("cait", "CaiT")(**VIT, cls_depth=1, dropout=0.1 * d, emb_dropout=0.1 * d,
                                                     layer_dropout=0.05 * d), _images, _classify, "cross_entropy"),
    "deepvit": (lambda d: _vit_pytorch("deepvit", "DeepViT")(**VIT, dropout=0.1 * d, emb_dropout=0.1 * d), _images,
                _classify, "cross_entropy"),
    "navit": (lambda d: _vit_pytorch("na_vit", "NaViT")(**VIT, dropout=0.1 * d, emb_dropout=0.1 * d,
                                                         token_dropout_prob=0.1 * d or None),
              _images_of_sizes, _classify, "cross_entropy"),
    "mae": (lambda d: _vit_pytorch("mae", "MAE")(encoder=_vit_pytorch("vit", "ViT")(**VIT, pool="mean"),
                                                  decoder_dim=32, decoder_depth=1, decoder_heads=4, decoder_dim_head=16),
            _images, _own_loss, None),
    "xt_lm": (lambda d: _decoder(d), _tokens, _language_model, "cross_entropy"),
    "xt_lm_rotary": (lambda d: _decoder(d, rotary_pos_emb=True), _tokens, _language_model, "cross_entropy"),
    "xt_lm_rmsnorm": (lambda d: _decoder(d, use_rmsnorm=True, ff_glu=True), _tokens, _language_model,
                      "cross_entropy"),
    "xt_autoregressive": (lambda d: _xt("AutoregressiveWrapper")(_decoder(d)), lambda g: (_tokens(g)[0],),
                          _own_loss, None),
    "xt_continuous": (lambda d: _xt("ContinuousTransformerWrapper")(dim_in=8, dim_out=8, max_seq_len=64,
                                                                     attn_layers=_encoder(d)), _sequences,
                      _regression, "mse"),
    "xt_vit": (lambda d: _xt("ViTransformerWrapper")(image_size=IMAGE, patch_size=4, num_classes=CLASSES,
                                                      attn_layers=_encoder(d)), _images, _classify,
               "cross_entropy"),
    # CaiT without its layer dropout, which decides in Python from a random tensor which layers run (no graph
    # holds that): captured whole by torch.export
    "cait_no_layer_dropout": (lambda d: _vit_pytorch("cait", "CaiT")(**VIT, cls_depth=1, dropout=0.1 * d,
                                                                     emb_dropout=0.1 * d, layer_dropout=0.0),
                              _images, _classify, "cross_entropy"),
}


# one statistic step each (`--scan`): more of vit-pytorch's files, and x-transformers' options
SCAN = {
    "vit_pytorch.vit_with_decorr": (lambda d: _vit_file("vit_with_decorr", "ViT"), _images, _classify_with_aux_loss,
                                    None),
    **{f"vit_pytorch.{module}": (lambda d, module=module, cls=cls, extra=extra: _vit_file(module, cls, **extra),
                                 _images, _classify, None)
       for module, cls, extra in [
           ("simple_vit_with_register_tokens", "SimpleViT", {}), ("simple_vit_with_qk_norm", "SimpleViT", {}),
           ("parallel_vit", "ViT", {}), ("vit_for_small_dataset", "ViT", {}), ("vit_with_patch_merger", "ViT", {}),
           ("normalized_vit", "nViT", {}), ("learnable_memory_vit", "ViT", {}),
           ("simple_vit_with_value_residual", "SimpleViT", {}), ("vit_with_patch_dropout", "ViT", {}),
           ("vit_5", "ViT", {}), ("jumbo_vit", "JumboViT", {}), ("simple_vit_with_fft", "SimpleViT",
                                                                 {"freq_patch_size": 4}),
           ("xcit", "XCiT", {"cls_depth": 1, "local_patch_kernel_size": 3}),
           ("t2t", "T2TViT", {"t2t_layers": ((7, 4), (3, 2))})]},
    **{f"x_transformers.{option}": (lambda d, wrapper=wrapper, layers=layers: _decoder(False, wrapper, **layers),
                                    _tokens, _language_model, None)
       for option, wrapper, layers in [
           ("num_memory_tokens", {"num_memory_tokens": 2}, {}), ("tie_embedding", {"tie_embedding": True}, {}),
           ("rel_pos_bias", {}, {"rel_pos_bias": True}), ("alibi_pos_bias", {}, {"alibi_pos_bias": True}),
           ("use_scalenorm", {}, {"use_scalenorm": True}), ("use_simple_rmsnorm", {}, {"use_simple_rmsnorm": True}),
           ("sandwich_norm+macaron", {}, {"sandwich_norm": True, "macaron": True}),
           ("attn_qk_norm", {}, {"attn_qk_norm": True}), ("gate_residual", {}, {"gate_residual": True}),
           ("attn_flash", {}, {"attn_flash": True}), ("attn_num_mem_kv", {}, {"attn_num_mem_kv": 2})]},
}


def exactness(entry: tuple, steps: int = 3) -> str:
    """The largest |loss difference| and |gradient difference| over `steps` kfac steps (float64, no dropout).
    The reference is built anew from the same seed, not copied: x-transformers ties its unembedding with a
    closure over the module (`lambda t: t @ self.token_emb.emb.weight.t()`), which a deepcopy shares."""
    build, make_batch, loss_of, _ = entry
    torch.set_default_dtype(torch.float64)  # the tensors a forward creates (MAE's decoder tokens) too
    torch.manual_seed(0)
    model = build(False).double()
    torch.manual_seed(0)
    reference = build(False).double()
    batch = tree_map(lambda t: t.double() if t.is_floating_point() else t, make_batch(torch.Generator().manual_seed(1)))
    c = gnfx.compile(model, "kfac", lr=1e-3)
    loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, _: loss_of(m, batch), steps, seed=100)
    torch.set_default_dtype(torch.float32)
    return f"{loss_gap:.1e} / {grad_gap:.1e}"


def run(name: str, optimizer: str, steps: int, **hparams) -> tuple[str, list]:
    """(the table row, [(parameter, reason)] outside the blocks) of `steps` steps of `optimizer`, dropout on."""
    build, make_batch, loss_of, _ = MODELS[name]
    torch.manual_seed(0)
    model = build(True)
    batch = make_batch(torch.Generator().manual_seed(1))
    start, losses = time.time(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = gnfx.compile(model, optimizer, **hparams)
        for _ in range(steps):
            loss = loss_of(c, batch)
            loss.backward()
            c.step()
            c.zero_grad()
            losses.append(f"{loss.item():.3g}")
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    said = sorted({str(w.message)[:120].replace("|", "/").replace("\n", " ") + "..." for w in caught
                   if str(w.message).startswith("gnfx")})
    setting = ", ".join(f"{k}={v}" for k, v in hparams.items())
    row = (f"| {name} | {optimizer} {setting} | {c.layers.form} | {100 * covered / total:.1f}% | {', '.join(losses)} "
           f"| {'; '.join(said) or '–'} | {time.time() - start:.0f} |")
    return row, [(f.param, f.reason.replace("|", "/")) for f in c.layers.fallbacks]


def settings(name: str) -> list[tuple[str, dict]]:
    loss = MODELS[name][3]
    return [("kfac", dict(lr=1e-3))] + ([("kfac", dict(loss=loss))] if loss else []) + \
        [("shampoo", dict(lr=1e-3)), ("auto", dict(lr=1e-3))]


def scan_row(name: str) -> str:
    """One kfac statistic step of a SCAN model: the capture, the share in blocks, the loss and gradient gaps
    (as `exactness`, one step), and the parameters outside the blocks with gnfx's reasons."""
    exact = exactness(SCAN[name], steps=1)
    model = SCAN[name][0](False)
    c = gnfx.compile(model, "kfac", lr=1e-3)
    SCAN[name][2](c, SCAN[name][1](torch.Generator().manual_seed(1))).backward()
    c.step()
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    outside = "; ".join(f"{f.param}: {f.reason[:90]}" for f in c.layers.fallbacks[:4]).replace("|", "/")
    more = f" (and {len(c.layers.fallbacks) - 4} more)" if len(c.layers.fallbacks) > 4 else ""
    return f"| {name} | {c.layers.form} | {100 * covered / total:.1f}% | {exact} | {outside or '–'}{more} |"


def probe(name: str, steps: int) -> dict:
    """The model's rows: exactness, then one per setting (or its error), and its fallbacks of the first."""
    torch.set_num_threads(1)
    try:
        exact = exactness(MODELS[name])
    except Exception as error:  # noqa: BLE001 -- what a user would see is the result
        exact = f"{type(error).__name__}: {str(error)[:150]}".replace("|", "/").replace("\n", " ")
        torch.set_default_dtype(torch.float32)
    rows, fallbacks = [], None
    for optimizer, hparams in settings(name):
        try:
            row, found = run(name, optimizer, steps, **hparams)
        except Exception as error:  # noqa: BLE001
            text = f"{type(error).__name__}: {str(error)[:300]}".replace("|", "/").replace("\n", " ")
            row, found = f"| {name} | {optimizer} {hparams} | error: {text} | | | | |", None
        rows.append(row)
        fallbacks = found if fallbacks is None else fallbacks
    return {"exact": f"| {name} | {exact} |", "rows": rows,
            "fallbacks": [f"| {name} | {param} | {reason[:200]} |" for param, reason in fallbacks or ()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS) + list(SCAN),
                        help="default: every model of MODELS, or with --scan of SCAN")
    parser.add_argument("--scan", action="store_true", help="one statistic step of each SCAN model instead")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--out", help="also write the tables to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's model
    args = parser.parse_args()
    if args.one:
        print(scan_row(args.one) if args.scan else json.dumps(probe(args.one, args.steps)))
        return
    if args.scan:
        rows = ["| model | capture | in blocks | loss / gradient gap, float64 | outside the blocks (kfac) |",
                "|---|---|---|---|---|"]
        for name in args.models or SCAN:
            rows.append(child_row([sys.executable, "-m", "benchmarks.einops_probe", "--scan", "--one", name],
                                  args.timeout, lambda error: f"| {name} | error: {error[:200]} | | | |",
                                  f"| {name} | over the {args.timeout:.0f} s timeout | | | |"))
            print(rows[-1], flush=True)
        write_table(rows, args.out)
        return
    exact = ["| model | exactness: loss / gradient gap, float64 |", "|---|---|"]
    rows = ["| model | optimizer | capture | in blocks | losses | gnfx's warnings | s |",
            "|---|---|---|---|---|---|---|"]
    fallbacks = ["| model | parameter outside the blocks (kfac) | gnfx's reason |", "|---|---|---|"]
    for name in args.models or MODELS:
        line = child_row([sys.executable, "-m", "benchmarks.einops_probe", "--one", name, "--steps", str(args.steps)],
                         args.timeout, lambda error: json.dumps({"error": error}),
                         json.dumps({"error": f"over the {args.timeout:.0f} s timeout"}))
        found = json.loads(line)
        if "error" in found:
            exact.append(f"| {name} | error: {found['error'][:200]} |")
            continue
        exact.append(found["exact"])
        rows += found["rows"]
        fallbacks += found["fallbacks"]
        print("\n".join([found["exact"]] + found["rows"] + found["fallbacks"]), flush=True)
    tables = exact + [""] + rows + [""] + fallbacks
    print("\n".join(tables))
    write_table(tables, args.out)


if __name__ == "__main__":
    main()
