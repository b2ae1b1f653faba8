"""The authors' released weights: the pretrained cfgs (URLs, top-1, the alpha table), timm's download path against
a loopback HTTP server (the cache, corrupt and failed downloads), the CLI's pretrained / URL options, and the hub
export. No internet: the release-format tiny checkpoint is served from 127.0.0.1 under a release file name."""
import http.server
import json
import threading

import pytest
import timm
import torch

import litv2  # noqa: F401  (registers the models)
from litv2.errors import UserError, WeightsError
from litv2.models import HiLoSplitError, load_checkpoint
from litv2.profiling import count_flops

from engine_utils import (FAST, FIXTURES, ROOT, TINY_LITV2, compose, load_state, make_digits_subset, train_in_process,
                          user_error_line)

V10, V11 = "https://github.com/ziplab/LITv2/releases/download/v1.0/", \
    "https://github.com/ziplab/LITv2/releases/download/v1.1/"
# issue 20's table: name -> (URL, ImageNet-1K top-1 %)
RELEASED = {
    "litv2_s": (V10 + "litv2_s.pth", 82.0), "litv2_m": (V10 + "litv2_m.pth", 83.3),
    "litv2_b": (V10 + "litv2_b.pth", 83.6), "litv2_b_384": (V10 + "litv2_b_384.pth", 84.7),
    "litv2_s_alpha0": (V11 + "alpha_0.pth", 81.16), "litv2_s_alpha0_2": (V11 + "alpha_0.2.pth", 81.89),
    "litv2_s_alpha0_4": (V11 + "alpha_0.4.pth", 81.81), "litv2_s_alpha0_5": (V11 + "alpha_0.5.pth", 81.88),
    "litv2_s_alpha0_7": (V11 + "alpha_0.7.pth", 81.94), "litv2_s_alpha0_9": (V11 + "alpha_0.9.pth", 82.03),
    "litv2_s_alpha1": (V11 + "alpha_1.pth", 81.89),
}
# alpha, published GFLOPs, stage-3 Lo-Fi / Hi-Fi heads
ALPHA_TABLE = [("litv2_s_alpha0", 0.0, 3.97, (0, 12)), ("litv2_s_alpha0_2", 0.2, 3.88, (2, 10)),
               ("litv2_s_alpha0_4", 0.4, 3.82, (4, 8)), ("litv2_s_alpha0_5", 0.5, 3.77, (6, 6)),
               ("litv2_s_alpha0_7", 0.7, 3.74, (8, 4)), ("litv2_s_alpha0_9", 0.9, 3.73, (10, 2)),
               ("litv2_s_alpha1", 1.0, 3.70, (12, 0))]


# ---- the loopback server -------------------------------------------------------------------------------------

