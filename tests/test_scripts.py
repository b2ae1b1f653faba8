"""Benchmark / analysis scripts in smoke mode: Table IV columns, Fig. 3 sweep, sweep summary, spectrum, peers."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FIXTURES = ROOT / "tests" / "fixtures"


def run_script(name: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc.stdout


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        return im.size


# ---- benchmark_attention (supplementary Table IV, Fig. 3) --------------------------------------------------

def test_benchmark_attention_smoke_matches_table_iv(tmp_path):
    out = run_script("benchmark_attention.py", "--smoke", "--out-dir", str(tmp_path))
    res = json.loads((tmp_path / "attention_table.json").read_text())["results"]
    assert set(res) == {"hilo", "msa", "sra", "local", "shifted", "tmsa-lsa", "tmsa-gsa", "xca", "linformer",
                        "performer", "crosswin", "van", "hornet", "focal", "dat", "quadtree"}
    # the acceptance numbers: MSA 2.36 M / 521.4 M, HiLo 2.20 M / 298.3 M (exact layer counts below)
    assert (res["msa"]["params"], res["msa"]["flops"]) == (2_362_368, 521_428_992)
    assert (res["hilo"]["params"], res["hilo"]["flops"]) == (2_198_528, 298_296_320)
    assert "| HiLo | 2.20 | 298.3 |" in out and "| MSA | 2.36 | 521.4 |" in out
    paper = load_script("benchmark_attention.py")["PAPER_TABLE_IV"]
    fine_level = {"QuadTree": 2 * 196 * 32 * 768}  # in QuadTree's CUDA kernels, not in Table IV's count
    for r in res.values():
        if r["name"] in paper:
            flops = r["flops"] - fine_level.get(r["name"], 0)
            assert (round(r["params"] / 1e6, 2), round(flops / 1e6, 1)) == paper[r["name"]], r["name"]
        assert r["cpu_img_s"] > 0 and r["cpu_rounds"] == 1
    assert "| QuadTree | 5.33 | 622.9 |" in out and "| 5.33 | 613.3* |" in out
    assert "\n* QuadTree: Table IV's FLOPs leave out QuadTree's fine level" in out
    assert png_size(tmp_path / "attention_table.png")[0] > 500
    assert "GPU" not in out or torch.cuda.is_available()


def test_benchmark_attention_resolutions_smoke(tmp_path):
    threads = torch.get_num_threads()
    load_script("benchmark_attention.py")["main"](["--smoke", "--resolutions", "64,32", "--methods",
                                                   "hilo,msa,linformer", "--dim", "64", "--heads", "4",
                                                   "--threads", "1", "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads
    res = json.loads((tmp_path / "attention_resolutions.json").read_text())["results"]
    for key in ("hilo", "msa", "linformer"):
        pts = res[key]["points"]
        assert [p["res"] for p in pts] == [32, 64] and [p["side"] for p in pts] == [2, 4]
        assert all(p["status"] == "ok" and p["img_s"] > 0 for p in pts)
        assert all(isinstance(p["train_mem_mb"], float) and isinstance(p["test_mem_mb"], float) for p in pts)
        assert pts[1]["flops"] > pts[0]["flops"]
    # MSA: 4 N D^2 + 2 N^2 D with N = 16 tokens, D = 64
    assert res["msa"]["points"][1]["flops"] == 4 * 16 * 64 * 64 + 2 * 16 * 16 * 64
    assert png_size(tmp_path / "attention_resolutions.png")[0] > 500


def test_round_robin_marks_oom_and_resolution_sweep_skips_larger_sizes():
    mod = load_script("benchmark_attention.py")
    calls = []

    def ok():
        calls.append("ok")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    times, errors = mod["round_robin"]({"a": ok, "b": oom}, "cpu", rounds=3, warmup=1)
    assert errors == {"b": "OOM"} and len(times["a"]) == 3 and times["b"] == []
    with pytest.raises(ValueError):  # anything that is not an allocation failure propagates
        mod["round_robin"]({"c": lambda: (_ for _ in ()).throw(ValueError("bug"))}, "cpu", rounds=1, warmup=1)
    assert mod["is_oom"](RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))

    class Big(torch.nn.Module):  # "runs out of memory" at the benchmark batch on maps larger than 2x2
        def forward(self, x):
            if x.shape[0] > 1 and x.shape[1] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return x

    args = mod["parse_args"](["--smoke", "--dim", "8", "--heads", "2", "--no-memory"])
    methods = {"big": ("Big", lambda s: Big()), "id": ("Id", lambda s: torch.nn.Identity())}
    res = mod["run_resolutions"](args, methods, torch.device("cpu"), [32, 64, 128])
    assert [p["status"] for p in res["big"]["points"]] == ["ok", "OOM"]  # 128 never tried
    assert [p["status"] for p in res["id"]["points"]] == ["ok", "ok", "ok"]
    assert "| Big | 64 | 4x4 |" in mod["resolutions_markdown"](res, args)


# ---- summarize_sweep (Fig. 4 / Table II) --------------------------------------------------------------------

def _fake_run(run_dir: Path, alpha, ws, summary: dict | None, layout: str):
    cfg = {"name": "litv2_s", "hilo": {"alpha": alpha, "window_size": ws}, "data": {"img_size": 32},
           "model": {"name": "litv2_s", "attention": "hilo", "alpha": "${hilo.alpha}",
                     "local_ws": [0, 0, "${hilo.window_size}", 1], "img_size": "${data.img_size}"}}
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))  # Hydra's copy: unresolved
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"hilo.alpha={alpha}",
                                                                         f"hilo.window_size={ws}"]))
    if layout == "engine":  # train.py's resolved copy
        resolved = {**cfg, "model": {**cfg["model"], "alpha": alpha, "local_ws": [0, 0, ws, 1], "img_size": 32}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("layout", ["local", "submitit"])
def test_summarize_sweep_2x2(tmp_path, layout, capsys):
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    runs = []
    for i, (alpha, ws) in enumerate([(0.5, 2), (0.5, 4), (0.9, 2), (0.9, 4)]):
        summary = {"status": "completed", "model": "litv2_s", "final_top1": 50.0 + i, "final_top5": 90.0,
                   "best_top1": 60.0 + i, "best_top5": 95.0, "best_epoch": 2, "epochs": 3, "params": 27_838_000,
                   "gflops": 3.7 - 0.1 * i, "throughput": 100.0 + i, "train_mem_mb": 512.0, "test_mem_mb": 128.0}
        if i == 1:
            del summary["train_mem_mb"], summary["test_mem_mb"]  # tolerated: blank cells
        if i == 3:
            summary = None  # crashed / still running
        if layout == "local":
            run_dir = sweep / str(i)
        else:
            run_dir = sweep / f"{i}_hilo.alpha={alpha},hilo.window_size={ws}"
            (sweep / ".submitit" / f"1234_{i}").mkdir(parents=True)
            (sweep / ".submitit" / f"1234_{i}" / f"1234_{i}_0_result.pkl").write_bytes(b"x")
        _fake_run(run_dir, alpha, ws, summary, "engine" if layout == "local" else "hydra")
        runs.append(run_dir)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    load_script("summarize_sweep.py")["main"]([str(sweep)])
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [r["run"] for r in rows] == [p.name for p in runs]
    assert [(float(r["alpha"]), int(r["window_size"])) for r in rows] == [(0.5, 2), (0.5, 4), (0.9, 2), (0.9, 4)]
    assert [r["top1"] for r in rows] == ["60", "61", "62", ""]
    assert [r["top1_final"] for r in rows[:3]] == ["50", "51", "52"]
    assert rows[0]["img_s"] == "100" and rows[0]["gflops"] == "3.7" and rows[0]["params_m"] == "27.84"
    assert rows[0]["train_mem_mb"] == "512" and rows[1]["train_mem_mb"] == "" and rows[1]["test_mem_mb"] == ""
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["incomplete"]
    assert (sweep / "sweep_summary.md").read_text().count("\n| ") == 5  # header + 4 runs
    assert "| 0.9 | 4 |" in out
    w, h = png_size(sweep / "sweep_summary.png")
    assert w > 800 and h > 400


def test_summarize_sweep_rejects_empty_dir(tmp_path):
    with pytest.raises(SystemExit, match="no run directories"):
        load_script("summarize_sweep.py")["main"]([str(tmp_path)])


# ---- visualize_freq (Fig. 5, Algorithm 1) -------------------------------------------------------------------

def test_visualize_freq_two_rows_and_energy_fractions(tmp_path, capsys):
    png, js = tmp_path / "freq.png", tmp_path / "freq.json"
    load_script("visualize_freq.py")["main"](
        ["--model", "litv2_s", "--model-kwargs", str(FIXTURES / "tiny_a05_ws2.json"), "--checkpoint",
         str(FIXTURES / "tiny_a05_ws2.pth"), "--digits", "-n", "12", "--batch-size", "6", "--stage", "2", "--block",
         "1", "--out", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert png_size(png) == (1600, 440)  # 8 channels x 2 rows at figsize (16, 4.4), dpi 100
    result = json.loads(js.read_text())
    assert result["num_images"] == 12 and result["map_size"] == [4, 4]  # 64x64 input, stage 3 = 1/16
    fracs = result["branches"]
    assert set(fracs) == {"Hi-Fi", "Lo-Fi"} and fracs["Hi-Fi"]["channels"] == 32 and fracs["Lo-Fi"]["channels"] == 32
    for branch in fracs.values():
        for key in ("high_freq_fraction", "high_freq_fraction_ac"):
            assert 0.0 <= branch[key] <= 1.0
    # the paper's claim as a number: Hi-Fi output carries more energy outside the low-frequency disc
    assert fracs["Hi-Fi"]["high_freq_fraction"] > fracs["Lo-Fi"]["high_freq_fraction"]
    assert "Hi-Fi" in out and "Lo-Fi" in out


def test_visualize_freq_rejects_block_without_hilo_branches(tmp_path):
    main = load_script("visualize_freq.py")["main"]
    base = ["--model", "litv2_s", "--model-kwargs", str(FIXTURES / "tiny_a05_ws2.json"), "-n", "1",
            "--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit, match="not both HiLo branches"):  # stage 4: s = 1, all heads Lo-Fi
        main(base + ["--stage", "3"])
    with pytest.raises(SystemExit, match="out of range"):
        main(base + ["--stage", "2", "--block", "5"])


def test_visualize_freq_reads_the_run_config_next_to_a_checkpoint(tmp_path):
    """A train.py checkpoint brings its model, input size and normalisation from the run dir's config.yaml."""
    import shutil
    kwargs = json.loads((FIXTURES / "tiny_a05_ws2.json").read_text())["constructor_kwargs"]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "tiny_a05_ws2.pth", run / "best.pth")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": "litv2_s", **{k: v for k, v in kwargs.items() if k != "num_classes"}, "img_size": 32},
        "data": {"img_size": 32, "num_classes": 10, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    result = load_script("visualize_freq.py")["main"](["--checkpoint", str(run / "best.pth"), "--digits", "-n", "4",
                                                       "--out", str(tmp_path / "q.png")])
    assert result["model"] == "litv2_s" and result["map_size"] == [2, 2]  # 32x32 input from the run config
    assert (tmp_path / "q.png").is_file()


def test_spectrum_accumulator_algorithm_1_and_band_energy():
    acc_cls = load_script("visualize_freq.py")["SpectrumAccumulator"]
    torch.manual_seed(0)
    x = torch.randn(3, 6, 6, 5)  # (B, H, W, C) as the hooks see it
    acc = acc_cls(0.25)
    acc.update(x[:2])
    acc.update(x[2:])
    # Algorithm 1, with the shift restricted to the spatial dims (its bare fftshift() also rolls the channels)
    ref = torch.log(torch.abs(torch.fft.fftshift(torch.fft.fft2(x.permute(0, 3, 1, 2)), dim=(-2, -1)))).mean(0)
    torch.testing.assert_close(acc.mean_log_magnitude, ref, atol=1e-5, rtol=1e-5)
    const = acc_cls(0.25)
    const.update(torch.ones(2, 8, 8, 3))
    assert const.fractions()["high_freq_fraction"] == pytest.approx(0.0, abs=1e-12)
    checker = acc_cls(0.25)  # +-1 checkerboard: all energy at the Nyquist corner
    idx = torch.arange(8)
    checker.update(((-1.0) ** (idx[:, None] + idx[None, :]))[None, :, :, None].expand(2, 8, 8, 3))
    assert checker.fractions()["high_freq_fraction"] == pytest.approx(1.0)


# ---- benchmark_models --------------------------------------------------------------------------------------

def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """--malloc keep: a freed 64 MiB block is soon reused from the heap, not mapped and faulted in again."""
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(SCRIPTS)!r})
from _bench_common import keep_freed_memory

