"""I/O faults (issue 28): a checkpoint save that fails (full disk, I/O error, read-only file system) ends the run in
one line and keeps the previous checkpoints; an unreadable checkpoint is described in plain words; an unwritable
paths.runs_root is one line; eval.py profiles a checkpoint with its run's profile settings."""
import errno
import io
import os
import re
from pathlib import Path

import pytest
import torch

from engine_utils import (CONF, FAST, TINY_LITV2, assert_one_line_error, compose, load_state, make_digits_subset,
                          run_script, train_in_process, user_error_line)


def _save(state_value: float, path, n: int = 1000):
    from litv2.engine import checkpoint as ckpt

    ckpt.save_atomic({"format": ckpt.FORMAT, "w": torch.full((n,), state_value)}, path, keep_previous=ckpt.PREV)


def _temp_files(d):
    return [p.name for p in d.iterdir() if ".tmp-" in p.name]


# ---- 1. a failed checkpoint save ---------------------------------------------------------------------------

def test_a_save_on_a_full_disk_keeps_the_previous_checkpoints_and_says_so(tmpfs):
    """A real 256 KiB tmpfs: the third save (800 KB) does not fit. torch.save alone would report "unexpected pos
    N vs M" and leave the partial temporary file filling the disk."""
    from litv2.engine import checkpoint as ckpt

    d = tmpfs.mount(size="256k")
    _save(1.0, d / ckpt.LAST)
    _save(2.0, d / ckpt.LAST)
    with pytest.raises(ckpt.CheckpointSaveError) as e:
        _save(3.0, d / ckpt.LAST, n=200_000)
    assert str(e.value) == f"no space left on device while writing {d / ckpt.LAST} (the previous checkpoints are kept)"
    assert isinstance(e.value, ckpt.UserError) and e.value.__cause__.errno == errno.ENOSPC
    assert _temp_files(d) == [], "the partial temporary file must be removed"
    assert load_state(d / ckpt.LAST)["w"][0] == 2.0 and load_state(d / ckpt.PREV)["w"][0] == 1.0
    _save(4.0, d / ckpt.LAST)  # the space the failed save took is free again
    assert load_state(d / ckpt.LAST)["w"][0] == 4.0 and load_state(d / ckpt.PREV)["w"][0] == 2.0


class _FailingFile(io.FileIO):
    """A file whose writes fail with ``error`` once ``limit`` bytes are written (or whose fsync fails: limit None)."""

    def __init__(self, path, mode, error, limit):
        super().__init__(path, mode)
        self.error, self.limit, self.written = error, limit, 0

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if self.limit is not None and self.written + n > self.limit:
            raise OSError(self.error, os.strerror(self.error))
        self.written += n
        return super().write(data)


@pytest.mark.parametrize("error,where,words", [
    (errno.ENOSPC, "write", "no space left on device"),
    (errno.EIO, "write", "input/output error"),
    (errno.EIO, "fsync", "input/output error"),  # network file systems report a failed write at fsync / close
    (errno.EDQUOT, "write", "disk quota exceeded"),
])
def test_a_failed_write_or_fsync_names_the_cause_and_leaves_no_temporary_file(error, where, words, tmp_path,
                                                                              monkeypatch):
    from litv2.engine import checkpoint as ckpt

    _save(1.0, tmp_path / ckpt.LAST)
    _save(2.0, tmp_path / ckpt.LAST)
    if where == "write":
        monkeypatch.setattr(ckpt, "open", lambda path, mode: _FailingFile(path, mode, error, limit=4096),
                            raising=False)
    else:
        def failing_fsync(fd):
            raise OSError(error, os.strerror(error))

        monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ckpt.CheckpointSaveError) as e:
        _save(3.0, tmp_path / ckpt.LAST, n=100_000)
    assert str(e.value) == f"{words} while writing {tmp_path / ckpt.LAST} (the previous checkpoints are kept)"
    monkeypatch.undo()
    assert _temp_files(tmp_path) == []
    assert load_state(tmp_path / ckpt.LAST)["w"][0] == 2.0 and load_state(tmp_path / ckpt.PREV)["w"][0] == 1.0


class _InterruptedFile(io.FileIO):
    """A file whose write after ``limit`` bytes is interrupted by Ctrl-C (SIGINT's KeyboardInterrupt)."""

    def __init__(self, path, mode, limit):
        super().__init__(path, mode)
        self.limit, self.written = limit, 0

    def write(self, data):
        self.written += len(memoryview(data).cast("B"))
        if self.written > self.limit:
            raise KeyboardInterrupt
        return super().write(data)


