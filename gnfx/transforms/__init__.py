"""The update chain: small transforms of a curvature preconditioner's directions, one per file.

    gnfx.compile(model, optimizer="soap",
                 chain=[gnfx.transforms.HeavyBall(0.9), gnfx.transforms.Step()])

(docs/design.md, "The update chain"). Each preconditioner declares its default chain
(`default_chain(hp)`), built from its hyperparameters; `chain=` replaces it.
"""
from gnfx.transforms.base import Transform
from gnfx.transforms.graft import Graft
from gnfx.transforms.kl_clip import KLClip
from gnfx.transforms.momentum import HeavyBall
from gnfx.transforms.step import Step

__all__ = ["Transform", "Graft", "KLClip", "HeavyBall", "Step"]
