"""CUDA graphs and compile modes: the config checks (CPU), and graph replay against eager (GPU, marked gpu)."""
import pytest
import torch

from engine_utils import compose

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("overrides,message", [
    (["trainer.compile_mode=fast"], "trainer.compile_mode='fast' is not one of default, reduce-overhead"),
    (["trainer.compile_mode=max-autotune"], "trainer.compile_mode=max-autotune needs trainer.compile=true"),
    (["trainer.cuda_graphs=1"], "trainer.cuda_graphs=1 must be true or false"),
    (["trainer.cuda_graphs=true", "trainer.device=cpu"], "trainer.cuda_graphs=true needs a CUDA device"),
    (["trainer.cuda_graphs=true", "trainer.compile=true", "trainer.compile_mode=reduce-overhead",
      "trainer.device=cuda"], "both capture CUDA graphs"),
])
def test_bad_compile_and_graph_options_are_one_line_errors(overrides, message):
    from litv2.engine.builders import check_config
    from litv2.errors import UserError

    for config in ("config", "eval"):
        with pytest.raises(UserError) as e:
            check_config(compose(overrides, config), training=config == "config")
        assert message in str(e.value) and "\n" not in str(e.value)


def test_cuda_graphs_on_auto_without_cuda_say_so(monkeypatch):
    from litv2.engine.builders import check_config
    from litv2.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA device .*no CUDA here"):
        check_config(compose(["trainer.cuda_graphs=true"]))


def test_good_compile_options_pass_and_reach_torch_compile(monkeypatch):
    from litv2.engine import builders

    for mode in builders.COMPILE_MODES:
        cfg = compose(["trainer.compile=true", f"trainer.compile_mode={mode}"])
        builders.check_config(cfg)
        seen = {}
        monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.update(kw) or m)
        builders.compile_model(torch.nn.Identity(), cfg.trainer)
        assert seen == ({"dynamic": False} if mode == "default" else {"dynamic": False, "mode": mode})
    assert compose([]).trainer.cuda_graphs is False and compose([]).trainer.compile_mode == "default"


def test_graphed_forward_refuses_cpu_tensors_in_one_line():
    from litv2.accel.cudagraphs import GraphedForward, GraphsUnavailable

    with pytest.raises(GraphsUnavailable, match="CUDA graphs run on CUDA devices, not on cpu"):
        GraphedForward(torch.nn.Identity())(torch.ones(2))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernels", [None, "triton"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_replay_equals_eager_and_a_partial_last_batch_runs_eagerly(tiny, precision, kernels, monkeypatch):
    """Also on the Triton kernels (model.kernels=triton): their launches are captured and replayed like torch's."""
    from litv2.accel import accelerate
    from litv2.accel.cudagraphs import GraphedForward
    from litv2.engine.evaluate import autocast, evaluate

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = torch.device("cuda")
    model = accelerate(tiny().to(device), kernels=kernels).eval()
    graphed = GraphedForward(model)
    torch.manual_seed(1)
    batches = [torch.randn(8, 3, 32, 32, device=device) for _ in range(3)] + [torch.randn(5, 3, 32, 32, device=device)]
    with torch.no_grad(), autocast(device, precision):
        for x in batches:
            assert torch.equal(graphed(x), model(x))
    assert graphed.captures == 1 and graphed.replays == 3  # the batch of 5 ran eagerly

    targets = [torch.randint(0, 10, (len(x),), device=device) for x in batches]
    loader = [(x, t, 0) for x, t in zip(batches, targets)]
    eager = evaluate(model, loader, device, precision)
    graphs = evaluate(model, loader, device, precision, cuda_graphs=True)
    for key in ("top1", "top5", "images", "skipped_images"):  # the counts: identical
        assert graphs[key] == eager[key]
    assert graphs["images"] == 29 and graphs["loss"] == pytest.approx(eager["loss"], rel=1e-6)


class HostSync(torch.nn.Module):
    """A forward that reads a value on the host: it cannot be captured in a CUDA graph."""

    def forward(self, x):
        return x * float(x.abs().max().item() > 0)


@pytest.mark.gpu
@needs_cuda
def test_a_forward_that_cannot_be_captured_is_one_error_or_runs_eagerly():
    from litv2.accel.cudagraphs import CaptureFailed, GraphedForward

    x = torch.randn(4, 3, device="cuda")
    with pytest.raises(CaptureFailed, match="CUDA graph capture of HostSync failed"):
        GraphedForward(HostSync())(x)
    graphed = GraphedForward(HostSync(), fallback=True)
    for _ in range(2):
        assert torch.equal(graphed(x), x) and graphed.failed and graphed.captures == 0


def test_reduce_overhead_training_marks_each_step_for_cudagraph_trees(tmp_path, monkeypatch):
    """trainer.compile_mode=reduce-overhead reaches torch.compile, and each micro-batch begins a new CUDA-graph step
    (no output of the last one is read again); the stand-in compile returns the model as it is."""
    from engine_utils import FAST, TINY_LITV2, train_in_process

    compiled, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    summary = train_in_process(["data=synthetic", "aug=none", "data.img_size=32", "data.batch_size=2",
                                "data.train_size=4", "data.val_size=2", "trainer.max_steps=1", "trainer.accum_steps=2",
                                "trainer.compile=true", "trainer.compile_mode=reduce-overhead", *TINY_LITV2, *FAST],
                               tmp_path)
    assert summary["steps"] == 1 and compiled == [{"dynamic": False, "mode": "reduce-overhead"}] and len(marks) == 2