def test_ctrl_c_during_a_save_stays_a_ctrl_c_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """torch.save turns an exception in a write into its writer's "unexpected pos" error; Ctrl-C mid-write must
    still end the run as an interrupt (exit 130), not as that error, and keep the previous checkpoint."""
    from litv2.engine import checkpoint as ckpt

    _save(1.0, tmp_path / ckpt.LAST)
    monkeypatch.setattr(ckpt, "open", lambda path, mode: _InterruptedFile(path, mode, limit=4096), raising=False)
    with pytest.raises(KeyboardInterrupt):
        _save(2.0, tmp_path / ckpt.LAST, n=100_000)
    monkeypatch.undo()
    assert _temp_files(tmp_path) == []
    assert load_state(tmp_path / ckpt.LAST)["w"][0] == 1.0


def test_a_save_into_a_read_only_file_system_says_so(tmpfs):
    from litv2.engine import checkpoint as ckpt

    d = tmpfs.mount(size="256k")
    _save(1.0, d / ckpt.BEST)
    tmpfs.read_only(d)
    with pytest.raises(ckpt.CheckpointSaveError, match=re.escape(
            f"read-only file system while writing {d / ckpt.LAST} (the previous checkpoints are kept)")):
        _save(2.0, d / ckpt.LAST)
    with pytest.raises(ckpt.CheckpointSaveError, match="^read-only file system while writing"):
        _save(2.0, d / ckpt.BEST)
    assert sorted(p.name for p in d.iterdir()) == [ckpt.BEST]
    assert load_state(d / ckpt.BEST)["w"][0] == 1.0


def test_a_first_save_that_fails_says_no_checkpoint_was_saved(tmp_path):
    from litv2.engine import checkpoint as ckpt

    (tmp_path / "afile").write_text("")
    with pytest.raises(ckpt.CheckpointSaveError, match=re.escape(
            f"not a directory while writing {tmp_path / 'afile' / ckpt.LAST} (no checkpoint was saved)")):
        _save(1.0, tmp_path / "afile" / ckpt.LAST)


def test_a_state_that_cannot_be_pickled_is_raised_as_it_is_without_a_temporary_file(tmp_path):
    """Not a file-system problem (a programming error): torch's own exception, and no temporary file left."""
    from litv2.engine import checkpoint as ckpt

    with pytest.raises(Exception) as e:
        ckpt.save_atomic({"f": lambda: 0}, tmp_path / ckpt.LAST)
    assert not isinstance(e.value, ckpt.CheckpointSaveError)
    assert list(tmp_path.iterdir()) == []


def test_training_on_a_disk_that_fills_up_ends_in_one_line_with_the_last_good_checkpoint(digits, tmpfs, capsys,
                                                                                          monkeypatch):
    """The disk fills up after the first checkpoint (everything but 64 KiB taken): the second save fails, and the
    run ends with the one-line error, no temporary file and the first checkpoint intact."""
    from litv2.engine import checkpoint as ckpt
    from litv2.engine import train

    d = tmpfs.mount(size="8m")
    real_save, saves = ckpt.save_atomic, []

    def save_then_fill_the_disk(state, path, **kwargs):
        real_save(state, path, **kwargs)
        saves.append(path)
        if len(saves) == 1:
            free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
            (d / "filler").write_bytes(b"\0" * (free - 64 * 1024))

    monkeypatch.setattr(ckpt, "save_atomic", save_then_fill_the_disk)
    run_dir = d / "run"
    cfg = compose(["experiment=quickstart", f"data.root={digits}", "data.batch_size=8", "trainer.max_steps=3",
                   "trainer.ckpt_every_steps=1", *TINY_LITV2, *FAST])
    line = user_error_line(capsys, train, cfg, run_dir=run_dir, fresh_dir=run_dir)
    assert line == f"error: no space left on device while writing {run_dir / ckpt.LAST} (the previous checkpoints " \
                   f"are kept)"
    assert len(saves) == 1 and _temp_files(run_dir) == []
    assert load_state(run_dir / ckpt.LAST)["progress"]["global_step"] == 1


def _failed_save_on_rank(rank, world_size, store_path, run_dir, results):
    import datetime
    from types import SimpleNamespace

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from litv2.engine import checkpoint as ckpt
    from litv2.engine import trainer
    from litv2.engine.distributed import DistInfo

    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"file://{store_path}",
                            timeout=datetime.timedelta(seconds=20))
    try:
        model = torch.nn.Linear(2, 2)
        run = SimpleNamespace(info=DistInfo(rank, rank, world_size), progress=trainer.Progress(), start_time=0.0,
                              model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None,
                              cfg=OmegaConf.create({"a": 1}), run_dir=run_dir, lease=None, saved_step=None)
        try:
            trainer.save(run, ckpt.LAST)
            results[rank] = "returned"
        except Exception as e:
            results[rank] = (type(e).__name__, str(e))
    finally:
        dist.destroy_process_group()


