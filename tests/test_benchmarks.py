"""The benchmark harness runs end to end on a tiny configuration and writes its outputs.

These tests check that the code runs, not that any optimizer wins. They need the benchmarks'
extra packages (scikit-learn for the digits, matplotlib for the plots) and skip without them.
"""
import copy
import json
import pathlib
import subprocess
import sys
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import overhead  # noqa: E402
from benchmarks.models import GPT, GPTConfig  # noqa: E402
from benchmarks.optimizers import OptimizerSpec, Trainer, Unavailable  # noqa: E402
from benchmarks.report import best_run  # noqa: E402
from benchmarks.run import Mode, run  # noqa: E402
from benchmarks.tasks import TASKS  # noqa: E402
from benchmarks.train import RunResult, train  # noqa: E402
from gnfx.errors import GnfxError  # noqa: E402

pytestmark = pytest.mark.thread_independent  # smoke runs of the benchmark harness; no figure is asserted (tests/conftest.py)

TINY = Mode("tiny", grid=False, quick_targets=True, stop_at_target=False, time_budget=10.0, max_steps=2)


def test_harness_writes_json_markdown_and_plots(tmp_path):
    optimizers = ["adamw", "sgd", "gnfx_diag"]
    entries = run(TINY, list(TASKS), optimizers, tmp_path)

    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["mode"] == "tiny" and record["threads"] == 2 and record["clock"] == "wall"
    assert {(e["task"], e["optimizer"]) for e in record["results"]} == {(t, o) for t in TASKS for o in optimizers}
    for entry in entries:
        best = entry["best"]
        if best["status"] == "skipped":
            assert entry["optimizer"] == "gnfx_diag" and best["reason"]
            continue
        assert best["steps"] == 2 and [p["step"] for p in best["curve"]] == [0, 2]
        assert best["fwd_bwd_ms"] > 0 and best["opt_step_ms"] > 0
    adamw = [e for e in entries if e["optimizer"] == "adamw"]
    assert all(e["ratios_vs_adamw"]["fwd_bwd_ms"] == 1 for e in adamw)
    table = (tmp_path / "tiny.md").read_text()
    assert all(f"## {task}" in table for task in TASKS)
    assert all((tmp_path / f"tiny_{task}.png").stat().st_size > 0 for task in TASKS)


def test_harness_counts_cpu_seconds_when_asked(tmp_path):
    """--cpu-time: the record says so, and so does the table (a shared machine's figures)."""
    run(TINY, ["digits_mlp"], ["adamw", "gnfx_kfac_defaults"], tmp_path, threads=1, cpu_time=True)
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["clock"] == "cpu" and record["threads"] == 1
    assert {e["optimizer"] for e in record["results"]} == {"adamw", "gnfx_kfac_defaults"}
    assert "CPU seconds of the training thread" in (tmp_path / "tiny.md").read_text()


def test_unavailable_optimizers_are_skipped_with_their_reason():
    def missing(model, lr):
        raise Unavailable("not installed here")

    def declines_first_step(model, lr):
        def step():
            raise NotImplementedError("no such layer")
        return Trainer(model, step, lambda: None)

    task = TASKS["digits_mlp"]()
    skipped = train(task, OptimizerSpec("missing", "test", (1e-3,), 1e-3, missing), 1e-3, 0.1, 2, False, 10.0)
    assert skipped.status == "skipped" and skipped.reason == "not installed here"
    declined = train(task, OptimizerSpec("declines", "test", (1e-3,), 1e-3, declines_first_step,
                                         (NotImplementedError,)), 1e-3, 0.1, 2, False, 10.0)
    assert declined.status == "skipped" and "no such layer" in declined.reason


def test_best_run_prefers_reaching_the_target_fastest_then_the_lowest_loss():
    def result(lr, seconds, final):
        return RunResult("t", "o", lr, "reached" if seconds else "not reached", steps_to_target=seconds and 1,
                         seconds_to_target=seconds, final_loss=final)

    assert best_run([result(1, None, 0.1), result(2, 3.0, 0.5), result(3, 2.0, 0.6)]).lr == 3
    assert best_run([result(1, None, 0.3), result(2, None, 0.2)]).lr == 2


def test_gpt_is_causal_with_a_tied_unembedding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, context=8))
    assert model.lm_head.weight is model.tok_emb.weight
    idx = torch.randint(11, (2, 8))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    with torch.no_grad():
        assert torch.allclose(model(idx)[:, :5], model(changed)[:, :5], atol=1e-6)