def faults_of_late_allocations():  # the heap settles after a few rounds of aligned 64 MiB blocks
    counts = []
    for i in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20)  # 64 MiB, written once, freed at once
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[-4:])

default = faults_of_late_allocations()
assert keep_freed_memory()
print(default, faults_of_late_allocations())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, kept = map(int, proc.stdout.split())
    if default < 4 * 4000:  # 4 x 64 MiB of 4 KiB pages are 65536 faults; transparent huge pages need few
        pytest.skip(f"large blocks fault in huge pages on this machine ({default} faults)")
    assert kept < default / 10


def test_benchmark_models_smoke(tmp_path, capsys):
    load_script("benchmark_models.py")["main"](["--smoke", "--models", "litv2_s,faster_vit_0_224", "--out-dir",
                                                str(tmp_path)])
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "benchmark_models.json").read_text())
    rows = payload["rows"]
    assert list(rows) == ["litv2_s", "faster_vit_0_224"]
    import timm

    import litv2  # noqa: F401
    assert rows["litv2_s"]["params"] == sum(p.numel() for p in timm.create_model("litv2_s").parameters())
    assert rows["litv2_s"]["cpu_ratio"] == 1.0
    for r in rows.values():
        assert r["gflops"] > 0 and r["cpu_img_s"] > 0 and 0 < r["cpu_pct_peak"]
    assert payload["matmul_peak_gflops"]["cpu"] > 0
    assert "| litv2_s | 27.8 |" in out and "% of the measured fp32 matmul peak" in out


