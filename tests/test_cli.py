"""train.py / eval.py as a user runs them: one-line errors, eval of the release checkpoint,
the efficiency table, a local sweep, and SIGKILL + rerun = an uninterrupted run."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_utils import (ENV, FAST, ROOT, TINY_LITV2, assert_one_line_error, assert_same_tensors, compose, load_state,
                          metrics_rows, run_script, train_in_process, user_error_line)

FIXTURE = ROOT / "tests" / "fixtures" / "tiny_a05_ws2.pth"


def test_train_bad_input_fails_in_one_line_and_leaves_no_run_dir(tmp_path):
    proc = run_script("train.py", ["data=imagenet", "data.root=/nonexistent/imagenet", f"paths.runs_root={tmp_path}",
                                   "logger=none"], timeout=120)
    assert_one_line_error(proc, "/nonexistent/imagenet does not exist; expected <root>/train")
    assert not list(tmp_path.rglob("*")), "a failed start must leave no run dir behind"


@pytest.mark.parametrize("args,expected", [
    (["model=timm", "model.name=no_such_net"], "unknown model 'no_such_net'"),
    (["hilo.alpha=1.5"], "hilo.alpha=1.5"),
    (["hilo.window_size=0"], "hilo.window_size=0"),
])
def test_train_bad_model_inputs_fail_in_one_line(args, expected, tmp_path, capsys):
    """As train.py runs it (in-process: the subprocess path is the test above): exit status 2, one line on
    stderr, and the run dir Hydra made is gone."""
    from litv2.engine import train

    run_dir = tmp_path / "quickstart" / "2026-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    line = user_error_line(capsys, train, compose([*args, "experiment=quickstart", *FAST]), run_dir=run_dir,
                           fresh_dir=run_dir)
    assert expected in line
    assert not list(tmp_path.rglob("*")), "a failed start must leave no run dir behind"


def test_eval_unreadable_checkpoint_fails_in_one_line(tmp_path, capsys):
    """As eval.py runs it (in-process: the subprocess path of a one-line error is tested for train.py above)."""
    from litv2.engine import run_eval

    good = FIXTURE.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 3])
    cfg = compose(["model=litv2_s", f"checkpoint={tmp_path / 'truncated.pth'}", "data=synthetic"], config="eval")
    assert "is truncated or damaged: an incomplete PyTorch zip archive" in user_error_line(capsys, run_eval, cfg)


def _tiny_imagefolder(root: Path, n_per_class: int = 2, classes: int = 10, size: int = 64):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "val" / f"class_{c:02d}"
        d.mkdir(parents=True)
        for i in range(n_per_class):
            # a smooth random image: strong low frequencies, so the tiny model's predictions vary
            base = rng.random((4, 4, 3)) * 255
            img = Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.BICUBIC)
            img.save(d / f"{i}.png")
    return root


def test_eval_release_checkpoint_reports_independently_computed_accuracy(tmp_path):
    """eval.py on the authors'-format tiny checkpoint (alpha 0.5, window 2, 64x64, 10 classes)."""
    kwargs = json.loads((ROOT / "tests" / "fixtures" / "tiny_a05_ws2.json").read_text())["constructor_kwargs"]
    root = _tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "result.json"
    proc = run_script("eval.py", [
        "model=litv2_s", f"checkpoint={FIXTURE}", "data=folder", f"data.root={root}", "data.num_classes=10",
        "data.img_size=64", "data.crop_pct=1.0", "data.num_workers=0", "data.batch_size=8",
        f"++model.embed_dim={kwargs['embed_dim']}", f"++model.depths={kwargs['depths']}".replace(" ", ""),
        f"++model.num_heads={kwargs['num_heads']}".replace(" ", ""), f"hilo.alpha={kwargs['alpha']}",
        f"hilo.window_size={kwargs['local_ws'][2]}", "model.drop_path_rate=0.0", "profile.enabled=false",
        f"output={out}"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert "top1" in proc.stdout and "top5" in proc.stdout

    # independent: the lead's loader + our own decoding and normalisation (images are exactly 64x64)
    import timm

    import litv2

    model = timm.create_model("litv2_s", **kwargs).eval()
    litv2.load_checkpoint(model, str(FIXTURE))
    files = sorted((root / "val").glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files])
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    y = torch.tensor([int(f.parent.name.split("_")[1]) for f in files])
    with torch.no_grad():
        logits = model(x)
    top1 = int((logits.argmax(1) == y).sum())
    top5 = int((logits.topk(5, 1).indices == y[:, None]).any(1).sum())
    assert result["images"] == len(files) == 20
    assert result["top1"] == pytest.approx(100.0 * top1 / len(files), abs=1e-9)
    assert result["top5"] == pytest.approx(100.0 * top5 / len(files), abs=1e-9)


def test_eval_profile_only_prints_the_efficiency_table(capsys):
    from litv2.engine import run_eval

    run_eval(compose(["model=litv2_s", "profile_only=true", "profile.img_size=64", "profile.batch_size=2",
                      "profile.runs=1", "profile.warmup=0", "profile.memory=false"], config="eval"))
    table = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert int(table["params"].replace(",", "")) > 20_000_000  # LITv2-S: 28M
    assert float(table["gflops"]) > 0 and float(table["throughput"]) > 0
    assert "top1" not in table


def test_local_sweep_makes_one_run_dir_per_point(digits, tmp_path):
    proc = run_script("train.py", ["-m", "hilo.alpha=0.5,0.9", "experiment=quickstart", f"data.root={digits}",
                                   "trainer.max_steps=2", f"paths.runs_root={tmp_path}", *TINY_LITV2, *FAST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(tmp_path.glob("multirun/quickstart/*/*/summary.json"))
    assert len(summaries) == 2, proc.stdout[-2000:]
    alphas = sorted(load_state(s.parent / "last.pth")["config"]["hilo"]["alpha"] for s in summaries)
    assert alphas == [0.5, 0.9]
    assert all(json.loads(s.read_text())["steps"] == 2 for s in summaries)


KILL = ["experiment=quickstart", "data.batch_size=16", "trainer.max_steps=20", "trainer.ckpt_every_steps=4",
        "trainer.log_every=1", "trainer.deterministic=true", "aug=deit", "trainer.ema.enabled=true", *FAST]


def test_sigkill_mid_epoch_then_same_command_continues_exactly(digits, tmp_path):
    """Killed hard mid-epoch, the same command resumes from the last checkpoint (trainer.resume=auto)
    and ends with weights identical to an uninterrupted run."""
    args = [*KILL, f"data.root={digits}", f"paths.runs_root={tmp_path / 'runs'}"]
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    run_dirs = []
    try:
        while time.time() < deadline:
            run_dirs = list((tmp_path / "runs").glob("quickstart/*/metrics.jsonl"))
            if run_dirs and any(r.get("step", 0) >= 10 for r in metrics_rows(run_dirs[0].parent, "step")):
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = load_state(run_dirs[0].parent / "last.pth")["progress"]["global_step"]
    assert 4 <= killed_at < 20
    time.sleep(1.1)  # a new second: Hydra makes a fresh dir, resume=auto must find the old one
    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    dirs = [d for d in (tmp_path / "runs" / "quickstart").iterdir()]
    assert len(dirs) == 1, "the rerun must continue the killed run's directory"
    resumed = load_state(dirs[0] / "last.pth")
    assert resumed["progress"]["global_step"] == 20

    train_in_process(args[:-1] + [f"paths.runs_root={tmp_path / 'ref'}"], tmp_path / "ref" / "run")
    straight = load_state(tmp_path / "ref" / "run" / "last.pth")
    assert_same_tensors(straight["model"], resumed["model"])
    assert_same_tensors(straight["ema"], resumed["ema"])
    steps = [r["step"] for r in metrics_rows(dirs[0], "train/loss")]
    assert steps == list(range(1, 21)), "metrics rows after the checkpoint must not be duplicated"