def test_overhead_writes_json_and_markdown(tmp_path):
    rows = overhead.main(["--widths", "16", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert rows[0]["adamw"]["step_ms"] > 0 and rows[0]["gnfx"]
    assert json.loads((tmp_path / "overhead.json").read_text())["rows"] == rows
    assert "width 16" in (tmp_path / "overhead.md").read_text()


def test_targets_measure_every_ratio_on_a_tiny_model(tmp_path):
    """The performance-targets table runs end to end on a tiny MLP (figures not asserted)."""
    from benchmarks import targets
    from benchmarks.models import mlp

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(4, (16,))
    row = targets.measure(lambda: mlp([8, 8, 4]), (x, y), torch.nn.functional.cross_entropy, repeats=1)
    assert set(row["whole_step"]) == {"diag", "rank1", "kfac", "shampoo"}
    # both blocks see the 16 rows of the batch, which cancel; the first forms no input gradient
    assert row["flop_bound"] == pytest.approx(1 + (8 * 8 + 8 * 8 + 8 * 8 + 4 * 4) / (2 * 8 * 8 + 3 * 8 * 4))
    # K-FAC's step S⁻¹ G A⁻¹ on [W b] (8 x 9 and 4 x 9) against the 16 rows' forward+backward
    step = 8 * 8 * 9 + 8 * 9 * 9 + 4 * 4 * 9 + 4 * 9 * 9
    assert row["apply_flop_bound"] == pytest.approx(1 + step / (16 * (2 * 8 * 8 + 3 * 8 * 4)))
    text = targets.markdown({"tiny": row}, repeats=1)
    assert "| tiny |" in text and "stat / bound" in text


def test_rows_sweep_runs_on_a_tiny_mlp_with_its_products_bounds(monkeypatch):
    """The rows-per-step sweep runs end to end on an 8-8-8-10 MLP (figures not asserted) and its
    bounds are the docstring's: [W b] of 8x9, 8x9, 10x9, R rows; layers R(2·64 + 3·64 + 3·80) = 560R
    (the first forms no input gradient), K-FAC's step Σ d_out² d_a + d_out d_a² = 2(64·9 + 8·81) +
    100·9 + 10·81 = 4158 and taps R(128 + 128 + 164) every stat_every steps; Shampoo's step the same
    4158 plus its Gram matrices, as many, on statistic steps; rank1's taps R(8·9 + 8·9 + 10·9) = 234R
    on statistic steps (the per-example diagonal: the batch gradient is autograd's ∇W, gnfx.taps.WeightTap)."""
    from benchmarks import targets

    monkeypatch.setattr(targets, "SWEEP_WIDTH", 8)
    monkeypatch.setattr(targets, "SWEEP_RATIOS", (0.25, 4))
    points = targets.sweep(rounds=1)
    assert [p["rows"] for p in points] == [2, 32]
    for p in points:
        r = p["rows"]
        assert p["bound"]["kfac"] == pytest.approx(1 + (4158 + 420 * r / targets.STAT_EVERY) / (560 * r))
        assert p["bound"]["shampoo"] == pytest.approx(1 + 4158 * (1 + 1 / targets.STAT_EVERY) / (560 * r))
        assert p["bound"]["rank1"] == pytest.approx(1 + 234 / (targets.STAT_EVERY * 560))
        assert p["bound"]["diag"] == 1 and set(p["ratio"]) == set(targets.SWEEP_TARGETS)
    text = targets.sweep_markdown(points, 1, "python -m benchmarks.targets --sweep")
    assert "| 32 | 4 |" in text and "--sweep" in text


def test_rank1s_bound_counts_the_batch_gradients_its_own_taps_form(monkeypatch):
    """rank1's products bound reads from the column's own compiled model which blocks take the batch gradient
    from autograd (gnfx.taps.WeightTap): none with loss= (fisher="mc"), so its taps form δᵀa too and the
    8-8-8-10 MLP's statistic steps cost 2 · 234R, not 234R."""
    from benchmarks import targets

    monkeypatch.setattr(targets, "SWEEP_WIDTH", 8)
    variants = ("rank1", "rank1:loss=cross_entropy")
    point = targets.sweep(rounds=1, ratios=(4,), variants=variants)[0]
    assert point["bound"]["rank1"] == pytest.approx(1 + 234 / (targets.STAT_EVERY * 560))
    assert point["bound"]["rank1:loss=cross_entropy"] == pytest.approx(1 + 468 / (targets.STAT_EVERY * 560))


def test_rows_sweep_of_chosen_variants_times_whole_refresh_periods(monkeypatch):
    """`--sweep-optimizers` columns carry gnfx.compile settings, keep their preconditioner's bound
    and target, and each is timed over windows that hold whole refresh periods: lcm(stat_every,
    precondition_frequency) steps (a window of stat_every steps would miss a refresh every 25), and
    under a drift-triggered refresh its max_refresh_interval, with the share of root checks that
    refreshed in the timed rounds (after the warm-up) reported for that column alone."""
    import gnfx
    from benchmarks import targets
    from benchmarks.models import mlp

    monkeypatch.setattr(targets, "SWEEP_WIDTH", 8)
    variants = ("shampoo", "shampoo:precondition_frequency=25", "shampoo:refresh_tolerance=0.01,max_refresh_interval=20")
    points = targets.sweep(rounds=1, ratios=(4,), variants=variants, warmup=5)
    assert set(points[0]["ratio"]) == set(variants)
    assert set(points[0]["refreshed"]) == {variants[2]} and 0 <= points[0]["refreshed"][variants[2]] <= 1
    assert points[0]["bound"][variants[1]] == points[0]["bound"]["shampoo"] > 1
    assert targets.sweep_variant(variants[1]) == ("shampoo", {"precondition_frequency": 25})
    compiled = gnfx.compile(mlp([8, 8, 10]), "shampoo", precondition_frequency=25)
    assert targets.refresh_window(compiled) == 50
    drifting = gnfx.compile(mlp([8, 8, 10]), "shampoo", refresh_tolerance=0.01, max_refresh_interval=40)
    assert targets.refresh_window(drifting) == 40
    assert targets.refresh_window(gnfx.compile(mlp([8, 8, 10]), "kfac")) == targets.STAT_EVERY
    text = targets.sweep_markdown(points, 1, "python -m benchmarks.targets --sweep")
    assert "shampoo:precondition_frequency=25" in text and "| 32 | 4 |" in text and "of roots refreshed" in text
    with pytest.raises(SystemExit, match="not one of"):
        targets.sweep_variant("adamw:lr=1")


def test_compile_time_table_runs_on_a_tiny_mlp(monkeypatch):
    """The compile-time table runs end to end (with dynamo's eager backend, not inductor, to stay fast)."""
    import gnfx.codegen
    from benchmarks import compile_time
    from benchmarks.models import mlp

    monkeypatch.setattr(gnfx.codegen, "BACKEND", "eager")
    x, y = torch.randn(16, 8), torch.randint(4, (16,))
    row = compile_time.measure(lambda: mlp([8, 8, 4]), (x, y), torch.nn.functional.cross_entropy, "kfac", window=2)
    assert row["first_compiled_s"] > 0 and row["eager_ms"] > 0 and row["compiled_ms"] > 0
    assert row["overhead_s"] == pytest.approx(row["first_compiled_s"] - row["first_eager_s"])
    assert "| tiny | kfac |" in compile_time.markdown({"tiny/kfac": row}, "python -m benchmarks.compile_time")


def test_profile_tables_run_on_a_tiny_model():
    """The profile's three tables run end to end on a tiny MLP (figures not asserted)."""
    from benchmarks import profile
    from benchmarks.models import mlp

    g = torch.Generator().manual_seed(0)
    batch = torch.randn(16, 8, generator=g), torch.randint(4, (16,), generator=g)
    make, loss = (lambda: mlp([8, 8, 4])), torch.nn.functional.cross_entropy
    result = {"breakdown": {"tiny": profile.breakdown(make, batch, loss, rounds=1)},
              # every operator (a top-8 by time would make the check below depend on the machine's speed)
              "operators": {"tiny, kfac, refresh": profile.top_operators(make, batch, loss, "kfac", True, rows=1000)},
              "refresh": profile.refresh_timings([8], runs=1), "runs": 1}
    row = result["breakdown"]["tiny"]
    assert set(profile.PRECONDITIONERS) <= set(row) and row["apply_gflop"] > 0
    assert "cholesky" in result["operators"]["tiny, kfac, refresh"]  # the refresh step factorizes
    text = profile.markdown(result)
    assert text.count("| tiny |") == len(profile.PRECONDITIONERS) and "| 8 |" in text


def test_step_parts_split_a_tiny_sweep_mlp_and_restore_what_they_timed():
    """The whole step split into parts runs on a tiny sweep MLP; the parts with the plain fwd+bwd and
    the taps add up to the whole step, and the wrapped methods are the originals again afterwards
    (figures not asserted)."""
    from benchmarks import profile
    from gnfx.transforms import Graft, Step

    before = Graft.__call__, Step.__call__
    result = profile.step_parts(["rank1", "kfac", "shampoo"], rows=16, width=8, windows=1)
    assert (Graft.__call__, Step.__call__) == before
    for name in ("rank1", "kfac", "shampoo"):
        parts = result[name]
        assert set(profile.PARTS) <= set(parts)
        assert parts["whole"] == pytest.approx(parts["fwd+bwd"] + parts["taps"] + parts["step"])
        assert parts["step"] == pytest.approx(sum(parts[k] for k in profile.PARTS[2:]))
    # rank1 updates its sketch and D from the statistics in its refresh
    assert result["kfac"]["refresh"] > 0 and result["shampoo"]["collect"] > 0 and result["rank1"]["refresh"] > 0
    text = profile.parts_markdown([result], "python -m benchmarks.profile --parts 2")
    assert "16 rows per step" in text and text.count("| refresh |") == 1


def test_big_factors_tables_run_on_a_tiny_resnet(monkeypatch, tmp_path):
    """The ResNet benchmark of big factors runs end to end on a ResNet of 4 and 8 channels, where
    max_factor=20 blocks the 3x3 convolutions' A (36 and 72 entries) into channels (figures not asserted)."""
    import functools

    from benchmarks import big_factors
    from benchmarks.models import resnet18

    monkeypatch.setattr(big_factors, "resnet18", functools.partial(resnet18, channels=(4, 8)))
    common = ["--batch", "2", "--max-factors", "0", "20", "--threads", "1", "--out", str(tmp_path)]
    result = big_factors.main([*common, "--rounds", "1", "--plain", "1"])
    assert set(result["rows"]) == {"adamw", "kfac max_factor=0", "kfac max_factor=20"}
    assert "A(2 blocks of 18)" in result["rows"]["kfac max_factor=20"]["blocks"]
    assert "A(2 blocks of 18)" not in result["rows"]["kfac max_factor=0"]["blocks"]
    assert (tmp_path / "big_factors.md").read_text().count("| kfac max_factor=") == 2
    parts = big_factors.main([*common, "--parts", "--repeats", "1"])
    assert set(parts) == {"kfac max_factor=0", "kfac max_factor=20"}
    assert (tmp_path / "big_factors_parts.md").read_text().count("| kfac max_factor=") == 2


def test_big_factors_tables_run_on_a_tiny_vgg_with_cost_rows(monkeypatch, tmp_path):
    """The VGG benchmark runs end to end on a VGG of 4 and 8 channels and a classifier of 16 (Linear(392, 16)
    after the 7x7 pool), K-FAC at gnfx's cost_rows and at 1, where the plan bounds the factors
    (figures not asserted)."""
    import functools

    from benchmarks import big_factors
    from benchmarks.models import vgg11_bn

    monkeypatch.setattr(big_factors, "vgg11_bn", functools.partial(vgg11_bn, channels=(4, "M", 8, "M"), hidden=16))
    common = ["--model", "vgg11_bn", "--batch", "2", "--max-factors", "1024", "--cost-rows", "256", "1",
              "--threads", "1", "--out", str(tmp_path)]
    result = big_factors.main([*common, "--rounds", "1", "--plain", "1"])
    assert set(result["rows"]) == {"adamw", "kfac max_factor=1024 cost_rows=256", "kfac max_factor=1024 cost_rows=1"}
    assert "factors in blocks of at most" in result["rows"]["kfac max_factor=1024 cost_rows=1"]["blocks"]
    assert "factors in blocks" not in result["rows"]["kfac max_factor=1024 cost_rows=256"]["blocks"]
    assert (tmp_path / "big_factors_vgg11_bn.md").read_text().count("| kfac max_factor=1024 cost_rows=") == 2
    parts = big_factors.main([*common, "--parts", "--repeats", "1"])
    assert set(parts) == {"kfac max_factor=1024 cost_rows=256", "kfac max_factor=1024 cost_rows=1"}
    assert (tmp_path / "big_factors_vgg11_bn_parts.md").exists()


def test_quadratic_step_time_table_runs_on_the_digits_mlp():
    """The quadratic step's CPU-time table runs end to end (figures not asserted)."""
    from benchmarks import quadratic_step_time

    table = quadratic_step_time.step_table("digits_mlp", quadratic_step_time.WARM + 2)
    for run in ("kfac defaults |", "kfac defaults, quadratic_rows=32 |", "kfac lr=1e-3 |", "AdamW |"):
        assert f"| {run}" in table, table


def test_quadratic_step_time_to_target_table_runs_on_the_autoencoder():
    """The time-to-target table runs end to end within a few steps: a target not reached in them is
    shown as more than the steps taken (figures not asserted)."""
    from benchmarks import quadratic_step_time

    table = quadratic_step_time.target_table("digits_autoencoder", rows=32, steps=10)
    for run in ("AdamW 0.01", "kfac defaults", "ekfac defaults", "kfac defaults, quadratic_rows=32"):
        assert f"| {run} | > 10 | – | > 10 | – |" in table, table


def test_difference_accuracy_measures_the_quotients_of_a_few_steps_and_restores_the_step(capsys):
    """benchmarks.difference_accuracy runs end to end on the autoencoder's first steps (figures not asserted;
    benchmarks/results/quadratic_step.md has them), and leaves the quadratic step's difference_rows as it was."""
    from benchmarks import difference_accuracy
    from gnfx import finite_differences, quadratic_step

    difference_accuracy.main(["--task", "digits_autoencoder", "--steps", "3", "--first", "3"])
    out = capsys.readouterr().out
    assert "call    1 row 0: r" in out and "gnfx     h: median error" in out and "default  h: median error" in out, out
    assert quadratic_step.difference_rows is finite_differences.difference_rows


def test_defaults_fuzz_trains_a_recipe_with_every_variant(capsys):
    """benchmarks.defaults_fuzz runs end to end on one recipe: a row per variant (figures not asserted;
    benchmarks/results/first_contact_19_defaultsfuzz.md has them)."""
    from benchmarks import defaults_fuzz

    defaults_fuzz.main(["--examples", "1", "--steps", "2"])
    out = capsys.readouterr().out
    for name in defaults_fuzz.VARIANTS:
        assert f"\n| {name} | 1 | " in out, out


def test_defaults_fuzz_wide_trains_a_wide_recipe_on_a_teacher_beside_adamw(capsys):
    """benchmarks.defaults_fuzz --wide runs end to end on one recipe of realistic sizes, fresh batches of a
    teacher's data and a held-out loss: a row per variant with its ratio to AdamW's (figures not asserted;
    benchmarks/results/first_contact_20_fuzzwide.md has them)."""
    from benchmarks import defaults_fuzz

    defaults_fuzz.main(["--wide", "--examples", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert "AdamW after" in out and "| below AdamW |" in out, out
    for name in defaults_fuzz.VARIANTS:
        assert f"\n| {name} | 1 | 0 | 0 | " in out, out


def test_example_models_check_runs_on_every_model():
    """benchmarks.example_models trains each example model at kfac's defaults and flags divergence
    (two steps each; the verdicts of the real runs are in benchmarks/results/defaults.md)."""
    from benchmarks import example_models

    for name in example_models.MODELS:
        line = example_models.run(name, "kfac", 2)
        assert line.startswith(name) and "(quadratic) ok: loss" in line, line


def test_before_and_after_runs_a_git_revision_beside_the_working_tree(monkeypatch):
    """benchmarks.ab imports the gnfx of a git revision beside the working tree's, each model stepping
    in its own tree (sys.modules swapped around it, and restored), on a tiny MLP (figures not asserted)."""
    import sys

    import gnfx
    from benchmarks import ab, targets

    monkeypatch.setattr(targets, "SWEEP_WIDTH", 8)
    monkeypatch.setattr(ab, "DIGITS", ([4, 8, 8, 3], 8))
    out = ab.main(["--baseline", "HEAD", "--rounds", "1", "--optimizers", "rank1", "--ratios", "1"])
    assert sys.modules["gnfx"] is gnfx
    assert set(out["operations"]) == {"before", "after"} and out["operations"]["after"]["rank1"] > 0
    for model in ("mlp 8 rows/width 1", "digits-sized mlp"):
        r = out[model]["rank1"]
        assert set(r["whole"]) == {"before", "after", "after / before"} and r["whole"]["after"]["median"] > 0
        assert set(r["page faults per step"]) == {"adamw", "before", "after"}
    tree = ab.load_tree("HEAD")
    assert tree["gnfx"] is not gnfx and tree["gnfx"].__file__ != gnfx.__file__
    with ab.using(tree) as other:
        assert sys.modules["gnfx.codegen"] is tree["gnfx.codegen"] and other is tree["gnfx"]
    assert sys.modules["gnfx.codegen"] is not tree["gnfx.codegen"]


def test_library_models_check_runs_every_model_and_judges_the_runs():
    """benchmarks.library_models trains each look-alike one step at kfac's defaults (one with AdamW),
    and its verdicts flag a stall against AdamW 1e-3 (the real runs: benchmarks/results/library_models.md)."""
    from benchmarks import library_models

    for name in library_models.PROBLEMS:
        run = library_models.train(name, "kfac", 1)
        assert run.status == "ok" and len(run.curve) == 2 and run.last_step["solved"], (name, run.reason)
    assert library_models.train("vit", "adamw_0.001", 1).status == "ok"
    good = library_models.Run("m", "adamw_0.001", curve=[(0, 2.0), (10, 1.0), (20, 0.5)])
    stalled = library_models.Run("m", "kfac", curve=[(0, 2.0), (10, 1.9), (20, 1.8)])
    rows = library_models.verdicts([good, stalled])
    assert [r["verdict"] for r in rows] == ["ok", "stalled"] and rows[0]["target"] == 1.0
    assert [r["steps_to_target"] for r in rows] == [10, None]
    assert "| m | kfac | 2 | 1.8 | 1.8 | stalled | > 20 (1) |" in library_models.table(rows, 20)


def test_torchvision_models_trains_on_upsampled_digits_and_explains_a_missing_torchvision(monkeypatch):
    """benchmarks.torchvision_models without torchvision: its 3x32x32 digits train a model through
    library_models' train (kfac, one step), its held-out loss recomputes BatchNorm's statistics first
    and leaves the module and the random state as they were, and a failed torchvision import exits
    with the advice (install a CPU build, or the two operator schemas that let the CUDA wheel's models
    import)."""
    from torch import nn

    from benchmarks import library_models, torchvision_models

    images = torchvision_models.upsampled_digits(torch.randn(5, 64))
    assert images.shape == (5, 3, 32, 32) and torch.equal(images[:, 0], images[:, 2])
    cnn = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),  # noqa: E731
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    problems = {"cnn": lambda: library_models.digits_problem(cnn, torchvision_models.upsampled_digits, 2)}
    run = library_models.train("cnn", "kfac", 1, problems=problems)
    assert run.status == "ok" and len(run.curve) == 2 and run.last_step["solved"], run.reason

    # the held-out loss with BatchNorm statistics recomputed on 2 batches, against doing it by hand on a
    # copy; the module's running statistics and the random state are left as they were
    problem, model = problems["cnn"](), cnn()
    model[1].running_mean.fill_(3.0)
    reference = copy.deepcopy(model)
    reference[1].reset_running_stats()
    reference[1].momentum = None
    with torch.no_grad():
        for _, (x, _) in zip(range(2), problem.batches(library_models.NORM_SEED)):
            reference(x)
        reference.eval()
        expected = float(torch.nn.functional.cross_entropy(reference(problem.held_out[0]), problem.held_out[1]))
    random_state = torch.get_rng_state()
    assert library_models.held_out_loss(problem, model) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(torch.get_rng_state(), random_state) and model.training
    assert torch.equal(model[1].running_mean, torch.full((4,), 3.0)) and model[1].momentum == 0.1

    def no_torchvision(name):
        raise RuntimeError("operator torchvision::nms does not exist")
    monkeypatch.setattr(torchvision_models.importlib, "import_module", no_torchvision)
    with pytest.raises(SystemExit) as exit_:
        torchvision_models.torchvision_or_exit()
    assert "torchvision::nms does not exist" in str(exit_.value) and "sitecustomize.py" in str(exit_.value)


def test_several_outputs_trains_bert_pretraining_on_its_two_losses_with_a_loss_tuple():
    """benchmarks.several_outputs: BertForPreTraining one step at kfac's defaults with loss= naming both of its
    outputs (the masked-token and next-sentence cross-entropies; its GoogLeNet needs torchvision, which the
    tests do not have), the quadratic step solved; its batches mask two words per sequence."""
    pytest.importorskip("transformers")
    from benchmarks import library_models, several_outputs

    run = library_models.train("bert_pretraining", "kfac", 1, problems=several_outputs.PROBLEMS)
    assert run.status == "ok" and len(run.curve) == 2 and run.last_step["solved"], run.reason
    batch = several_outputs._pretraining_batch(torch.Generator().manual_seed(0), 4)
    assert batch["labels"].ne(-100).sum(1).tolist() == [2] * 4
    assert batch["input_ids"].eq(several_outputs.MASK_ID).sum(1).tolist() == [2] * 4


def test_recurrent_benchmark_runs_kfac_and_adamw_and_times_both_forms():
    """benchmarks.recurrent on a target every run passes at its first evaluation, and its kernel table
    on a tiny recurrent layer (no timing is asserted: only that each form ran)."""
    from benchmarks import recurrent
    task = recurrent.char_gpt()
    for name in ("kfac", "adamw lr=1e-3"):
        steps, fit, _ = recurrent.to_target(task, name, seed=0, target=100.0, max_steps=2, every=1)
        assert steps == 1 and fit < 100.0
    times = recurrent.kernel_times(steps=3, batch=2, width=4, repeats=1)
    assert sorted(times) == sorted((cell, form) for cell in ("LSTM", "GRU")
                                   for form in ("fused", "fused+backward", "lowered", "lowered+backward"))


def test_recurrent_benchmark_trains_an_lstm_with_projections_on_the_delayed_recall_task():
    """benchmarks.recurrent --task recall --proj-size: the synthetic task's targets are its inputs `delay`
    steps back, and kfac and AdamW each reach a target every run passes at its first evaluation."""
    from benchmarks import recurrent
    task = recurrent.DelayedRecall(steps=6, delay=2, batch_size=4)
    x, y = next(task.batches(0))
    assert x.shape == y.shape == (4, 6) and torch.equal(y[:, 2:], x[:, :-2]) and not y[:, :2].any()
    for name in ("kfac", "adamw lr=1e-3"):
        steps, fit, _ = recurrent.to_target(task, name, seed=0, target=100.0, max_steps=2, every=1, proj_size=3)
        assert steps == 1 and fit < 100.0


def test_hf_zoo_runs_a_model_exactly_and_reports_a_training_run():
    """benchmarks.hf_zoo: the compiled model's loss, logits and gradients equal the module's in float64,
    and a run records its route, coverage and losses (the real runs: benchmarks/results/first_contact_5.md)."""
    pytest.importorskip("transformers")
    from benchmarks import hf_zoo
    (differences,) = hf_zoo.exactness("distilbert", steps=1)
    assert max(differences) < 1e-12, differences  # the same float64 operations (0.0 here), in another order at most
    run = hf_zoo.train("distilbert", "kfac", 1, loss="cross_entropy")
    assert run.error is None and run.route == "export" and run.coverage == 100.0 and len(run.losses) == 1
    assert "route export, 100.0% in blocks" in hf_zoo.describe(run)


def test_library_probe_reports_capture_blocks_and_losses_of_a_model(monkeypatch):
    """benchmarks.library_probe without torchvision or timm: `probe` on a stand-in for the library's model
    gives one table row with the capture form, the share in blocks, one loss per step and gnfx's
    warnings; an unknown model name is refused by the command line."""
    from benchmarks import library_probe

    monkeypatch.setattr(library_probe, "build", lambda library, name, size: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)))
    row = library_probe.probe("torchvision", "stand_in", 8, steps=2).split(" | ")
    assert row[0] == "| stand_in" and row[1] == "fx" and row[2] == "100.0%"
    assert len(row[3].split(", ")) == 2 and row[4] == "–"
    done = subprocess.run([sys.executable, "-m", "benchmarks.library_probe", "--library", "timm", "--models", "nope"],
                          capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert done.returncode == 2 and "unknown model 'nope' of timm" in done.stderr


class _MessagePassing(nn.Module):
    """A stand-in for PyG's GCN: a bias-free linear map, its rows summed into each edge's destination, a bias."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.lin, self.bias = nn.Linear(features, classes, bias=False), nn.Parameter(torch.zeros(classes))

    def forward(self, x, edge_index):
        h = self.lin(x)
        return torch.zeros_like(h).index_add_(0, edge_index[1], h[edge_index[0]]) + self.bias


def test_pyg_probe_reports_capture_blocks_exactness_and_losses_of_a_node_classifier(monkeypatch):
    """benchmarks.pyg_probe without torch_geometric: `probe` on a stand-in for a node classifier gives one
    row with the capture form, every parameter in a block, exact loss, gradients and K-FAC factors (float64,
    three graphs) and one loss per step; the AdamW reference row has no capture."""
    from benchmarks import pyg_probe

    monkeypatch.setattr(pyg_probe, "build", lambda name: _MessagePassing(pyg_probe.FEATURES, pyg_probe.CLASSES))
    row = pyg_probe.probe("GCN", "kfac_lr", steps=2).split(" | ")
    assert row[:4] == ["| GCN", "kfac_lr", "fx", "100.0%"] and row[6] == "–"
    loss, grad, factors = (float(v) for v in row[4].split(", "))
    assert loss < 1e-12 and grad < 1e-12 and factors < 1e-12 and len(row[5].split(", ")) == 2
    assert pyg_probe.probe("GCN", "adamw", steps=1).split(" | ")[1:5] == ["adamw", "–", "–", "–"]


class _TwoTowers(nn.Module):
    """A stand-in for open_clip's CLIP: (image features, text features, logit scale) as CLIP returns them."""

    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.logit_scale.exp())


def _clip_problem(name, model, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def clip_loss(m, batch):
        image, text, scale = m(*batch)
        logits, labels = scale * image @ text.T, torch.arange(len(image))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return (torch.randn(8, 6, generator=g, dtype=dtype), torch.randn(8, 5, generator=g, dtype=dtype)), clip_loss


def test_clip_probe_reports_capture_blocks_exactness_losses_and_the_contrastive_error(monkeypatch):
    """benchmarks.clip_probe without open_clip: `probe` on a stand-in for a CLIP gives one row with the capture,
    the share in blocks (the logit scale outside), exact loss and gradients (float64) and a loss per step at
    kfac_lr; with loss='cross_entropy' the row holds gnfx's error for the contrastive loss."""
    from benchmarks import clip_probe

    monkeypatch.setattr(clip_probe, "build", lambda name: _TwoTowers())
    monkeypatch.setattr(clip_probe, "problem", _clip_problem)
    row = clip_probe.probe("clip_vit", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "98.1%"] and row[6].startswith("logit_scale")
    assert all(float(v) < 1e-12 for v in row[4].split(", ")) and len(row[5].split(", ")) == 2 and row[8] == "–"
    row = clip_probe.probe("clip_vit", "kfac_ce", steps=1).split(" | ")
    assert row[5] == "–" and row[8].startswith("GnfxError: loss='cross_entropy'")


def _table_problem(name, step=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
    return (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1])


def test_tabts_probe_reports_capture_blocks_exactness_against_hooks_and_losses(monkeypatch):
    """benchmarks.tabts_probe without rtdl: `probe` on a stand-in for rtdl's MLP gives one row with the capture,
    every parameter in blocks, exact loss and gradients and K-FAC's A and S against hooks (float64, S at M = the
    16 examples) and a loss per step at kfac_lr; AdamW's row has no capture."""
    from benchmarks import tabts_probe

    monkeypatch.setattr(tabts_probe, "build", lambda name: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)))
    monkeypatch.setattr(tabts_probe, "problem", _table_problem)
    row = tabts_probe.probe("rtdl_mlp", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "100.0%"] and row[8] == "–"
    gaps, factors = row[4].split("; ")
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and factors.endswith("(M 16, 2 Linear)")
    assert all(float(v.split()[1]) < 1e-12 for v in factors.split(" (")[0].split(", ")) and len(row[5].split(", ")) == 2
    row = tabts_probe.probe("rtdl_mlp", "adamw", steps=1).split(" | ")
    assert row[1:5] == ["adamw (lr=0.001)", "–", "–", "–"]


