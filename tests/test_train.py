"""The training engine in-process on tiny models: it learns, every preset runs, resume is exact,
and faults (non-finite loss, corrupt images, truncated checkpoints) are handled."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_utils import (FAST, TINY_LITV2, assert_same_tensors, compose, load_state, metrics_rows,
                          make_digits_subset, train_in_process)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def test_quickstart_short_learns_and_reports(digits, tmp_path, monkeypatch):
    """A 2-epoch quickstart: loss falls, val top-1 far above chance and equal to an independent count."""
    run = tmp_path / "run"
    summary = train_in_process(["experiment=quickstart", f"data.root={digits}", "trainer.epochs=2",
                                "data.num_workers=0", "logger.wandb.mode=offline", "profile.batch_size=2",
                                "profile.runs=1", "profile.warmup=0", "trainer.log_every=5"], run)
    losses = [r["train/loss"] for r in metrics_rows(run, "train/loss")]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert summary["final_top1"] > 60.0  # chance is 10 %
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("final_top1", "final_top5", "best_top1", "best_top5", "params", "gflops", "throughput",
                "epochs", "wall_time_s"):
        assert on_disk[key] is not None, key
    assert on_disk["epochs"] == 2 and on_disk["params"] > 0
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    resolved = (run / "config.yaml").read_text()
    assert "${" not in resolved and "quickstart" in resolved

    # independent accuracy: our own decoding + normalisation, the weights from last.pth
    import timm

    import litv2  # noqa: F401

    cfg_model = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], alpha=0.5, local_ws=[0, 0, 2, 1])
    model = timm.create_model("litv2_s", num_classes=10, img_size=32, **cfg_model).eval()
    model.load_state_dict(load_state(run / "last.pth")["model"])
    files = sorted((digits / "val").glob("*/*.png"))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files]))
    x = (x.permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
    y = torch.tensor([int(f.parent.name) for f in files])
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert 100.0 * correct / len(files) == pytest.approx(summary["final_top1"], abs=1e-9)

    # eval of our own checkpoint: model and data settings come from the run's saved config
    from litv2.engine import run_eval

    result = run_eval(compose([f"checkpoint={run / 'last.pth'}", "profile.enabled=false", "data.num_workers=0"],
                              config="eval"))
    assert result["top1"] == summary["final_top1"] and result["images"] == 360

    # eval.py honours trainer.channels_last and trainer.compile (it ignored both before)
    seen = []

    def fake_compile(model, **kwargs):  # records and returns the model: compiled numerics are tested elsewhere
        model.register_forward_pre_hook(lambda mod, inputs: seen.append(
            (inputs[0].is_contiguous(memory_format=torch.channels_last),
             mod.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last))))
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = run_eval(compose([f"checkpoint={run / 'last.pth'}", "profile.enabled=false", "data.num_workers=0",
                               "trainer.channels_last=true", "trainer.compile=true"], config="eval"))
    assert seen[0] == {"dynamic": False} and set(seen[1:]) == {(True, True)}
    assert result["top1"] == summary["final_top1"] and result["images"] == 360


@pytest.mark.parametrize("experiment", ["litv2_s_in1k", "litv2_m_in1k", "litv2_b_in1k", "litv2_b_384_ft", "quickstart"])
def test_every_experiment_preset_runs_a_step(experiment, digits, tmp_path):
    """The full preset (augmentation, Mixup, AMP, offset-LR groups) on tiny inputs, tiny width."""
    summary = train_in_process([f"experiment={experiment}", "data=digits", f"data.root={digits}", "data.img_size=32",
                                "data.batch_size=8", "trainer.max_steps=2", "trainer.precision=fp32", *TINY_LITV2,
                                *FAST], tmp_path)
    assert summary["steps"] == 2 and summary["final_top1"] is not None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_accumulation_train(precision, digits, tmp_path):
    """autocast (+ GradScaler for fp16), gradient accumulation, channels-last, on a timm model."""
    summary = train_in_process(["data=digits", "aug=none", "model=timm", "model.name=resnet10t", f"data.root={digits}",
                                f"trainer.precision={precision}", "trainer.accum_steps=2", "data.batch_size=8",
                                "trainer.channels_last=true",
                                "trainer.max_steps=3", *FAST], tmp_path)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    state = load_state(tmp_path / "last.pth")
    assert (state["scaler"] != {}) == (precision == "fp16")


def test_compiled_training_matches_eager_and_saves_a_plain_state_dict(digits, tmp_path, monkeypatch):
    """trainer.compile=true: the model torch.compile captures (forward and backward, through AOTAutograd) trains the
    same steps as eager, and the checkpoint holds the same parameter names as an eager run's (no ``_orig_mod.``).
    AOTAutograd's eager backend stands in for inductor, whose C++ kernels take minutes to build on 2 cores
    (inductor on LITv2: test_models.py's ``inductor`` test, tests/test_gpu.py)."""
    common = ["data=digits", "aug=none", f"data.root={digits}", "data.img_size=32", "data.batch_size=8",
              "trainer.max_steps=2", "trainer.precision=fp32", "trainer.ema.enabled=false", *TINY_LITV2,
              "++model.depths=[1,1,1,1]", *FAST]
    compile_, compiled = torch.compile, []
    # Static shapes: after Dynamo has seen LITv2's forward at another image size (as after evaluating at another
    # resolution in the same process) a default torch.compile traces symbolic sizes, which inductor fails to lower
    # for LITv2 ("cannot determine truth value of Relational").
    monkeypatch.setattr(torch, "compile",
                        lambda model, *a, **k: compiled.append(k) or compile_(model, *a, **k, backend="aot_eager"))
    train_in_process([*common, "trainer.compile=false"], tmp_path / "eager")
    assert not compiled
    summary = train_in_process([*common, "trainer.compile=true"], tmp_path / "compiled")
    assert summary["steps"] == 2 and compiled == [{"dynamic": False}]
    eager, compiled = load_state(tmp_path / "eager" / "last.pth"), load_state(tmp_path / "compiled" / "last.pth")
    assert list(compiled["model"]) == list(eager["model"])
    for name, value in eager["model"].items():  # two AdamW steps from the same start: same weights
        torch.testing.assert_close(compiled["model"][name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_litv2_trains_under_cpu_bf16_autocast(digits, tmp_path):
    """LITv2 under bf16 autocast: the DTM's deformable conv runs in fp32 inside it, the rest in bf16."""
    summary = train_in_process(["data=digits", "aug=none", f"data.root={digits}", "data.img_size=32",
                                "data.batch_size=8", "trainer.max_steps=2", "trainer.precision=bf16", *TINY_LITV2,
                                *FAST], tmp_path)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    state = load_state(tmp_path / "last.pth")["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_litv2_s_full_size_on_synthetic_data(tmp_path):
    """issue 3: `train.py model=litv2_s hilo.alpha=0.9 data=synthetic trainer.max_steps=2` end to end."""
    summary = train_in_process(["model=litv2_s", "hilo.alpha=0.9", "data=synthetic", "trainer.max_steps=2",
                                "data.img_size=64", "data.batch_size=2", "data.train_size=8", "data.val_size=2",
                                *FAST], tmp_path)
    assert summary["steps"] == 2 and summary["model"] == "litv2_s"


def test_offset_convs_get_their_own_lr_and_no_decay_on_1d_params():
    from litv2.engine.builders import build_model, build_optimizer, build_scheduler

    cfg = compose(["data=digits", *TINY_LITV2])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model, world_size=1)
    names = {id(p): n for n, p in model.named_parameters()}
    offset_groups = [g for g in opt.param_groups if g.get("lr_scale") == 0.01]
    assert offset_groups and all("conv_offset" in names[id(p)] for g in offset_groups for p in g["params"])
    for g in opt.param_groups:
        for p in g["params"]:
            if p.ndim <= 1:
                assert g["weight_decay"] == 0.0, names[id(p)]
    sched = build_scheduler(cfg, opt, steps_per_epoch=10, world_size=1)
    sched.step_update(5)
    base = [g for g in opt.param_groups if "lr_scale" not in g][0]["lr"]
    assert offset_groups[0]["lr"] == pytest.approx(0.01 * base)


RESUME = ["experiment=quickstart", "aug=deit", "trainer.ema.enabled=true", "trainer.ema.decay=0.9",
          "model.drop_path_rate=0.1", "data.batch_size=16", "trainer.deterministic=true", "trainer.log_every=1", *FAST]


def test_resume_2_plus_2_equals_4_bitwise(digits, tmp_path):
    """Mid-epoch resume restores weights, optimizer, EMA, LR, sampler position and every RNG; a run leaves the
    caller's determinism setting (here warn-only) as it found it."""
    base = [*RESUME, f"data.root={digits}"]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train_in_process(base + ["trainer.max_steps=4"], tmp_path / "straight")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    train_in_process(base + ["trainer.max_steps=2"], tmp_path / "first")
    assert not torch.are_deterministic_algorithms_enabled()  # the run's trainer.deterministic=true is undone
    train_in_process(base + ["trainer.max_steps=4", f"trainer.resume={tmp_path / 'first' / 'last.pth'}"],
                     tmp_path / "second")
    a, b = load_state(tmp_path / "straight" / "last.pth"), load_state(tmp_path / "second" / "last.pth")
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 4
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_tensors(sa, sb)
    first = load_state(tmp_path / "first" / "last.pth")
    assert not all(torch.equal(first["model"][k], a["model"][k]) for k in a["model"])
    straight = [(r["step"], r["train/lr"], r["train/loss"]) for r in metrics_rows(tmp_path / "straight", "train/lr")]
    resumed = [(r["step"], r["train/lr"], r["train/loss"]) for r in metrics_rows(tmp_path / "second", "train/lr")]
    assert len(straight) == 4 and resumed == straight[2:]  # same LR and loss at steps 3 and 4


def test_the_step_path_reads_the_device_once_per_log_interval_and_logs_the_clipped_norm(digits, tmp_path,
                                                                                        monkeypatch):
    """The loop waits for the device once per log interval (one ``tolist`` of the interval's figures), not per
    step: loss, non-finite flag and stop request stay on the device, a non-finite step is skipped there (fused
    AdamW), and the gradient norm is read with the rest."""
    import sys

    import litv2.engine.trainer as trainer

    reads = {"item": 0, "tolist": 0}  # reads made by the training loop's own code
    for name in reads:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            reads[_name] += sys._getframe(1).f_code.co_filename == trainer.__file__
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train_in_process(["experiment=quickstart", f"data.root={digits}", "trainer.max_steps=4", "trainer.log_every=2",
                      "optim.clip_grad=5.0", *FAST], tmp_path)
    assert reads == {"item": 0, "tolist": 2}
    norms = [r["train/grad_norm"] for r in metrics_rows(tmp_path, "train/grad_norm")]
    assert len(norms) == 2 and all(np.isfinite(n) and n > 0 for n in norms)


def _nan_after(step: int, monkeypatch):
    import litv2.engine.trainer as trainer

    real = trainer.build_mixup_and_criterion
    calls = {"n": 0}

    def patched(aug_cfg, num_classes):
        mixup, criterion = real(aug_cfg, num_classes)

        def nan_loss(out, target):
            calls["n"] += 1
            loss = criterion(out, target)
            return loss * float("nan") if calls["n"] > step else loss

        return mixup, nan_loss

    monkeypatch.setattr(trainer, "build_mixup_and_criterion", patched)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(digits, tmp_path, monkeypatch):
    from litv2.engine import NonFiniteLoss

    _nan_after(3, monkeypatch)
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        train_in_process(["experiment=quickstart", f"data.root={digits}", "trainer.ckpt_every_steps=2", *FAST],
                         tmp_path)
    state = load_state(tmp_path / "last.pth")
    assert state["progress"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_mode_trains_on(digits, tmp_path, monkeypatch):
    _nan_after(3, monkeypatch)
    summary = train_in_process(["experiment=quickstart", f"data.root={digits}", "trainer.on_nonfinite=skip",
                                "trainer.max_steps=5", "trainer.log_every=10", *FAST], tmp_path)
    assert summary["steps"] == 5 and summary["skipped_steps"] == 2
    state = load_state(tmp_path / "last.pth")  # the skipped steps left the weights and optimizer state alone
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(s["step"].item() == 3 for s in state["optimizer"]["state"].values())


def test_corrupt_images_are_skipped_and_counted(digits, tmp_path):
    root = make_digits_subset(digits, tmp_path / "data", per_class_train=4, val_total=20)
    (root / "train" / "3" / "broken.png").write_bytes(b"not an image at all")
    good = (root / "train" / "5").iterdir().__next__().read_bytes()
    (root / "train" / "5" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "val" / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 junk")
    summary = train_in_process(["experiment=quickstart", "data=folder", f"data.root={root}", "data.num_classes=10",
                                "data.batch_size=7", "trainer.epochs=2",
                                *FAST], tmp_path / "run")
    assert summary["epochs"] == 2
    assert summary["skipped_images"] == 2 * 2  # two unreadable training files, seen once per epoch
    val = metrics_rows(tmp_path / "run", "val/skipped_images")
    assert val[-1]["val/skipped_images"] == 1 and val[-1]["val/images"] == 20


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, caplog):
    from litv2.engine import checkpoint as ckpt

    for step in (1, 2):
        ckpt.save_atomic({"format": ckpt.FORMAT, "step": step, "w": torch.arange(1000.0)}, tmp_path / ckpt.LAST,
                         keep_previous=ckpt.PREV)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    data = (tmp_path / ckpt.LAST).read_bytes()
    (tmp_path / ckpt.LAST).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="is truncated or damaged: an incomplete PyTorch zip archive"):
        ckpt.load_file(tmp_path / ckpt.LAST)
    state, path = ckpt.load_resume_state(tmp_path)
    assert path.name == ckpt.PREV and state["step"] == 1
    (tmp_path / ckpt.PREV).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_resume_state(tmp_path)


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_runs_keep_freed_memory_unless_switched_off(keep, digits, tmp_path, monkeypatch):
    """trainer.cpu_keep_freed_memory (default on): CPU training and evaluation set glibc to keep freed memory."""
    from litv2 import accel
    from litv2.engine import run_eval

    calls = []
    monkeypatch.setattr(accel, "keep_freed_memory", lambda: calls.append(1) or True)
    flag = f"trainer.cpu_keep_freed_memory={str(keep).lower()}"
    train_in_process(["data=digits", f"data.root={digits}", "data.img_size=32", "data.batch_size=8",
                      "trainer.max_steps=1", flag, *TINY_LITV2, *FAST], tmp_path)
    run_eval(compose([f"checkpoint={tmp_path / 'last.pth'}", "profile.enabled=false", "data.num_workers=0", flag],
                     config="eval"))
    assert calls == ([1, 1] if keep else [])


def test_eval_of_a_compiled_model_compiles_once_for_a_smaller_last_batch(digits, tiny):
    """eval.py compiles with static shapes: the last val batch (360 = 7 x 48 + 24) is padded, not recompiled."""
    from omegaconf import OmegaConf

    from litv2.data import build_eval_loader
    from litv2.engine.evaluate import evaluate

    data = OmegaConf.merge(OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / "digits.yaml"),
                           {"root": str(digits), "batch_size": 48, "num_workers": 0})
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else None)
        return gm.forward

    model = tiny().eval()
    torch._dynamo.reset()
    try:
        compiled = evaluate(torch.compile(model, backend=counting, dynamic=False), build_eval_loader(data, digits),
                            torch.device("cpu"), pad_to=48)
    finally:
        torch._dynamo.reset()
    eager = evaluate(model, build_eval_loader(data, digits), torch.device("cpu"))
    assert len(graphs) == 1 and compiled["images"] == eager["images"] == 360
    assert compiled["top1"] == eager["top1"] and compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)