class Release:
    """An HTTP server on 127.0.0.1 serving ``files`` (name -> bytes) and counting the requests per path.
    ``truncate`` (a set of names): send the full Content-Length but only half the bytes, then hang up; ``stall``:
    the same, then send nothing more until the server closes."""

    def __init__(self):
        self.files, self.truncate, self.stall, self.requests = {}, set(), set(), []
        self.closing = threading.Event()
        release = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                release.requests.append(name)
                if name not in release.files:
                    self.send_error(404)
                    return
                body = release.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in release.truncate | release.stall else body)
                if name in release.stall:
                    self.wfile.flush()
                    release.closing.wait(120)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def release(monkeypatch, tmp_path):
    """A loopback release server, with TORCH_HOME (torch.hub's cache) in a fresh tmp dir and no proxy for it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    server = Release()
    server.files["alpha_0.5.pth"] = (FIXTURES / "tiny_a05_ws2.pth").read_bytes()
    yield server
    server.close()


def _cache(tmp_path):
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _closed_port_url(name: str) -> str:
    import socket

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def _tiny_pretrained(release_tiny, url, name="litv2_s_alpha0_5", **overrides):
    """The tiny release model through timm's pretrained path, its cfg's URL pointed at ``url``."""
    kwargs, _, _ = release_tiny
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url, num_classes=10),
                             **{**kwargs, **overrides}).eval()


# ---- the pretrained cfgs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_pretrained_cfg_names_the_authors_file_and_its_top1(name):
    url, top1 = RELEASED[name]
    cfg = timm.models.get_pretrained_cfg(name).to_dict()  # the default tag's
    assert cfg["url"] == url and not cfg.get("hf_hub_id")
    assert f"top-1 {top1} %" in cfg["description"]
    assert timm.is_model_pretrained(name)


def test_the_384_recipe_starts_from_the_224_litv2_b_release():
    """experiment=litv2_b_384_ft model.pretrained=true: the litv2_b_384 model with litv2_b.pth (the paper
    fine-tunes the 224 model); model=litv2_b_384 pretrained=true is the fine-tuned litv2_b_384.pth."""
    from litv2.engine.weights import pretrained_url

    cfg = compose(["experiment=litv2_b_384_ft", "model.pretrained=true"])
    assert cfg.model.name == "litv2_b_384" and pretrained_url(cfg) == V10 + "litv2_b.pth"
    assert pretrained_url(compose(["model=litv2_b_384", "model.pretrained=true"])) == V10 + "litv2_b_384.pth"
    assert timm.models.get_pretrained_cfg("litv2_b_384.in1k_224").url == V10 + "litv2_b.pth"


@pytest.mark.parametrize("name,alpha,gflops,split", ALPHA_TABLE)
def test_alpha_variants_match_the_release_table(name, alpha, gflops, split):
    """Each alpha's LITv2-S: FLOPs at 224 vs the table, and the stage-3 Lo-Fi / Hi-Fi head split."""
    model = timm.create_model(name)
    assert model.alpha == [alpha] * 4
    assert {(b.attn.l_heads, b.attn.h_heads) for b in model.layers[2].blocks} == {split}
    assert {(b.attn.l_heads, b.attn.h_heads) for b in model.layers[3].blocks} == {(24, 0)}  # stage 4: MSA
    flops = count_flops(model, 224) / 1e9
    if alpha < 1.0:
        assert abs(flops - gflops) / gflops < 0.01, (flops, gflops)
    else:
        # The table's 3.70 G for alpha 1 is 1.3 % below the count (3.747 G; the authors' HiLo.flops formula gives
        # the same), which rises from alpha 0.9 to 1: Lo-Fi heads cost more than Hi-Fi ones at 14x14. 3.70 is
        # the count without stage 3's Lo-Fi attention products (q k^T, attn v). Pinned here, see docs/weights.md.
        assert 0.012 < (flops - gflops) / gflops < 0.014, flops
        lofi_products = 6 * 2 * 196 * 49 * 384 / 1e9  # 6 blocks, 14x14 queries, 7x7 pooled keys, 384 channels
        assert round(flops - lofi_products, 2) == gflops


def test_an_alpha_variant_refuses_another_alpha():
    with pytest.raises(ValueError, match="litv2_s_alpha0_5 is LITv2-S at HiLo alpha=0.5"):
        timm.create_model("litv2_s_alpha0_5", alpha=0.9)
    assert timm.create_model("litv2_s_alpha0_5", alpha=0.5, embed_dim=16, depths=[1, 1, 2, 1],
                             num_heads=[1, 2, 4, 8]).alpha == [0.5] * 4


# ---- timm's download path, on loopback ------------------------------------------------------------------------