class _EulerClassifier(nn.Module):
    """A stand-in for a neural ODE classifier: head(y(1)), y(0) = enc(x), y(1) by 4 Euler steps of the field f
    (called 4 times per forward, as a solver calls it)."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.f = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))

    def forward(self, x):
        y = self.enc(x)
        for _ in range(4):
            y = y + self.f(y) / 4
        return self.head(y)


def _node_problem(name, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(16, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
    return batch, lambda m, b, plain: F.cross_entropy(m(b[0]), b[1]), 16


def test_sciml_probe_reports_capture_blocks_exact_factors_and_losses_of_an_ode_classifier(monkeypatch):
    """benchmarks.sciml_probe without torchdiffeq: `probe` on a stand-in for a neural ODE classifier (its field
    called at every solver step) gives one row with the capture, every parameter in a block, exact loss, gradients
    and K-FAC factors of its 4 linear blocks against hooks on every call, and a loss per step."""
    from benchmarks import sciml_probe

    monkeypatch.setattr(sciml_probe, "build", lambda name: _EulerClassifier())
    monkeypatch.setattr(sciml_probe, "problem", _node_problem)
    row = sciml_probe.probe("node_rk4", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "100.0%"] and row[8] == "–"
    gaps, factors = row[4].split("; ")
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and len(row[5].split(", ")) == 2
    assert factors.startswith("A, S of 4 linear blocks") and float(factors.split()[-1]) < 1e-12


class _MAE:
    """A stand-in for neuralforecast's MAE: domain_map, is_distribution_output and its call (y, y_hat, mask)."""

    is_distribution_output = False

    @staticmethod
    def domain_map(y_hat):
        return y_hat

    def __call__(self, y, y_hat, y_insample, mask):
        return ((y - y_hat).abs() * mask).sum() / mask.sum()