def watch_created_models(monkeypatch, watcher) -> list:
    """Patch ``timm.create_model``: for each model created, ``watcher(name, model)`` returns a function of
    ``(module, inputs)`` whose result is recorded before every forward. Returns the list of records."""
    import timm

    create, seen = timm.create_model, []

    def create_and_watch(name, *args, **kwargs):
        model = create(name, *args, **kwargs)
        observe = watcher(name, model)
        model.register_forward_pre_hook(lambda mod, inputs: seen.append(observe(mod, inputs)))
        return model

    monkeypatch.setattr(timm, "create_model", create_and_watch)
    return seen


def test_benchmark_models_channels_last_gives_every_model_channels_last_weights_and_input(tmp_path, capsys,
                                                                                        monkeypatch):
    def watcher(name, model):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        return lambda mod, inputs: (name, inputs[0].is_contiguous(memory_format=torch.channels_last),
                                    conv.weight.is_contiguous(memory_format=torch.channels_last))

    seen = watch_created_models(monkeypatch, watcher)
    load_script("benchmark_models.py")["main"](["--smoke", "--no-peak", "--channels-last", "--models",
                                                "litv2_s,resnet18", "--out-dir", str(tmp_path)])
    timed = {name: (x_cl, w_cl) for name, x_cl, w_cl in seen}  # the last call of each: a timed one
    assert timed == {"litv2_s": (True, True), "resnet18": (True, True)}  # (FLOP counting runs before, in NCHW)
    assert "; channels-last" in capsys.readouterr().out