def test_pretrained_downloads_once_into_the_torch_cache_and_loads_like_the_file(release, release_tiny, tmp_path):
    kwargs, path, io = release_tiny
    url = release.url("alpha_0.5.pth")
    first = _tiny_pretrained(release_tiny, url)
    second = _tiny_pretrained(release_tiny, url)
    assert release.requests == ["alpha_0.5.pth"]  # the second call read the cache
    assert (_cache(tmp_path) / "alpha_0.5.pth").read_bytes() == path.read_bytes()
    direct = timm.create_model("litv2_s", **kwargs).eval()
    load_checkpoint(direct, path)
    with torch.no_grad():
        logits = first(io["input"])
        torch.testing.assert_close(second(io["input"]), logits, atol=0, rtol=0)
        torch.testing.assert_close(direct(io["input"]), logits, atol=0, rtol=0)
    torch.testing.assert_close(logits, io["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fault", ["truncated", "not a torch file"])
def test_a_corrupt_download_is_rejected_and_not_left_in_the_cache(fault, release, release_tiny, tmp_path):
    good = release.files["alpha_0.5.pth"]
    if fault == "truncated":
        release.truncate.add("alpha_0.5.pth")  # the connection drops halfway: torch.hub still caches the part
    else:
        release.files["alpha_0.5.pth"] = b"<html>rate limited</html>" * 50
    url = release.url("alpha_0.5.pth")
    with pytest.raises(WeightsError, match="is truncated or corrupt") as e:
        _tiny_pretrained(release_tiny, url)
    assert url in str(e.value) and "\n" not in str(e.value)
    assert not list(_cache(tmp_path).iterdir())  # neither the file nor a partial download
    release.truncate.clear()
    release.files["alpha_0.5.pth"] = good
    _tiny_pretrained(release_tiny, url)  # the next call downloads it again
    assert release.requests == ["alpha_0.5.pth"] * 2


def test_a_stalled_download_fails_after_the_timeout_and_caches_nothing(release, tmp_path):
    """The server sends half the file, then nothing: the download fails after download_timeout_s, not never."""
    from litv2 import hub

    release.stall.add("alpha_0.5.pth")
    url, outcome = release.url("alpha_0.5.pth"), []

    def download():
        try:
            hub.fetch(url, progress=False, timeout_s=1.0)
        except WeightsError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the download hangs"
    assert outcome and outcome[0].startswith(f"cannot download {url} (the server sent nothing for 1 s)"), outcome
    assert not _cache(tmp_path).exists() or not list(_cache(tmp_path).iterdir())


@pytest.mark.parametrize("where", ["no server", "404"])
def test_a_failed_download_is_one_line_naming_the_url_and_a_local_file(where, release, release_tiny, tmp_path):
    url = _closed_port_url("alpha_0.5.pth") if where == "no server" else release.url("missing/alpha_0.5.pth")
    with pytest.raises(WeightsError) as e:
        _tiny_pretrained(release_tiny, url)
    message = str(e.value)
    assert message.startswith(f"cannot download {url} (") and "\n" not in message
    assert "pretrained_cfg_overlay=dict(file='/path/alpha_0.5.pth')" in message
    assert not _cache(tmp_path).exists() or not list(_cache(tmp_path).iterdir())


def test_weights_of_another_alpha_are_one_clear_error(release, release_tiny, tmp_path):
    """The tiny file has 2 Lo-Fi / 2 Hi-Fi heads in stage 3 (alpha 0.5); a model at alpha 0.9 has 3 / 1."""
    kwargs, path, _ = release_tiny
    with pytest.raises(HiLoSplitError) as e:
        _tiny_pretrained(release_tiny, release.url("alpha_0.5.pth"), name="litv2_s", alpha=0.9)
    assert str(e.value) == ("the weights were trained with HiLo alpha=0.5 (2 Lo-Fi / 2 Hi-Fi heads in "
                            "layers.2.blocks.0.attn), the model was built with alpha=0.9 (3 / 1): build the model "
                            "with alpha=0.5 to load them")
    assert (e.value.file_alpha, e.value.model_alpha) == (0.5, 0.9)
    assert (_cache(tmp_path) / "alpha_0.5.pth").is_file()  # a good file: kept
    for alpha, split in ((0.0, r"\(0 / 4\)"), (1.0, r"\(4 / 0\)")):  # a branch without heads has no weights at all
        with pytest.raises(HiLoSplitError, match=rf"alpha=0.5 \(2 Lo-Fi / 2 Hi-Fi .* alpha={alpha:g} {split}"):
            load_checkpoint(timm.create_model("litv2_s", **{**kwargs, "alpha": alpha}), path)


# ---- the command line ------------------------------------------------------------------------------------------

def _small_data() -> list[str]:
    """A digits subset (make_digits_subset) as an ImageFolder at 32x32."""
    return ["data=folder", "data.num_classes=10", "data.img_size=32", "data.crop_pct=1.0"]


def _tiny_release_overrides(url: str) -> list[str]:
    return [*TINY_LITV2, "hilo.alpha=0.5", "hilo.window_size=2", f"++model.pretrained_cfg_overlay.url='{url}'",
            "++model.pretrained_cfg_overlay.num_classes=10"]


def test_eval_pretrained_true_evaluates_the_released_weights(release, release_tiny, digits, tmp_path):
    from litv2.engine import run_eval

    root = make_digits_subset(digits, tmp_path / "data", per_class_train=1, val_total=40)
    common = ["model.name=litv2_s_alpha0_5", *_small_data(), f"data.root={root}", "data.num_workers=0",
              "profile.enabled=false", *_tiny_release_overrides(release.url("alpha_0.5.pth"))]
    released = run_eval(compose(["pretrained=true", *common], config="eval"))
    from_file = run_eval(compose([f"checkpoint={FIXTURES / 'tiny_a05_ws2.pth'}", *common], config="eval"))
    assert released["images"] == from_file["images"] == 40
    assert (released["top1"], released["loss"]) == (from_file["top1"], from_file["loss"])
    assert release.requests == ["alpha_0.5.pth"]


def test_a_failed_download_stops_train_py_before_data_or_a_run_dir(tmp_path, capsys):
    """As train.py runs it (in-process; test_cli.py runs the one-line error path as a subprocess)."""
    from litv2.engine import train

    url = _closed_port_url("litv2_s.pth")
    run_dir = tmp_path / "runs" / "litv2_s" / "2026-01-01_00-00-00"  # as Hydra makes it
    run_dir.mkdir(parents=True)
    cfg = compose(["model.pretrained=true", f"++model.pretrained_cfg_overlay.url='{url}'",
                   "data.root=/nonexistent/imagenet", *FAST])
    line = user_error_line(capsys, train, cfg, run_dir=run_dir, fresh_dir=run_dir)
    assert line.startswith(f"error: cannot download {url} ("), line
    assert "++model.pretrained_cfg_overlay.file=/path/litv2_s.pth" in line
    assert not list((tmp_path / "runs").rglob("*")), "a failed start must leave no run dir behind"


def test_eval_download_and_alpha_errors_come_before_the_data(release, tmp_path):
    from litv2.engine import run_eval

    url = _closed_port_url("litv2_s.pth")
    bad_data = ["data.root=/nonexistent/imagenet", "profile.enabled=false"]
    with pytest.raises(UserError, match=f"cannot download {url} .*pass checkpoint=/path/litv2_s.pth instead of "
                                        "pretrained=true"):
        run_eval(compose(["pretrained=true", f"++model.pretrained_cfg_overlay.url='{url}'", *bad_data], "eval"))
    with pytest.raises(UserError, match=r"alpha=0.5 .*; on the command line: hilo.alpha=0.5 \(and "
                                        r"model.name=litv2_s_alpha0_5 .*\)"):
        run_eval(compose([*TINY_LITV2, "pretrained=true", *bad_data, "++model.pretrained_cfg_overlay.url="
                          f"'{release.url('alpha_0.5.pth')}'"], "eval"))
    with pytest.raises(UserError, match="model.name=litv2_s_alpha0_5 is LITv2-S at HiLo alpha=0.5, the config has "
                                        "model.alpha=0.9: add hilo.alpha=0.5"):
        run_eval(compose(["model.name=litv2_s_alpha0_5", "pretrained=true", *bad_data], "eval"))
    with pytest.raises(UserError, match="both give the starting weights"):
        run_eval(compose(["pretrained=true", "checkpoint=x.pth", *bad_data], "eval"))


def test_trainer_init_from_a_url_downloads_once_and_starts_from_it(release, digits, tmp_path):
    """optim.lr=0 (warmup and floor too): after one step the weights are still the file's (BatchNorm statistics
    aside); a second start takes the file from the cache; weights of another alpha stop the run before the data."""
    from litv2.engine.weights import fetch_start_weights

    url = release.url("alpha_0.5.pth")
    root = make_digits_subset(digits, tmp_path / "data", per_class_train=2, val_total=10)
    args = [f"trainer.init_from='{url}'", *TINY_LITV2, *_small_data(), "data.batch_size=4", "trainer.max_steps=1",
            "trainer.epochs=1", "optim.lr=0.0", "sched.warmup_lr=0.0", "sched.min_lr=0.0", "trainer.resume=none",
            f"paths.runs_root={tmp_path / 'runs'}", *FAST]
    train_in_process([*args, "hilo.alpha=0.5", f"data.root={root}"], tmp_path / "a")
    released = load_state(FIXTURES / "tiny_a05_ws2.pth")["model"]
    trained = load_state(tmp_path / "a" / "last.pth")["model"]
    for k, v in released.items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(trained[k], v), k
    cached = fetch_start_weights(compose([*args, "hilo.alpha=0.5"]), "train")
    assert cached == _cache(tmp_path) / "alpha_0.5.pth" and release.requests == ["alpha_0.5.pth"]
    with pytest.raises(UserError, match="trained with HiLo alpha=0.5 .* hilo.alpha=0.5"):
        train_in_process([*args, "hilo.alpha=0.9", "data.root=/nonexistent"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_the_384_recipe_runs_from_the_released_224_weights(release, digits, tmp_path):
    """experiment=litv2_b_384_ft model.pretrained=true, shrunk to the tiny model on digits (the tag's URL pointed
    at the loopback copy): the release is loaded through timm into the 384 model and trained."""
    root = make_digits_subset(digits, tmp_path / "data", per_class_train=2, val_total=10)
    summary = train_in_process([
        "experiment=litv2_b_384_ft", "model.pretrained=true", *_tiny_release_overrides(release.url("alpha_0.5.pth")),
        *_small_data(), f"data.root={root}", "data.batch_size=4", "trainer.precision=fp32",
        "trainer.max_steps=1", "trainer.epochs=1", f"paths.runs_root={tmp_path / 'runs'}", *FAST], tmp_path / "ft")
    assert summary["steps"] == 1 and release.requests == ["alpha_0.5.pth"]
    config = (tmp_path / "ft" / "config.yaml").read_text()
    assert "pretrained_cfg: in1k_224" in config and "pretrained: true" in config


# ---- scripts/export_hub.py ---------------------------------------------------------------------------------------

_FAST_REPORT = ["--batch-size", "2", "--runs", "1", "--warmup", "0", "--img-size", "64"]


def _export(*argv):
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "export_hub.py"), run_name="_test_export_hub")["main"](list(argv))


def test_export_a_release_file_loads_back_through_timm_local_dir(release_tiny, tmp_path):
    kwargs, path, io = release_tiny
    out = tmp_path / "hub"
    result = _export(str(path), str(out), "--model", "litv2_s_alpha0_5", "--model-args",
                     str(FIXTURES / "tiny_a05_ws2.json"), *_FAST_REPORT)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "litv2_s_alpha0_5" and config["num_classes"] == 10
    arch = config["model_args"]
    assert (arch["embed_dim"], arch["depths"], arch["num_heads"], arch["alpha"], arch["local_ws"]) == (
        16, [1, 1, 2, 1], [1, 2, 4, 8], 0.5, [0, 0, 2, 1])
    assert "top-1 81.88 %" in config["pretrained_cfg"]["description"]
    assert "url" not in config["pretrained_cfg"]
    card = (out / "README.md").read_text()
    report = result["report"]
    for text in ("library_name: timm", f"local-dir:{out}", "## Efficiency", f"{report['params']:,}",
                 f"| GFLOPs (multiply-accumulates) | {report['gflops']} |", "throughput (images/s)",
                 "train memory", report["machine"], "pan2022hilo"):
        assert text in card, text
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["logits"], atol=1e-4, rtol=0)
        direct = timm.create_model("litv2_s", **kwargs).eval()
        load_checkpoint(direct, path)
        torch.testing.assert_close(model(io["input"]), direct(io["input"]), atol=0, rtol=0)