class _WindowForecaster(nn.Module):
    """A stand-in for neuralforecast's MLP: forward(windows_batch) of insample_y (W, L, 1) to a forecast (W, h, 1)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.loss = _MAE()

    def forward(self, windows_batch):
        return self.mlp(windows_batch["insample_y"].squeeze(-1)).unsqueeze(-1)


def test_fcast_probe_reports_exact_factors_and_names_an_mae_under_loss_mse(monkeypatch):
    """benchmarks.fcast_probe without neuralforecast: `probe` on a stand-in window forecaster trained as
    neuralforecast's training_step does (the model on the windows batch, its loss's domain_map and call) gives
    a row with the capture, every parameter in a block, exact loss, gradients and K-FAC factors (S at M = the
    64 rows of the (16, 4, 1) forecast); under loss='mse' the MAE is named as piecewise linear."""
    from benchmarks import fcast_probe

    monkeypatch.setattr(fcast_probe, "build", lambda name: _WindowForecaster())
    row = fcast_probe.probe("mlp", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "100.0%"] and row[8] == "–", row
    gaps, factors = row[4].split("; ")
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and factors.endswith("(M 64, 2 Linear)")
    assert all(float(v.split()[1]) < 1e-12 for v in factors.split(" (")[0].split(", ")) and len(row[5].split(", ")) == 2
    row = fcast_probe.probe("mlp", "kfac_mse", steps=2).split(" | ")
    assert "piecewise-linear" in row[7] or "two magnitudes" in row[7], row


class _TinyLM(nn.Module):
    """A stand-in for litgpt's GPT: token embeddings, a tanh MLP block with a residual, an lm_head, (B, T, V) logits."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.wte, self.fc, self.proj = nn.Embedding(vocab, width), nn.Linear(width, 16), nn.Linear(16, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        h = self.wte(idx)
        return self.lm_head(h + self.proj(torch.tanh(self.fc(h))))


