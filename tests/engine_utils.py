"""Shared constants and helpers of the tests (not a test module; the fixtures are in conftest.py)."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = ROOT / "tests" / "fixtures"
# A LITv2 small enough for a CPU test: 16 wide, one block per stage but two HiLo blocks in stage 3, MSA in stage 4.
TINY = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_classes=10)
# The same model as config overrides for train.py / eval.py.
TINY_LITV2 = [f"++model.embed_dim={TINY['embed_dim']}", "++model.depths=[1,1,2,1]", "++model.num_heads=[1,2,4,8]",
              "model.drop_path_rate=0.0"]
# Quiet, fast, local: no wandb, no profiling, no loader workers.
# Where the Triton kernel tests (marker triton) run: on a GPU where there is one, else on CPU tensors under Triton's
# interpreter (conftest.py turns it on).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = ["logger=none", "profile.enabled=false", "data.num_workers=0"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}


def compose(overrides, config: str = "config"):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose(config, overrides=list(overrides))


def train_in_process(overrides, run_dir):
    from litv2.engine import train

    return train(compose(overrides), run_dir=run_dir)


def compiled_matches_eager(model, x, loss=lambda out: out.sum()) -> dict:
    """``torch.compile(model, backend="aot_eager", fullgraph=True)`` (a graph break fails) on ``x``, then ``model``
    eagerly: the outputs within 1e-6 and every gradient within 1e-5. Returns ``litv2.accel.stats`` as the compiled
    forward and backward left it (cleared before)."""
    from litv2.accel import stats

    torch._dynamo.reset()
    stats.clear()
    out = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)(x)
    loss(out).backward()
    taken = dict(stats)
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(x)
    loss(eager).backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    return taken


def processes_of(marker: str) -> list[int]:
    """PIDs whose command line holds ``marker`` (a test's tmp dir): the launched processes, torchrun's workers (each in
    a session of its own) and their loader workers."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def kill_all(proc, marker: str) -> None:
    """SIGKILL to ``proc`` and every process whose command line holds ``marker``."""
    for pid in [proc.pid, *processes_of(marker)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def load_script(name: str) -> dict:
    """The globals of ``scripts/<name>`` run as a module (not as ``__main__``): its functions, for in-process tests."""
    return runpy.run_path(str(ROOT / "scripts" / name), run_name=f"_test_{Path(name).stem}")


def run_script(script: str, args, timeout: int = 180, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: str):
    """A script that failed with one ``error: `` line on stderr containing ``expected``, and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def user_error_line(capsys, fn, *args, **kwargs) -> str:
    """Run ``fn`` as train.py / eval.py do (under ``main_guard``): it must exit with status 2 and print one line on
    stderr, which is returned."""
    import pytest

    from litv2.engine import main_guard

    with pytest.raises(SystemExit) as exit_:
        main_guard(fn, *args, **kwargs)
    assert exit_.value.code == 2
    lines = terminal_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def terminal_lines(text: str) -> list[str]:
    """The non-blank lines of ``text`` as a terminal shows them: a carriage return goes back to the start of the
    line, and what follows overwrites it (a progress bar's updates, and the blanks that clear it when closed)."""
    shown = []
    for line in text.split("\n"):
        screen = ""
        for segment in line.split("\r"):
            screen = segment + screen[len(segment):]
        if screen.strip():
            shown.append(screen.rstrip())
    return shown


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def metrics_rows(run_dir, key: str):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if key in r]


def make_digits_subset(src: Path, dst: Path, per_class_train: int, val_total: int, classes=range(10)) -> Path:
    """A small ImageFolder copied from the digits tree (val_total images spread over the classes)."""
    for c in classes:
        files = sorted((src / "train" / str(c)).iterdir())[:per_class_train]
        (dst / "train" / str(c)).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, dst / "train" / str(c) / f.name)
        (dst / "val" / str(c)).mkdir(parents=True, exist_ok=True)
    per_class = [sorted((src / "val" / str(c)).iterdir()) for c in classes]
    val_files = [files[i] for i in range(max(map(len, per_class))) for files in per_class if i < len(files)][:val_total]
    for f in val_files:
        shutil.copy(f, dst / "val" / f.parent.name / f.name)
    return dst
