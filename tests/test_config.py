"""Configs: the paper's recipe is what the experiment presets resolve to; groups compose and validate."""
import pytest
from omegaconf import OmegaConf

from engine_utils import compose

PAPER = {  # paper Sec. 5.1 + the LITv1/Swin recipe (issue 3 item 2)
    "trainer.epochs": 300, "optim.betas": [0.9, 0.999], "optim.eps": 1e-8, "optim.weight_decay": 0.05,
    "optim.lr": 5e-4, "optim.lr_base_batch": 512, "sched.warmup_epochs": 20, "sched.warmup_lr": 5e-7,
    "sched.min_lr": 5e-6, "optim.offset_lr_scale": 0.01, "optim.clip_grad": 5.0, "aug.smoothing": 0.1,
    "aug.mixup": 0.8, "aug.cutmix": 1.0, "aug.mixup_switch_prob": 0.5, "aug.auto_augment": "rand-m9-mstd0.5-inc1",
    "aug.reprob": 0.25, "aug.remode": "pixel", "aug.color_jitter": 0.4, "aug.interpolation": "bicubic",
    "data.interpolation": "bicubic", "data.img_size": 224, "data.crop_pct": 0.875, "data.crop_mode": "center",
    "hilo.alpha": 0.9, "hilo.window_size": 2, "model.local_ws": [0, 0, 2, 1], "model.alpha": 0.9,
    "data.batch_size": 128,
}
FT384 = {**PAPER, "trainer.epochs": 30, "optim.lr": 2e-5, "sched.warmup_epochs": 5, "sched.warmup_lr": 2e-8,
         "sched.min_lr": 2e-7, "optim.weight_decay": 1e-8, "data.img_size": 384, "data.crop_pct": 1.0,
         "data.crop_mode": "squash"}


@pytest.mark.parametrize("experiment,model,drop_path,expected", [
    ("litv2_s_in1k", "litv2_s", 0.2, PAPER),
    ("litv2_m_in1k", "litv2_m", 0.3, PAPER),
    ("litv2_b_in1k", "litv2_b", 0.5, PAPER),
    ("litv2_b_384_ft", "litv2_b_384", 0.5, FT384),
])
def test_experiment_presets_hold_the_paper_recipe(experiment, model, drop_path, expected):
    cfg = compose([f"experiment={experiment}"])
    OmegaConf.resolve(cfg)
    for key, value in expected.items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, got, value)
    assert cfg.model.name == model and cfg.model.drop_path_rate == drop_path and cfg.model.attention == "hilo"
    assert cfg.data.name == "imagenet" and cfg.data.num_classes == 1000
    # 8 GPUs x 128 = 1,024 images -> lr 1e-3 (5e-4 per 512), warmup/min scaled alike
    from litv2.engine.builders import lr_scale

    assert cfg.optim.lr * lr_scale(cfg, world_size=8) == pytest.approx(2 * expected["optim.lr"])


def test_hilo_overrides_reach_the_model_and_ablation_switch():
    cfg = compose(["model=litv2_m", "hilo.alpha=0.5", "hilo.window_size=4", "model.attention=wmsa"])
    assert cfg.model.alpha == 0.5 and list(cfg.model.local_ws) == [0, 0, 4, 1] and cfg.model.attention == "wmsa"


@pytest.mark.parametrize("override", ["model=timm model.name=resnet18", "model=fastervit_0"])
def test_generic_timm_and_fastervit_configs_build(override):
    from litv2.engine.builders import build_model

    cfg = compose(override.split() + ["data=digits", "data.img_size=64"])
    model = build_model(cfg)
    assert model.num_classes == 10 if hasattr(model, "num_classes") else True


def test_launcher_presets_compose():
    from hydra import compose as hydra_compose, initialize_config_dir

    from engine_utils import CONF

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                                 "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
        local = hydra_compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    assert local.hydra.launcher._target_.endswith("BasicLauncher")


@pytest.mark.parametrize("override,message", [
    ("hilo.alpha=1.5", "hilo.alpha=1.5"), ("hilo.window_size=0", "hilo.window_size=0"),
    ("model=timm model.name=not_a_model", "unknown model 'not_a_model'"),
    ("trainer.precision=fp8", "trainer.precision"),
])
def test_bad_values_are_rejected_before_any_work(override, message):
    from litv2.engine.builders import check_config
    from litv2.errors import UserError

    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_config(compose(override.split()))


def test_importing_the_engine_keeps_torch_compiles_recompile_limit():
    """timm.optim's import raises torch._dynamo's recompile limit to 1,000,000 (its Kron optimizer); the
    engine keeps torch's own limit, so a recompiling model under trainer.compile=true still stops."""
    import subprocess
    import sys

    code = ("import torch._dynamo.config as c; limit = c.cache_size_limit; import litv2.engine.builders; "
            "import litv2.engine.trainer; assert c.cache_size_limit == limit, (c.cache_size_limit, limit)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tf32_on_cuda_unless_deterministic_and_put_back_afterwards():
    import torch

    from litv2.engine.builders import apply_process_settings, process_settings, tf32_enabled

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for overrides, expected in (([], True), (["trainer.deterministic=true"], False), (["trainer.tf32=false"], False)):
        with process_settings():
            apply_process_settings(compose(["data=digits", "trainer.cpu_keep_freed_memory=false", *overrides]),
                                   torch.device("cuda"))
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (expected, expected)
            assert tf32_enabled(torch.device("cuda")) == expected and not tf32_enabled(torch.device("cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