def _lm_problem(name):
    tokens = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    loss = lambda m, b: F.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())  # noqa: E731
    return (tokens[:, :-1], tokens[:, 1:]), loss, 15


def test_llm_probe_reports_capture_blocks_exact_factors_and_losses_of_a_language_model(monkeypatch):
    """benchmarks.llm_probe without litgpt: `probe` on a stand-in for a GPT trained on next-token cross-entropy
    gives one row with the capture, every parameter in a block, exact loss and gradients and K-FAC's A and S of its
    three linear blocks against hooks (float64, S at M = the 15 tokens), and a loss per step; AdamW's row has no
    capture."""
    from benchmarks import llm_probe

    monkeypatch.setattr(llm_probe, "build", lambda name: _TinyLM())
    monkeypatch.setattr(llm_probe, "problem", _lm_problem)
    row = llm_probe.probe("llama", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "100.0%"] and row[8] == "–"
    gaps, factors = row[4].split("; ")
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and len(row[5].split(", ")) == 2
    assert factors.startswith("A, S of 3 linear blocks") and float(factors.split()[-1]) < 1e-12
    assert llm_probe.probe("llama", "adamw", steps=1).split(" | ")[1:5] == ["adamw (lr=0.001)", "–", "–", "–"]


class _VolumeSegmenter(nn.Module):
    """A stand-in for MONAI's 3-D UNets: a convolution of one input channel and a kernel of 11³ (A of 1332
    entries: blocked), a strided and a dilated one, a transposed one back up to (N, 3, D, H, W) logits."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv3d(1, 4, 11, padding=5)
        self.down = nn.Conv3d(4, 6, 3, stride=2, padding=1)
        self.dilated = nn.Conv3d(6, 6, 3, padding=2, dilation=2, bias=False)
        self.up = nn.ConvTranspose3d(6, 3, 2, stride=2)

    def forward(self, x):
        return self.up(torch.relu(self.dilated(torch.relu(self.down(torch.relu(self.wide(x)))))))


def test_medseg_probe_reports_exact_factors_of_strided_dilated_and_blocked_3d_convolutions(monkeypatch):
    """benchmarks.medseg_probe without MONAI: `probe` on a stand-in for a 3-D segmentation model trained with a
    voxel-wise cross-entropy gives one row with the capture form, every parameter in a block, exact loss,
    gradients and K-FAC factors of its three convolutions (its unfolded patches against gnfx's statistics, the
    blocked A as its diagonal blocks) and one loss per step; the AdamW reference row has no capture."""
    from benchmarks import medseg_probe

    monkeypatch.setitem(medseg_probe.MODELS, "stand_in", medseg_probe.Case(
        _VolumeSegmenter, medseg_probe.masked((2, 1, 8, 8, 8)), F.cross_entropy, "cross_entropy"))
    row = medseg_probe.probe("stand_in", "kfac", steps=2).split(" | ")
    assert row[:4] == ["| stand_in", "kfac", "fx", "100.0%"] and row[6] == "–"
    loss, grad, factors = (float(v) for v in row[4].removesuffix(" (3)").split(", "))
    assert row[4].endswith(" (3)") and loss < 1e-12 and grad < 1e-12 and factors < 1e-12
    assert len(row[5].split(", ")) == 2
    assert medseg_probe.probe("stand_in", "adamw", steps=1).split(" | ")[1:5] == ["adamw", "–", "–", "–"]


class _HfDetector(nn.Module):
    """A stand-in for a Hugging Face detector: a frozen backbone, labels passed in, the loss computed inside
    and returned first in a dict with the logits (N, queries, classes + 1) and the boxes."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head, self.boxes = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.backbone.requires_grad_(False)

    def forward(self, features, labels):
        h = torch.tanh(self.backbone(features))
        logits, boxes = self.head(h), self.boxes(h).sigmoid()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + (boxes - 0.5).abs().mean()
        return {"loss": loss, "logits": logits, "pred_boxes": boxes}