def test_train_and_eval_report_the_same_efficiency_figures(digits, tmp_path):
    """The report measures a fresh copy of the model under the run's settings: a training run's summary and
    eval.py on its checkpoint give the same (CPU: exactly repeatable) memory figures, at profile.precision."""
    from litv2.engine import run_eval

    common = ["profile.batch_size=2", "profile.runs=1", "profile.warmup=0", "profile.img_size=32",
              "trainer.precision=bf16", "data.num_workers=0"]
    summary = train_in_process(["data=digits", "aug=none", f"data.root={digits}", "data.img_size=32",
                                "data.batch_size=8", "trainer.max_steps=1", "trainer.ema.enabled=true", *common,
                                *TINY_LITV2, "logger=none"], tmp_path)
    report = run_eval(compose([f"checkpoint={tmp_path / 'last.pth'}", "profile_only=false", *common], config="eval"))
    assert summary["precision"] == report["precision"] == "bf16" and summary["tf32"] is False
    assert summary["params"] == report["params"] and summary["gflops"] == report["gflops"]
    assert summary["train_mem_mb"] == report["train_mem_mb"] > 0
    assert summary["test_mem_mb"] == report["test_mem_mb"]


def test_a_stop_signal_takes_effect_within_two_steps_not_at_the_next_log(digits, tmp_path, monkeypatch):
    """SIGTERM during step 3 with log_every=100: the request rides on step 4's reduction, every rank reads it one
    step later (no extra device wait), and the job saves and stops at step 5, not at the next log read."""
    import os
    import signal

    import litv2.engine.trainer as trainer
    from litv2.engine.signals import Preempted

    real = trainer._optimizer_step

    def signalled(run, found_inf):
        if run.progress.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, found_inf)

    monkeypatch.setattr(trainer, "_optimizer_step", signalled)
    with pytest.raises(Preempted, match="at step 5"):
        train_in_process(["experiment=quickstart", f"data.root={digits}", "trainer.max_steps=60",
                          "trainer.log_every=100", *TINY_LITV2, *FAST], tmp_path)
    assert load_state(tmp_path / "last.pth")["progress"]["global_step"] == 5


def test_the_ema_is_not_updated_on_a_skipped_step(digits, tmp_path, monkeypatch):
    """trainer.on_nonfinite=skip: steps 4 and 5 are skipped on the device, and so are the EMA's update and the moves
    of the BatchNorm running statistics (the DTMs') their forwards made."""
    common = ["experiment=quickstart", f"data.root={digits}", "trainer.on_nonfinite=skip", "trainer.ema.enabled=true",
              "trainer.ema.decay=0.5", "trainer.log_every=10", "trainer.deterministic=true", *TINY_LITV2, *FAST]
    train_in_process([*common, "trainer.max_steps=3"], tmp_path / "three")
    _nan_after(3, monkeypatch)
    summary = train_in_process([*common, "trainer.max_steps=5"], tmp_path / "five")
    assert summary["skipped_steps"] == 2
    three, five = load_state(tmp_path / "three" / "last.pth"), load_state(tmp_path / "five" / "last.pth")
    assert any("running_mean" in k for k in three["model"])
    assert_same_tensors(three["model"], five["model"])
    assert_same_tensors(three["ema"], five["ema"])