def test_export_our_training_checkpoint_with_its_run_config(release_tiny, tmp_path):
    """A litv2-train-v1 checkpoint: architecture, classes and preprocessing from its config; --ema picks the EMA."""
    from omegaconf import OmegaConf

    from litv2.engine.checkpoint import FORMAT

    kwargs, path, io = release_tiny
    cfg = compose([*TINY_LITV2, "hilo.alpha=0.5", "data=digits", "data.img_size=64"])
    model_sd = load_state(path)["model"]
    ema_sd = {k: v * 0.5 if v.is_floating_point() else v for k, v in model_sd.items()}
    ckpt = tmp_path / "best.pth"
    torch.save({"format": FORMAT, "model": model_sd, "ema": ema_sd, "config": OmegaConf.to_container(cfg, resolve=True),
                "progress": {"best": {"top1": 97.5, "top5": 100.0, "epoch": 3}}}, ckpt)
    for ema, sd in ((False, model_sd), (True, ema_sd)):
        out = tmp_path / f"hub_ema{int(ema)}"
        _export(str(ckpt), str(out), *(["--ema"] if ema else []), *_FAST_REPORT)
        pcfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
        assert pcfg["input_size"] == [3, 64, 64] and pcfg["mean"] == [0.5, 0.5, 0.5] and pcfg["num_classes"] == 10
        assert "best val top-1 97.50 % (epoch 3)" in pcfg["description"] and ("EMA" in pcfg["description"]) == ema
        exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        source = timm.create_model("litv2_s", **kwargs).eval()
        source.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(exported(io["input"]), source(io["input"]), atol=0, rtol=0)