def test_hfvision_probe_reports_exact_factors_with_a_frozen_part_and_the_models_own_loss(monkeypatch):
    """benchmarks.hfvision_probe without its libraries: `probe` on a stand-in for a detector whose loss is inside
    and whose backbone is frozen gives one row with the capture form, every trainable parameter in a block,
    exact loss, gradients and A, S of its two trained linear layers against hooks, and one loss per step; the
    AdamW reference row has no capture."""
    from benchmarks import hfvision_probe

    def batch(g, dtype):
        return dict(features=torch.randn(2, 3, 6, generator=g, dtype=dtype), labels=torch.randint(0, 4, (2, 3), generator=g))

    monkeypatch.setitem(hfvision_probe.MODELS, "stand_in", hfvision_probe.Case(
        _HfDetector, batch, hfvision_probe.model_loss, "model(features, labels)['loss']"))
    row = hfvision_probe.probe("stand_in", "exact", steps=2).split(" | ")
    assert row[:4] == ["| stand_in", "exact", "fx", "100.0%"] and row[5] == "–"
    gaps, factors = row[4].split("; ")
    assert gaps == "loss 0e+00, gradients 0e+00" and factors.endswith("of 2 linear blocks")
    a_gap, s_gap = (float(v.split(" ")[-1]) for v in factors.removesuffix(" of 2 linear blocks").split(", "))
    assert a_gap < 1e-12 and s_gap < 1e-12
    row = hfvision_probe.probe("stand_in", "kfac", steps=2).split(" | ")
    assert row[1:4] == ["kfac", "fx", "100.0%"] and len(row[4].split(", ")) == 2
    assert hfvision_probe.probe("stand_in", "adamw", steps=1).split(" | ")[1:4] == ["adamw", "–", "–"]


class _Segmenter(nn.Module):
    """A stand-in for torchvision's segmentation models: a dict of (N, C, H, W) logits, "out" and "aux"."""

    def __init__(self, classes: int):
        super().__init__()
        self.out, self.aux = nn.Conv2d(3, classes, 3, padding=1), nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return {"out": self.out(x), "aux": self.aux(x)}


class _Flow(nn.Module):
    """A stand-in for RAFT: two images in, the list of the flow's refinements out."""

    def __init__(self):
        super().__init__()
        self.encode, self.update = nn.Conv2d(6, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, image1, image2):
        flow = self.encode(torch.cat((image1, image2), 1))
        flows = [flow]
        for _ in range(2):
            flow = flow + self.update(flow)
            flows.append(flow)
        return flows


def test_family_probe_reports_each_family_called_as_its_users_call_it(monkeypatch):
    """benchmarks.family_probe without torchvision: `probe` on stand-ins for a segmentation model (a dict,
    the main and auxiliary heads' cross-entropy, no loss=) and RAFT (two images, a list of flows, the
    sequence loss) gives one row each, for a gnfx optimizer and for the AdamW reference."""
    from benchmarks import child_rows, family_probe

    monkeypatch.setitem(family_probe.MODELS, "segmenter", ("segmentation", (2, 3, 8, 8), {}))
    monkeypatch.setitem(family_probe.MODELS, "flow", ("optical_flow", (2, 3, 8, 8), {}))
    monkeypatch.setattr(family_probe, "build", lambda name, qat: _Segmenter(family_probe.CLASSES)
                        if name == "segmenter" else _Flow())
    for name in ("segmenter", "flow"):
        row = family_probe.probe(name, "kfac", steps=2).split(" | ")
        assert row[:4] == [f"| {name}", "kfac", "fx", "100.0%"] and len(row[4].split(", ")) == 2 and row[5] == "–"
        assert family_probe.probe(name, "adamw", steps=1).split(" | ")[1:4] == ["adamw", "–", "–"]
    flows = [torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1)]  # |flow - 1|: 1 and 0, weights 0.8 and 1
    assert family_probe.sequence_loss(flows, torch.ones(1, 2, 1, 1)).item() == pytest.approx(0.8)
    stderr = "Traceback ...\ngnfx.errors.GnfxError: the step failed: NotImplementedError: no jvp\nPlease file an issue"
    assert child_rows.raised(stderr) == "gnfx.errors.GnfxError: the step failed: NotImplementedError: no jvp"