def test_benchmark_models_measures_each_models_memory_alone_on_the_device(tmp_path, monkeypatch):
    """GPU peak memory counts every tensor on the device: no other model's weights may be there meanwhile
    (on an H100, LITv2-S's test memory read 1319 MiB measured first of five models, 988 MiB third of four).
    Checked on CPU through the moves: ``.to(device)`` before a model's measurement, ``.cpu()`` after."""
    names, last_move, seen = {}, {}, []

    def watcher(name, model):
        names[id(model)] = name
        return lambda mod, inputs: None

    watch_created_models(monkeypatch, watcher)
    to, cpu = torch.nn.Module.to, torch.nn.Module.cpu

    def record(kind, method):
        def moved(self, *args, **kwargs):
            if id(self) in names:
                last_move[names[id(self)]] = kind
            return method(self, *args, **kwargs)
        return moved

    monkeypatch.setattr(torch.nn.Module, "to", record("device", to))
    monkeypatch.setattr(torch.nn.Module, "cpu", record("cpu", cpu))
    script = load_script("benchmark_models.py")
    script["main"].__globals__["peak_memory_mb"] = lambda m, *a: seen.append((names[id(m)], dict(last_move))) or 1.0
    script["main"](["--smoke", "--no-peak", "--train", "--memory", "--models", "litv2_s,resnet18",
                    "--out-dir", str(tmp_path)])
    assert [name for name, _ in seen] == ["litv2_s", "resnet18"] * 2  # inference, then train
    for name, moves in seen:
        assert moves == {n: "device" if n == name else "cpu" for n in ("litv2_s", "resnet18")}

