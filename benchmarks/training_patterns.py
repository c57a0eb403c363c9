"""First contact with the patterns of real training scripts, on models of the libraries that use them.

    OMP_NUM_THREADS=1 python -m benchmarks.training_patterns [--patterns ema lora ...] [--steps 3]

Each pattern as its users write it, with `gnfx.compile(model, "kfac", loss="cross_entropy")` (or the
optimizer a row names) put in front of an otherwise unchanged loop: an EMA copy by
torch.optim.swa_utils.AveragedModel (timm's ModelEma deep-copies the same way), gradient clipping,
activation checkpointing switched on by the library (timm's `set_grad_checkpointing`, Hugging Face's
`gradient_checkpointing_enable`), a channels-last model and batch, LoRA adapters from peft on a frozen
Hugging Face model, and torchvision's segmentation models under `F.cross_entropy(out["out"], masks)`.
Per pattern: the capture's form, the share of the trainable parameters in curvature blocks, the
losses of `--steps` steps on one batch, gnfx's warnings, or the error. A pattern whose library is not
installed is reported as skipped: none of them is a dependency of gnfx (timm and torchvision as
benchmarks.library_probe says, peft by `pip install --target DIR peft` and DIR on PYTHONPATH).
"""
from __future__ import annotations

import argparse
import importlib
import warnings

import torch
import torch.nn.functional as F

import gnfx


def _timm(name: str, **kwargs):
    return importlib.import_module("timm").create_model(name, num_classes=5, **kwargs)


def ema():
    """An EMA of the compiled model (AveragedModel deep-copies it), updated after every step."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    model = _timm("resnet18")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    state = {}

    def after_step(c):
        if "ema" not in state:
            state["ema"] = AveragedModel(c, multi_avg_fn=get_ema_multi_avg_fn(0.99))
        state["ema"].update_parameters(c)
    return model, lambda c: F.cross_entropy(c(x), y), after_step


def clip():
    """torch.nn.utils.clip_grad_norm_ between backward and step (Hugging Face's Trainer does it at 1.0)."""
    model = _timm("vit_tiny_patch16_224", img_size=32)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    return model, lambda c: F.cross_entropy(c(x), y), None, lambda c: torch.nn.utils.clip_grad_norm_(c.parameters(), 0.1)


def timm_checkpointing():
    """timm's activation checkpointing of the blocks (torch.utils.checkpoint inside the forward)."""
    model = _timm("convnext_atto")
    model.set_grad_checkpointing(True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    return model, lambda c: F.cross_entropy(c(x), y), None


def hf_checkpointing():
    """Hugging Face's gradient_checkpointing_enable on a BERT classifier, labels inside the call."""
    transformers = importlib.import_module("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    model.gradient_checkpointing_enable()
    ids, y = torch.randint(0, 50, (4, 7)), torch.randint(0, 3, (4,))
    return model, lambda c: c(input_ids=ids, labels=y).loss, None


def channels_last():
    """A model and batch in torch.channels_last memory format."""
    model = _timm("resnet18").to(memory_format=torch.channels_last)
    x, y = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last), torch.randint(0, 5, (4,))
    return model, lambda c: F.cross_entropy(c(x), y), None


def lora():
    """peft's LoRA adapters (r = 4, dropout 0.1) on a frozen GPT-2, the causal-LM loss inside the call."""
    transformers, peft = importlib.import_module("transformers"), importlib.import_module("peft")
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2,
                                                                n_positions=16))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                      lora_dropout=0.1, fan_in_fan_out=True))
    ids = torch.randint(0, 50, (4, 9))
    return model, lambda c: c(input_ids=ids, labels=ids).loss, None


def segmentation():
    """torchvision's LR-ASPP, its (N, C, H, W) logits under F.cross_entropy with masks (255 ignored)."""
    segmentation_models = importlib.import_module("torchvision.models.segmentation")
    model = segmentation_models.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    x, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    masks[:, :8] = 255
    return model, lambda c: F.cross_entropy(c(x)["out"], masks, ignore_index=255), None


PATTERNS = {"ema": ema, "clip": clip, "timm_checkpointing": timm_checkpointing, "hf_checkpointing": hf_checkpointing,
            "channels_last": channels_last, "lora": lora, "segmentation": segmentation}


def probe(name: str, steps: int) -> str:
    """One table row: the pattern `name` trained `steps` steps by kfac at defaults on one batch."""
    torch.manual_seed(0)
    try:
        model, loss_of, after_step, *before_step = PATTERNS[name]()
    except ImportError as error:
        return f"| {name} | skipped: {error} | | | |"
    model.train()
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            c = gnfx.compile(model, "kfac", loss="cross_entropy")
            for _ in range(steps):
                loss = loss_of(c)
                loss.backward()
                for hook in before_step:
                    hook(c)
                c.step()
                c.zero_grad()
                if after_step:
                    after_step(c)
                losses.append(f"{loss.item():.3g}")
        except Exception as error:  # a row of the table, not the end of the run
            return f"| {name} | error: {type(error).__name__}: {str(error)[:200]} | | | |"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    covered, total = c.layers.coverage(trainable)
    said = sorted({str(w.message)[:90].replace("|", "/") + "..." for w in caught if str(w.message).startswith("gnfx")})
    return f"| {name} | {c.layers.form} | {100 * covered / total:.1f}% | {', '.join(losses)} | {'; '.join(said) or '–'} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", choices=sorted(PATTERNS), default=list(PATTERNS))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print("| pattern | capture | in blocks | kfac losses | gnfx's warnings |\n|---|---|---|---|---|")
    for name in args.patterns:
        print(probe(name, args.steps), flush=True)


if __name__ == "__main__":
    main()