def test_task_probe_runs_a_gan_and_maml_and_reports_the_error_of_a_second_head():
    """benchmarks.task_probe: a row per task and optimizer, with the losses of each step (D's / G's for a
    GAN), or the GnfxError of a loss that reaches a second output under loss=."""
    from benchmarks import task_probe

    row = task_probe.probe("gan", "kfac", steps=2).split(" | ")
    assert row[:2] == ["| gan", "kfac"] and len(row[2].split(", ")) == 2 and "/" in row[2]
    assert task_probe.probe("maml", "shampoo", steps=2).split(" | ")[3] == "–"
    with pytest.raises(GnfxError, match="output 1"):
        task_probe.probe("actor_critic", "kfac_loss", steps=1)



def test_a_probes_command_line_writes_a_row_per_pair_from_child_processes(tmp_path):
    """benchmarks.child_rows.probe_main, task_probe's command line: `--tasks gan distill --optimizers kfac`
    runs each pair in a child process and writes the table's two header lines and a row per pair, in order."""
    out = tmp_path / "table.md"
    subprocess.run([sys.executable, "-m", "benchmarks.task_probe", "--tasks", "gan", "distill", "--optimizers",
                    "kfac", "--steps", "1", "--out", str(out)], check=True, capture_output=True, timeout=300,
                   cwd=pathlib.Path(__file__).parent.parent)
    rows = out.read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("| task | optimizer")
    assert [row.split(" | ")[:2] for row in rows[2:]] == [["| gan", "kfac"], ["| distill", "kfac"]]

class _Detector(nn.Module):
    """A stand-in for torchvision's detection models: a list of images and of targets in, a dict of losses
    out; its forward iterates over the targets (torch.fx cannot) and branches on a float (torch.export cannot)."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Conv2d(3, 4, 3, stride=4), nn.Linear(4, 4)

    def forward(self, images, targets):
        boxes = torch.stack([target["boxes"].mean(0) for target in targets])
        pred = self.head(self.backbone(torch.stack(images)).mean((2, 3)))
        scale = 2.0 if pred.mean() > 0 else 1.0
        return {"box": scale * (pred - boxes / 128).square().mean(), "size": pred.abs().mean()}


def test_detection_probe_reports_a_model_whose_forward_runs_eagerly(monkeypatch):
    """benchmarks.detection_probe without torchvision: `probe` on a stand-in gives its row: captured "eager"
    (passes/opaque_root.py), every parameter in a block, one loss per step, gnfx's warning saying why."""
    from benchmarks import detection_probe

    monkeypatch.setattr(detection_probe, "build", lambda name: _Detector())
    row = detection_probe.probe("detector", steps=2).split(" | ")
    assert row[:3] == ["| detector", "eager", "100.0% (2 blocks, 0 fallback)"] and len(row[3].split(", ")) == 2
    assert row[4].startswith("gnfx: neither torch.fx nor torch.export captured the forward of _Detector")


def test_lockstep_gaps_are_zero_beside_the_module_and_not_beside_another():
    """benchmarks.lockstep: kfac on a float64 MLP with dropout, stepped beside a copy of its module, has loss and
    gradient gaps of zero (the same dropout masks, the copy taking the compiled model's parameters after each
    step); beside a copy whose parameters differ, both gaps are not."""
    from benchmarks.lockstep import lockstep_gaps
    import gnfx

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for shift, exact in ((0.0, True), (0.1, False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
        reference = copy.deepcopy(model)
        with torch.no_grad():
            reference[0].weight.add_(shift)
        c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1)
        gaps = lockstep_gaps(c, model, reference, lambda m, _: F.cross_entropy(m(x), y), 3, seed=5)
        assert (max(gaps) == 0.0) == exact and (exact or min(gaps) > 0), gaps



def test_float64_gaps_builds_the_twins_alike_where_the_build_draws_with_python_random():
    """benchmarks.lockstep.float64_gaps: a build that draws with Python's `random` (hyper-connections picks each
    layer's residual stream with `random.randrange`) gives the reference the compiled model's parameters, so
    both gaps are zero; unseeded, the two builds differed and so did the losses and gradients."""
    import random

    from benchmarks.lockstep import float64_gaps

    class Drawn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.tensor(random.random()))

        def forward(self, x):
            return self.fc(x) * self.scale

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    cell = float64_gaps(Drawn, lambda _: (lambda m: F.cross_entropy(m(x), y)), "kfac", {"lr": 1e-2})
    assert cell == "0e+00, 0e+00", cell

class _Corridor:
    """A stand-in for benchmarks.rl_probe.Envs without gymnasium: `n` corridors of 4 observations and 2
    actions whose episodes end after 10 steps, a reward of 1 per step."""

    class _Actions:
        def sample(self):
            return 0

    def __init__(self, name, n, seed):
        self.obs, self.t, self.returns, self.single_action_space = torch.zeros(n, 4).numpy(), 0, [], self._Actions()

    def step(self, actions):
        self.t += 1
        done = float(self.t % 10 == 0)
        if done:
            self.returns += [10.0] * len(actions)
        n = len(actions)
        self.obs = torch.randn(n, 4).numpy()
        return self.obs, torch.ones(n).numpy(), torch.full((n,), done).numpy()

    def chunk_return(self):
        done, self.returns = self.returns, []
        return sum(done) / len(done) if done else float("nan")


def test_rl_probe_reports_capture_blocks_exactness_and_returns_of_cleanrls_ppo(monkeypatch):
    """benchmarks.rl_probe without gymnasium: CleanRL's PPO agent (no forward, trained through methods=) on a
    stand-in environment gives a row with the eager capture, every parameter in blocks, A, S and gradients
    equal to plain hooks' (float64) and a return and loss per chunk; DQN's and SAC's exactness too."""
    from benchmarks import rl_probe

    monkeypatch.setattr(rl_probe, "Envs", _Corridor)
    row = rl_probe.probe("ppo", "kfac_lr", steps=1).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.0003)", "eager", "100.0%"] and row[5] == "10" and row[8] == "–"
    assert all(float(v) < 1e-12 for v in row[4].split(", "))
    for name in ("dqn", "sac"):
        assert all(float(v) < 1e-12 for v in rl_probe.exactness(name, {"lr": 3e-4}).split(", ")), name


class _LossReturningLM(nn.Module):
    """A stand-in for nGPT's `model(x, return_loss=True)`: an embedding, a linear head, the loss returned."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

    def forward(self, x, return_loss=False):
        logits = self.head(torch.tanh(self.emb(x[:, :-1])))
        return F.cross_entropy(logits.transpose(1, 2), x[:, 1:]) if return_loss else logits


def test_lucid_probe_reports_m_and_exact_factors_of_a_model_returning_its_loss(monkeypatch):
    """benchmarks.lucid_probe without nGPT-pytorch: `probe` on a stand-in returning its own loss gives one row
    with the capture, every parameter in a block, exact loss and gradients, M = N (the 3 sequences: a returned
    loss has no token dimension), the linear block's factors against hooks, and a loss per step."""
    from benchmarks import lucid_probe

    monkeypatch.setattr(lucid_probe, "build", lambda name: _LossReturningLM())
    monkeypatch.setattr(lucid_probe, "problem", lambda name, dtype=torch.float32: (
        torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1)),
        lambda m, b: m(b, return_loss=True)))
    row = lucid_probe.probe("ngpt", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "100.0%"] and row[8] == "–"
    gaps, m, factors = row[4].split("; ")
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and len(row[5].split(", ")) == 2
    assert m == "M = 3" and factors.startswith("A, S of 1 linear blocks") and float(factors.split()[-1]) < 1e-12