def test_benchmark_models_compile_adds_a_compiled_row_per_model(tmp_path, monkeypatch):
    # Dynamo's eager backend stands in for inductor (inductor on LITv2: test_models.py's `inductor` test)
    compile_, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: compiled.append(kw) or compile_(model, **kw, backend="eager"))
    import torch._inductor.config as inductor_config

    payload = load_script("benchmark_models.py")["main"](["--smoke", "--no-peak", "--compile", "--memory", "--models",
                                                         "resnet18", "--inductor-freezing", "--out-dir", str(tmp_path)])
    assert inductor_config.freezing is False  # set for the run only
    rows = payload["rows"]
    assert list(rows) == ["resnet18", "resnet18@compile"] and compiled == [{"dynamic": False}]
    assert rows["resnet18@compile"]["params"] == rows["resnet18"]["params"]
    assert rows["resnet18@compile"]["gflops"] == rows["resnet18"]["gflops"]
    for r in rows.values():
        assert r["cpu_img_s"] > 0 and isinstance(r["cpu_mem_mb"], float)
    assert "| resnet18@compile |" in (tmp_path / "benchmark_models.md").read_text()


def test_benchmark_models_memory_compares_train_and_test_memory_with_swin_t(tmp_path, capsys):
    payload = load_script("benchmark_models.py")["main"](["--smoke", "--no-peak", "--memory", "--train", "--models",
                                                         "litv2_s,swin_tiny_patch4_window7_224",
                                                         "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for r in payload["rows"].values():
        assert r["cpu_mem_mb"] > 0 and r["cpu_train_mem_mb"] > r["cpu_mem_mb"]  # activations kept + gradients
    ours, swin = payload["rows"]["litv2_s"], payload["rows"]["swin_tiny_patch4_window7_224"]
    ratio = ours["cpu_train_mem_mb"] / swin["cpu_train_mem_mb"]
    assert f"litv2_s CPU train memory at batch 2: {ratio:.2f}x swin_tiny_patch4_window7_224's" in out
    assert "CPU train mem (MiB)" in out and "CPU test mem (MiB)" in out


def test_benchmark_models_times_fastervit_inference_in_its_deploy_mode_and_trains_it_without(tmp_path, capsys,
                                                                                             monkeypatch):
    def watcher(name, model):
        attn = [m for m in model.modules() if hasattr(m, "switch_to_deploy")]
        assert attn
        return lambda mod, inputs: ("train" if mod.training else "eval", tuple(sorted({m.deploy for m in attn})))

    seen = watch_created_models(monkeypatch, watcher)
    load_script("benchmark_models.py")["main"](["--smoke", "--no-peak", "--train", "--models", "faster_vit_0_224",
                                                "--out-dir", str(tmp_path)])
    # FLOP count (eval, not deploy), the deploy-filling forward, timed inference in deploy, training without
    assert seen[-1] == ("train", (False,)) and ("eval", (True,)) in seen
    assert all(deploy == (False,) for mode, deploy in seen if mode == "train")
    assert "; FasterViT in deploy mode at inference" in capsys.readouterr().out


# ---- benchmark_dtm -----------------------------------------------------------------------------------------

def test_benchmark_dtm_smoke_times_all_three_kernels_on_every_dtm_and_they_agree(tmp_path, capsys):
    threads = torch.get_num_threads()
    payload = load_script("benchmark_dtm.py")["main"](["--smoke", "--threads", "1", "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads  # main() puts the caller's thread count back
    results = payload["results"]
    # litv2_s at 64x64: 16x16x96 -> 192, 8x8x192 -> 384, 4x4x384 -> 768
    assert [r["input"] for r in results] == [[96, 16, 16], [192, 8, 8], [384, 4, 4]]
    assert [r["weight"][:2] for r in results] == [[192, 96], [384, 192], [768, 384]]
    kernels = {"torchvision", "grid_sample", "embedding_bag"}
    for r in results:
        assert set(r["ms"]) == {f"{k} {what}" for k in kernels for what in ("fwd", "fwd+bwd")}
        assert all(v > 0 for v in r["ms"].values()) and set(r["speedup"]) == kernels
        assert r["speedup"]["torchvision"] == {"fwd": 1.0, "fwd+bwd": 1.0}
        assert r["speedup"]["embedding_bag"]["fwd"] == r["ms"]["torchvision fwd"] / r["ms"]["embedding_bag fwd"]
        assert r["max_abs_diff"]["torchvision"] == 0
        assert all(d < 1e-4 for d in r["max_abs_diff"].values())  # same function, off-grid offsets
    out = capsys.readouterr().out
    for k in kernels:
        assert f"| cpu | layers.1.downsample.dconv | 192x8x8 -> 384 | {k} |" in out
    with pytest.raises(SystemExit, match="must be a LITv2 model"):
        load_script("benchmark_dtm.py")["main"](["--smoke", "--model", "resnet50", "--out-dir", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("script", ["benchmark_models.py", "benchmark_attention.py", "benchmark_dtm.py"])
def test_benchmarks_asked_for_cuda_without_it_fail_in_one_line(script, tmp_path):
    with pytest.raises(SystemExit, match="--devices asks for cuda but CUDA is not available"):
        load_script(script)["main"](["--devices", "cuda", "--out-dir", str(tmp_path)])


# ---- ablate_cpu_paths --------------------------------------------------------------------------------------

def test_ablate_cpu_paths_smoke_times_every_step_and_restores_the_flags(tmp_path, capsys):
    from litv2.accel import Flags

    before = dict(vars(Flags))
    payload = load_script("ablate_cpu_paths.py")["main"](["--smoke", "--out-dir", str(tmp_path)])
    assert dict(vars(Flags)) == before
    rates = payload["img_per_s"]
    assert list(rates)[0] == "plain kernels" and list(rates)[-1].endswith("= default") and len(rates) == 6
    assert all(r > 0 for r in rates.values())
    out = capsys.readouterr().out
    assert "| plain kernels |" in out and "| 1.00 |" in out
    assert (tmp_path / "ablate_cpu_paths.md").read_text().startswith("litv2_s, CPU fp32 inference, batch 2")
    with pytest.raises(SystemExit, match="must be a LITv2 model"):
        load_script("ablate_cpu_paths.py")["main"](["--smoke", "--model", "resnet50", "--out-dir", str(tmp_path)])


# ---- shared benchmark helpers --------------------------------------------------------------------------------

def test_round_robin_times_back_to_back_calls_per_sample():
    common = load_script("_bench_common.py")
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    times, errors = common["round_robin"]({n: make(n) for n in calls}, "cpu", rounds=3, warmup=1,
                                          calls_per_sample=4)
    assert not errors and calls == {"a": (1 + 3) * 4, "b": (1 + 3) * 4}  # warm-up samples too
    assert all(len(t) == 3 for t in times.values())


def test_gpu_calls_apply_to_gpu_samples_only_and_cudnn_autotune_to_cuda_runs():
    import argparse

    common = load_script("_bench_common.py")
    parser = argparse.ArgumentParser()
    common["add_gpu_options"](parser)
    args = parser.parse_args(["--gpu-calls", "7"])
    assert common["calls_per_sample"]("cuda", args) == 7 and common["calls_per_sample"]("cpu", args) == 1
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        common["cudnn_autotune"]([torch.device("cpu")])
        assert torch.backends.cudnn.benchmark is False
        common["cudnn_autotune"]([torch.device("cpu"), torch.device("cuda")])
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


def test_benchmark_models_litv2_variants_set_the_ffn_recompute_options():
    build = load_script("benchmark_models.py")["build_model"]

    def options(name):
        ffns = [b.mlp for s in build(name, 64).layers for b in s.blocks]
        assert ffns
        return {(f.recompute_gelu, f.recompute_dwconv) for f in ffns}

    assert options("litv2_s") == {(True, False)}
    assert options("litv2_s@keep-gelu") == {(False, False)}
    assert options("litv2_s@recompute-dwconv") == {(True, True)}
    assert options("litv2_s@keep-gelu@recompute-dwconv") == {(False, True)}
    from litv2.accel import is_accelerated

    assert is_accelerated(build("litv2_s", 64)) and not is_accelerated(build("litv2_s@plain", 64))
    assert not is_accelerated(build("resnet18", 64))  # peers run as timm ships them
    for name in ("resnet18@keep-gelu", "resnet18@recompute-dwconv", "resnet18@plain"):
        with pytest.raises(SystemExit, match="LITv2 models only"):
            build(name, 64)


def test_benchmark_attention_dat_groups_divide_the_heads():
    """DAT-T's 4 heads per offset group (3 groups at Table IV's 12 heads); any --heads gets a divisor."""
    groups = load_script("benchmark_attention.py")["dat_groups"]
    assert [groups(h) for h in (12, 24, 4, 6, 9, 1)] == [3, 6, 1, 1, 1, 1]
    assert all(h % groups(h) == 0 for h in range(1, 40))
