"""Ahead-of-time compiles of the kernels for a GPU (Hopper, sm_90, by default) on a machine without one, and the
resources the compiled kernels take: what the tests check where no GPU runs the kernels.

    python -m litv2.accel.triton.aot [--models litv2_s,litv2_m,litv2_b] [--precisions bf16,fp32] [--json]

prints each distinct kernel a training step of those models launches (batch 64, 224²) with its block sizes,
warps, shared memory, registers and spills, and exits 1 if one would not fit sm_90. It needs a process without
``TRITON_INTERPRET=1``: under the interpreter ``triton.jit`` makes interpreted functions (``tl.sum`` included).

:func:`compile_launch` takes a launch as :mod:`.ops` describes it (kernel, grid, arguments, block sizes,
``num_warps``) and compiles it as ``kernel[grid](...)`` would on the GPU: the same argument specialisation (16-byte
aligned pointers, integers divisible by 16), the same options, Triton's own ``ptxas``. :func:`resources` reads the
cubin with ``cuobjdump``: registers per thread and local memory per thread (its stack frame included: ptxas spills
there), which Triton reports on a GPU as ``n_regs`` and ``n_spills`` (local bytes / 4), and the shared memory the
launch requests.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature


HOPPER = GPUTarget("cuda", 90, 32)
# Per-block limits of compute capability 9.0 (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"): shared memory per block (opt-in), 32-bit registers per block.
SM90_MAX_SHARED = 227 * 1024
SM90_MAX_REGS_PER_BLOCK = 64 * 1024


def compile_launch(launch, target: GPUTarget = HOPPER):
    """Compile ``(kernel, grid, args, kwargs)`` for ``target`` as the launch would (tensors stand for aligned
    pointers of their dtype; a meta tensor will do). Returns Triton's ``CompiledKernel``."""
    jit, _grid, args, kwargs = launch
    if not isinstance(jit, JITFunction):
        raise RuntimeError("litv2.accel.triton.aot compiles in a process without TRITON_INTERPRET=1 (under the "
                           "interpreter, triton.jit makes interpreted functions, triton.language's own included)")
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(kwargs, debug=bool(jit.debug or triton.knobs.runtime.debug),
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(compiled) -> dict:
    """``shared`` (bytes per block), ``n_regs`` (per thread), ``n_spills`` (local memory words per thread, as
    Triton counts them on a GPU), ``num_warps`` of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|STACK):(\d+)", usage))
    local = int(fields["LOCAL"]) + int(fields.get("STACK", 0))  # ptxas puts spilled registers in the stack frame
    return dict(shared=compiled.metadata.shared, n_regs=int(fields["REG"]), n_spills=local // 4,
                num_warps=compiled.metadata.num_warps)


def problems(res: dict) -> list[str]:
    """What would keep a kernel with these resources from running at full speed, or at all, on sm_90."""
    found = []
    if res["shared"] > SM90_MAX_SHARED:
        found.append(f"shared memory {res['shared']} B > {SM90_MAX_SHARED} B per block")
    if res["n_regs"] * res["num_warps"] * 32 > SM90_MAX_REGS_PER_BLOCK:
        found.append(f"{res['n_regs']} registers x {res['num_warps'] * 32} threads > {SM90_MAX_REGS_PER_BLOCK}")
    if res["n_spills"]:
        found.append(f"{res['n_spills'] * 4} B of spills per thread")
    return found


PRECISIONS = {  # (residual stream, normalised and hidden maps) dtypes of a training step; parameters are fp32
    "bf16": (torch.float32, torch.bfloat16),  # bf16 autocast: the residual stream stays fp32
    "fp16": (torch.float32, torch.float16),
    "fp32": (torch.float32, torch.float32),
}


def litv2_launches(name: str, batch: int = 64, img_size: int = 224, precision: str = "bf16") -> dict:
    """``{label: launch}``: every kernel launch a training step of the timm model ``name`` (a LITv2) makes with
    ``kernels="triton"`` at ``batch`` x ``img_size``², as :mod:`.ops` would launch it (meta tensors)."""
    import timm

    import litv2  # noqa: F401  (registers the models)
    from . import dtm, ops

    stream, low = PRECISIONS[precision]
    model = timm.create_model(name, device="meta")
    launches = {}
    for i, stage in enumerate(model.layers):
        side = img_size // model.patch_size // 2 ** i
        for block in stage.blocks:
            C, hidden = block.norm2.normalized_shape[0], block.mlp.fc1.out_features
            key = f"C={C} {side}x{side}"

            def t(*shape, dtype):
                return torch.empty(*shape, dtype=dtype, device="meta")

            x, param = t(batch, side, side, C, dtype=stream), t(C, dtype=torch.float32)
            stats, parts = t(batch, side, side, dtype=torch.float32), t(2, C, dtype=torch.float32)
            launches[f"add_layer_norm_fwd {key}"] = ops.add_layer_norm_fwd_launch(
                x, x.to(low), param, param, x, x.to(low), stats, stats, 1e-5)
            launches[f"add_layer_norm_bwd {key}"] = ops.add_layer_norm_bwd_launch(
                x, x.to(low), x, param, stats, stats, x, parts, parts)
            h, w9, b = t(batch, side, side, hidden, dtype=low), t(hidden, 9, dtype=torch.float32), t(
                hidden, dtype=torch.float32)
            key = f"C={hidden} {side}x{side}"
            launches[f"dwconv3x3_gelu {key}"] = ops.dwconv3x3_launch(h, w9, b, h, gelu=True, flip=False)
            launches[f"dwconv3x3_gelu_bwd {key}"] = ops.dwconv3x3_gelu_bwd_launch(
                h, h, w9, b, h, t(2, 9, hidden, dtype=torch.float32), t(2, hidden, dtype=torch.float32))
            launches[f"dwconv3x3 (input gradient) {key}"] = ops.dwconv3x3_launch(h, w9, None, h, gelu=False, flip=True)
            if block.attn is not None:
                launches.update(_hilo_launches(block.attn, x, low, f"C={C} {side}x{side}"))
        if stage.downsample is not None:  # the DTM: it reads the residual stream; its gather is fp32, as the plain's
            C_out, C = stage.downsample.dconv.weight.shape[:2]
            half = side // 2
            x = torch.empty(batch, side, side, C, dtype=stream, device="meta")
            offset = torch.empty(batch, half, half, 8, dtype=torch.float32, device="meta")
            cols = torch.empty(batch, half, half, 4 * C, dtype=torch.float32, device="meta")
            key = f"C={C}->{C_out} {side}x{side}->{half}x{half} (DTM)"
            launches[f"dtm_gather_fwd {key}"] = dtm.dtm_gather_fwd_launch(x, offset, cols)
            launches[f"dtm_gather_bwd {key}"] = dtm.dtm_gather_bwd_launch(cols, x, offset, x.float(), offset)
    return launches


def _hilo_launches(attn, x, low, key: str) -> dict:
    """The launches of a :class:`~litv2.models.hilo.HiLo` on the map ``x`` (of the stream's dtype; q/k/v and the
    normalised map in ``low``): its attention's, and the pooling add + LayerNorm's before it."""
    from litv2.models.hilo import HiLo

    from . import hilo

    if type(attn) is not HiLo:
        return {}
    B, H, W, C = x.shape
    s, Dh, Dl = attn.ws, attn.h_dim, attn.l_dim
    pooled = torch.empty(B, -(-H // s), -(-W // s), C, dtype=low, device="meta")
    p = torch.empty(B, H, W, 3 * Dh + Dl, dtype=low, device="meta")
    kv = torch.empty(*pooled.shape[:3], 2 * Dl, dtype=low, device="meta")
    out = torch.empty(B, H, W, Dh + Dl, dtype=low, device="meta")
    lse = torch.empty(B, H, W, attn.num_heads, dtype=torch.float32, device="meta")
    bias = torch.empty(3 * Dh, dtype=torch.float32, device="meta")
    args = (attn.h_heads, attn.l_heads, attn.head_dim, s, attn.scale)
    launches = {}
    if attn.h_heads:
        launches[f"hifi_fwd {key}"] = hilo.hifi_fwd_launch(p, bias, out, lse, *args)
        part_b = torch.empty(2, 2 * Dh, dtype=torch.float32, device="meta")
        launches[f"hifi_bwd {key}"] = hilo.hifi_bwd_launch(p, bias, out, out, lse, p, part_b, *args)
    if attn.l_heads:
        for tf32 in (False, True) if low == torch.float32 else (False,):  # fp32: IEEE and, where allowed, TF32 dots
            tag = " (TF32)" if tf32 else ""
            launches[f"lofi_fwd {key}{tag}"] = hilo.lofi_fwd_launch(p, kv, out, lse, *args, tf32=tf32)
            launches[f"lofi_bwd_dkdv {key}{tag}"] = hilo.lofi_bwd_dkdv_launch(p, kv, out, out, lse, kv, *args,
                                                                              tf32=tf32)
            launches[f"lofi_bwd_dq {key}{tag}"] = hilo.lofi_bwd_dq_launch(p, kv, out, out, lse, p, *args, tf32=tf32)
    if attn.l_heads and s > 1:
        param, stats = torch.empty(C, dtype=torch.float32, device="meta"), lse[..., 0]
        parts = torch.empty(2, C, dtype=torch.float32, device="meta")
        launches[f"add_layer_norm_pool_fwd {key}"] = hilo.add_layer_norm_pool_fwd_launch(
            x, x.to(low), param, param, x, x.to(low), pooled, stats, stats, 1e-5, s)
        launches[f"add_layer_norm_pool_bwd {key}"] = hilo.add_layer_norm_pool_bwd_launch(
            x, x.to(low), pooled, x, param, stats, stats, x, parts, parts, s)
    return launches


def check(models: list[str], precisions: list[str], batch: int = 64, img_size: int = 224) -> list[dict]:
    """Compile every launch of :func:`litv2_launches` for sm_90; one row per distinct compiled kernel: ``kernel``,
    ``blocks`` (its block sizes and flags), ``dtypes``, ``shapes`` (the labels that launch it), the
    :func:`resources` and ``problems``."""
    rows = {}
    for precision in precisions:
        for name in models:
            for label, launch in litv2_launches(name, batch, img_size, precision).items():
                compiled = compile_launch(launch)
                row = rows.get(compiled.hash)
                if row is None:
                    res = resources(compiled)
                    blocks = {k: v for k, v in launch[3].items() if k != "num_warps"}
                    dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in launch[2]
                                     if isinstance(a, torch.Tensor)})
                    row = rows[compiled.hash] = dict(kernel=launch[0].fn.__name__, blocks=blocks, precision=precision,
                                                     dtypes=dtypes, shapes=[], **res, problems=problems(res))
                row["shapes"].append(f"{name} {label}")
    return list(rows.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="litv2_s,litv2_m,litv2_b")
    p.add_argument("--precisions", default="bf16,fp32", help=f"of {', '.join(PRECISIONS)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    a = p.parse_args(argv)
    rows = check(a.models.split(","), a.precisions.split(","), a.batch_size, a.img_size)
    if a.json:
        print(json.dumps(rows))
    else:
        print("| kernel | precision | blocks | warps | shared (B) | registers | spills | launched for |")
        print("|---|---|---|---:|---:|---:|---:|---|")
        for r in rows:
            blocks = ", ".join(f"{k}={v}" for k, v in r["blocks"].items())
            print(f"| {r['kernel']} | {r['precision']} | {blocks} | {r['num_warps']} | {r['shared']} | {r['n_regs']} "
                  f"| {r['n_spills']} | {len(r['shapes'])} shapes{': ' + '; '.join(r['problems']) if r['problems'] else ''} |")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