def test_a_failed_save_ends_every_rank_with_rank_0s_line(tmp_path):
    """Rank 0 cannot write (the run dir is a file); every rank raises the same CheckpointSaveError instead of the
    other ranks waiting for rank 0 in a barrier."""
    import torch.multiprocessing as mp

    (tmp_path / "run").write_text("")
    results = mp.Manager().dict()
    mp.start_processes(_failed_save_on_rank, args=(2, str(tmp_path / "store"), tmp_path / "run", results), nprocs=2,
                       start_method="fork")
    expected = ("CheckpointSaveError", f"not a directory while writing {tmp_path / 'run' / 'last.pth'} "
                                       f"(no checkpoint was saved)")
    assert dict(results) == {0: expected, 1: expected}


# ---- 2. an unreadable checkpoint, in plain words -----------------------------------------------------------

def _truncated_checkpoint(path):
    torch.save({"w": torch.arange(1000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"is truncated or damaged: an incomplete PyTorch zip archive ({len(data) // 2:,} bytes)"


def _legacy_truncated(path):
    torch.save({"w": torch.arange(1000.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"is truncated or damaged: a PyTorch file in the legacy (pickle) format ({len(data) // 2:,} bytes)"


def _missing_record(path):
    torch.save({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes().replace(b"/data/0", b"/data/9"))  # still a valid zip, without the tensor
    return ("is damaged: a PyTorch zip archive whose contents do not load (PytorchStreamReader failed locating file "
            "data/0: file not found)")


def _refused(path):
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    return "holds objects that weights_only loading refuses (Unsupported global: GLOBAL argparse.Namespace"


def _foreign_zip(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("weights.txt", "1 2 3")
    return "is a zip archive but not a PyTorch checkpoint (it holds weights.txt)"


def _written(content: bytes, expected: str):
    def make(path):
        path.write_bytes(content)
        return expected
    return make


@pytest.mark.parametrize("make", [
    _written(b"hello, this is not a checkpoint\nline 2\n",
             "is not a PyTorch checkpoint but a text file, starting 'hello, this is not a checkpoint'"),
    _written(b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n",
             "is not a PyTorch checkpoint but an HTML page (a download that returned a web page?), starting "
             "'<!DOCTYPE html>'"),
    _written(b"", "is empty (0 bytes)"),
    _written(bytes(range(256)), "is not a PyTorch checkpoint (unrecognised binary data, 256 bytes)"),
    _truncated_checkpoint, _legacy_truncated, _missing_record, _refused, _foreign_zip,
], ids=["text", "html", "empty", "binary", "truncated", "legacy-truncated", "missing-record", "refused", "foreign-zip"])
def test_an_unreadable_checkpoint_is_described_in_plain_words(make, tmp_path):
    from litv2.engine import checkpoint as ckpt

    path = tmp_path / "x.pth"
    expected = make(path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_file(path)
    assert str(e.value).startswith(f"checkpoint {path} {expected}"), str(e.value)
    assert "\n" not in str(e.value) and not re.search(r"\(\d+\)", str(e.value)), str(e.value)


# ---- 3. an unwritable paths.runs_root ----------------------------------------------------------------------

def test_train_under_an_unwritable_runs_root_fails_in_one_line(tmp_path):
    """Hydra makes the run dir before train.py's code runs; without the callback this is Hydra's traceback."""
    (tmp_path / "afile").write_text("")
    proc = run_script("train.py", [f"paths.runs_root={tmp_path / 'afile' / 'runs'}", "logger=none"], timeout=120)
    assert_one_line_error(proc, f"error: cannot create the run dir {tmp_path / 'afile' / 'runs' / 'litv2_s'}/")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(": not a directory (set paths.runs_root to a writable place)"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == ""


def _hydra_callbacks(overrides, config="config"):
    """The composed config with Hydra's node, and the callbacks it registers (instantiated as Hydra does)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra_compose(config, overrides=list(overrides), return_hydra_config=True)
    return cfg, [instantiate(c) for c in (cfg.hydra.get("callbacks") or {}).values()]


@pytest.mark.parametrize("mode", ["run", "multirun"])
def test_a_read_only_runs_root_is_one_line_and_exit_status_2(mode, tmpfs, capsys):
    root = tmpfs.mount(size="64k")
    tmpfs.read_only(root)
    cfg, callbacks = _hydra_callbacks([f"paths.runs_root={root}", "experiment=quickstart"])
    with pytest.raises(SystemExit) as e:
        for c in callbacks:
            getattr(c, f"on_{mode}_start")(config=cfg)
    assert e.value.code == 2
    what, made = ("run dir", cfg.hydra.run.dir) if mode == "run" else ("sweep dir", cfg.hydra.sweep.dir)
    assert capsys.readouterr().err == (f"error: cannot create the {what} {made}: read-only file system (set "
                                       f"paths.runs_root to a writable place)\n")


def test_the_run_dir_callback_makes_hydras_dir_and_leaves_torchrun_ranks_and_eval_alone(tmp_path, monkeypatch):
    from litv2.engine import rank_zero_hydra_overrides

    cfg, callbacks = _hydra_callbacks([f"paths.runs_root={tmp_path}", "experiment=quickstart"])
    for c in callbacks:
        c.on_run_start(config=cfg)
    made = Path(cfg.hydra.run.dir)
    assert made.is_dir() and made.parent == tmp_path / "quickstart" and list(tmp_path.rglob("*")) == [made.parent, made]
    monkeypatch.setenv("RANK", "1")  # a torchrun rank > 0: Hydra's dir is the existing scratch dir, no .hydra/
    overrides = rank_zero_hydra_overrides(["train.py", f"paths.runs_root={tmp_path / 'other'}"])[1:]
    cfg, callbacks = _hydra_callbacks(overrides)
    for c in callbacks:
        c.on_run_start(config=cfg)
    assert not (tmp_path / "other").exists()
    _, callbacks = _hydra_callbacks(["model=litv2_s"], config="eval")
    assert callbacks == []  # eval.py writes no run dir


# ---- 4. eval.py reports the efficiency figures of the run's summary.json -----------------------------------

def test_eval_of_our_checkpoint_profiles_it_as_the_run_did(digits, tmp_path):
    """The run profiled at its own profile.batch_size; eval.py, given no profile settings, uses the run's (before:
    its default batch of 64, and other memory figures). Which keys are taken: the test below."""
    from litv2.engine import run_eval

    root = make_digits_subset(digits, tmp_path / "data", per_class_train=2, val_total=10)  # a short validation
    summary = train_in_process(["data=folder", "data.num_classes=10", "aug=none", f"data.root={root}",
                                "data.img_size=32", "data.batch_size=8", "trainer.max_steps=1", "profile.batch_size=2",
                                "profile.runs=1", "profile.warmup=0", "data.num_workers=0", *TINY_LITV2, "logger=none"],
                               tmp_path / "run")
    report = run_eval(compose([f"checkpoint={tmp_path / 'run' / 'last.pth'}", "data.num_workers=0"], config="eval"))
    assert report["batch_size"] == 2 and report["img_size"] == [32, 32]
    assert report["precision"] == summary["precision"]
    assert (report["params"], report["gflops"]) == (summary["params"], summary["gflops"])
    assert report["train_mem_mb"] == summary["train_mem_mb"] > 0
    assert report["test_mem_mb"] == summary["test_mem_mb"] > 0


def test_profile_keys_given_to_eval_win_over_the_runs(monkeypatch):
    """As for data keys: what eval.py's command line gives stays, including what follows it (profile.precision is
    ${trainer.precision}); profile.enabled is eval.py's own."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from litv2.engine.evaluate import with_run_config

    run = OmegaConf.to_container(compose(["experiment=quickstart", "trainer.precision=bf16", "profile.batch_size=2",
                                          "profile.runs=1", "profile.memory=false", "profile.enabled=false"]),
                                 resolve=True)

    def eval_cfg(*overrides):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            with_hydra = hydra_compose("eval", overrides=["checkpoint=x.pth", *overrides], return_hydra_config=True)
        monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # put back after the test
        HydraConfig.instance().set_config(with_hydra)  # the command line eval.py got, as under @hydra.main
        return with_run_config(compose(["checkpoint=x.pth", *overrides], config="eval"), run).profile

    assert OmegaConf.to_container(eval_cfg(), resolve=True) == {
        "enabled": True, "precision": "bf16", "img_size": 32, "batch_size": 2, "runs": 1, "warmup": 2,
        "memory": False}
    given = eval_cfg("profile.batch_size=3", "trainer.precision=fp32", "data.img_size=48", "profile.enabled=false")
    assert OmegaConf.to_container(given, resolve=True) == {
        "enabled": False, "precision": "fp32", "img_size": 48, "batch_size": 3, "runs": 1, "warmup": 2,
        "memory": False}