def test_wide_table_runs_and_prices_shampoo_on_a_table_by_its_diagonal_side():
    """The large-table benchmark runs end to end on a table of 300 rows, where diagonal_above=100 keeps
    Shampoo's factor over its rows diagonal and diagonal_above=0 cuts them into blocks of max_block=64
    (figures not asserted, but the state each holds: model.cost())."""
    from benchmarks import wide_table

    result = wide_table.main(["--rows", "300", "--dim", "4", "--columns", "2", "--hidden", "8", "--batch", "16",
                              "--steps", "2", "--rounds", "1", "--optimizers", "shampoo:diagonal_above=100,max_block=64",
                              "shampoo:diagonal_above=0,max_block=64"])
    assert set(result) == {"adamw", "shampoo:diagonal_above=100,max_block=64", "shampoo:diagonal_above=0,max_block=64"}
    diagonal, blocked = (result[f"shampoo:diagonal_above={w},max_block=64"]["state_bytes"] for w in (100, 0))
    # float32 factor and root over the rows: 300 entries each against 5 blocks of 60² each; and 4 more pieces
    # with their own 4 x 4 factor and root, failure counter (int64) and graft scalar (float32)
    assert blocked - diagonal == 4 * 2 * (5 * 60 ** 2 - 300) + 4 * (4 * 2 * 4 ** 2 + 8 + 4)


class _ScalarLoss(nn.Module):
    """A stand-in for a normflows flow in a module returning its forward_kld: the mean of a per-example term, a
    0-dimensional output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        return (self.net(x) ** 2).sum(1).mean()


def test_gen_probe_reports_capture_blocks_exactness_against_hooks_and_losses(monkeypatch):
    """benchmarks.gen_probe without normflows: `probe` on a stand-in for a flow returning its loss gives one row with
    the capture, every parameter in blocks, exact loss and gradients and A and S against hooks (float64, S at M = the
    examples N of a scalar output) and a loss per step; AdamW's row has no capture."""
    from benchmarks import gen_probe

    monkeypatch.setattr(gen_probe, "build", lambda name: _ScalarLoss())
    monkeypatch.setattr(gen_probe, "problem", lambda name: (
        torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.get_default_dtype()),
        lambda m, b: m(b), 16))
    row = gen_probe.probe("nf_realnvp", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "100.0%"] and row[8] == "–"
    gaps, factors = row[4].split("; ")
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and factors.startswith("A, S of 2 linear blocks")
    assert float(factors.split()[-1]) < 1e-12 and len(row[5].split(", ")) == 2
    row = gen_probe.probe("nf_realnvp", "adamw", steps=1).split(" | ")
    assert row[1:5] == ["adamw (lr=0.001)", "–", "–", "–"]


class _CausalLMOutput(NamedTuple):
    logits: torch.Tensor


class _TinyCausalLM(nn.Module):
    """A stand-in for a Hugging Face causal LM: `model(input_ids=ids).logits`."""

    def __init__(self):
        super().__init__()
        self.embed, self.hidden, self.head = nn.Embedding(64, 8), nn.Linear(8, 8), nn.Linear(8, 64)

    def forward(self, input_ids):
        return _CausalLMOutput(self.head(torch.tanh(self.hidden(self.embed(input_ids)))))


def test_prefs_probe_reports_dpo_exactness_against_hooks_and_refuses_cross_entropy(monkeypatch):
    """benchmarks.prefs_probe without transformers' Llama or trl: `probe` on a stand-in causal LM under DPO's loss
    (a frozen reference copy) gives one row with exact loss, gradients, A and S (S = M Σ g gᵀ, M the 48 completion
    rows) at kfac_lr, and with loss='cross_entropy' gnfx's error for a loss that lowers log-probabilities."""
    from benchmarks import prefs_probe

    monkeypatch.setattr(prefs_probe, "build", lambda name: _TinyCausalLM())
    row = prefs_probe.probe("dpo", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "100.0%"] and row[8] == "–", row
    gaps, hooks = row[4].split("; ", 1)
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and "S = 48 Σggᵀ" in hooks and "rows reached 48" in hooks
    row = prefs_probe.probe("dpo", "kfac_ce", steps=1).split(" | ")
    assert row[5] == "–" and "lowers the log-probability" in row[8]


def test_embedding_family_rows_judge_a_block_a_fallback_and_an_error():
    """benchmarks/embedding_family.py: a max_norm table is a block whose steps equal the loop-renormalized
    reference's, a bag a fallback whose gradient is eager's, a functional sparse lookup refused at the step."""
    from benchmarks.embedding_family import row

    assert "| 100.0% | ✓ |" in row("nn.Embedding(max_norm=1)", "kfac", False, "export", 2)
    assert "| 34.9% | grad ✓ |" in row("EmbeddingBag(sum)", "rank1", True, "fx", 1)
    assert "ConfigError: the gradient of 'table' is a sparse tensor" in row(
        "F.embedding(ids, Parameter, sparse=True)", "kfac", True, "fx", 1)


def test_trace_semantics_rows_give_the_form_the_coverage_and_the_gaps_to_the_model():
    """benchmarks/trace_semantics.py: a forward testing isinstance(mask, torch.Tensor) is captured by torch.export
    and trains the model's function (no gap); a GRU's tuple read under isinstance stays a torch.fx graph."""
    from benchmarks.trace_semantics import row

    masked = row("isinstance(mask, torch.Tensor)")
    assert masked.startswith("| isinstance(mask, torch.Tensor) | export | 100.0% | 0.0e+00 |"), masked
    assert row("GRU, isinstance(out, tuple)").startswith("| GRU, isinstance(out, tuple) | fx | 100.0% | 0.0e+00 |")


def test_points_probe_reports_exact_factors_recomputed_indices_and_steps_to_target():
    """benchmarks.points_probe on DGCNN's reference code (plain torch, no library): the kfac row has the capture form,
    every parameter in a block, its k=1 convolutions' and Linears' A and S equal to plain hooks' and its outputs on
    batches of other sizes (other kNN indices) equal to the module's; the AdamW row names its three lrs."""
    from benchmarks import points_probe

    row = points_probe.probe("dgcnn", "kfac", steps=2).split(" | ")
    assert row[:4] == ["| dgcnn", "kfac (defaults)", "fx", "100.0%"] and row[8] == "–"
    factors, outputs = row[4].split("; ")
    assert factors.startswith("A, S of 8 blocks") and float(factors.split()[-1]) < 1e-12
    assert float(outputs.split()[-1]) == 0.0
    assert row[5] == "–"  # no target within 2 steps
    adamw = points_probe.probe("dgcnn", "adamw", steps=1).split(" | ")
    assert adamw[1] == "adamw (lr 0.001: –; lr 0.003: –; lr 0.01: –)" and adamw[2:5] == ["–", "–", "–"]


def test_families_probe_rows_say_the_capture_and_coverage_or_the_refusal():
    """benchmarks.families_probe: FiLM and RetNet's retention are captured whole by torch.fx with every parameter in
    a block and train; a complex parameter's row is the compile's refusal naming it; AdamW's row has no capture."""
    from benchmarks import families_probe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        film, retnet, complex_ = (families_probe.run(m, 2, ["kfac"]) for m in ("film", "retnet", "complex_matmul"))
    for rows, blocks in ((film, "8 curvature blocks"), (retnet, "23 curvature blocks")):
        adamw, kfac = (row.split(" | ") for row in rows)
        assert adamw[1:] == ["adamw", adamw[2], "–", "– |"]
        before, after = map(float, kfac[2].split(" → "))
        assert after < before and kfac[3] == f"{blocks}, graph captured with fx (it traced the whole forward)"
        assert kfac[4].endswith("(100.0%); fallback: 0 |")
    assert complex_[1].split(" | ")[3].startswith("ConfigError: 'W' is a complex parameter (torch.complex64)")
