"""Adan under torch.distributed, 2 processes on gloo (CPU): DDP, ZeRO, FSDP2.

Each scenario is one ``torch.multiprocessing.spawn``: the workers train a
small model on their half of every batch and save what they got; the parent
trains single-process Adan on the full batches and compares.  The clip is
binding and its coefficient changes from step to step (the batches change
scale), because a constant coefficient would cancel out of Adan's
m / sqrt(n) and could not tell a global norm from a local one.
"""
from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adan_plugin import Adan
from adan_plugin import _ext

WORLD = 2
STEPS = 6
RESUME_AT = 3          # checkpoint after this many steps, then 3 more
SEED = 1234
MAX_GRAD_NORM = 1.0
HP = dict(lr=0.05, weight_decay=0.02, max_grad_norm=MAX_GRAD_NORM)
# fp32 rounding: sums over a half batch then across ranks vs over the full batch.
RTOL, ATOL = 1e-5, 2e-6


def make_model(seed: int = SEED) -> nn.Module:
    # 7 and 3 rows shard unevenly over 2 ranks (4/3, 2/1); the last layer's
    # single row leaves rank 1 an empty shard.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    scale = (0.3, 4.0, 1.0)[step % 3]
    return torch.randn(8, 6, generator=gen) * scale, torch.randn(8, 1, generator=gen)


def loss_of(model: nn.Module, x, y):
    return nn.functional.mse_loss(model(x), y)


def train(model: nn.Module, opt, steps, rank=None) -> None:
    for step in steps:
        x, y = batch(step)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()


def reference(steps=range(STEPS), **overrides):
    """Single-process Adan on the full batches: final params, per-step grad norms."""
    model = make_model()
    opt = Adan(model.parameters(), **{**HP, **overrides})
    norms = []
    for step in steps:
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], norms


def assert_params_close(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, param {i}: {m}")


def max_abs_diff(got, want) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


# ------------------------------------------------------------------ spawning
def _entry(rank, worker_name, init_method, out_dir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = globals()[worker_name](rank, out_dir, *args)
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A worker that succeeded skips interpreter finalization, where gloo's threads can abort the process
    # (tools/dist_exit.py); a failing one raises above and mp.spawn reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, tmp_path, *args):
    """Run ``worker(rank, out_dir, *args)`` on 2 gloo ranks; return each rank's result.

    The rendezvous is a file in the test's own tmp_path (no port to collide
    on with other test runs); gloo then connects on OS-assigned ports.
    """
    init_method = "file://" + str(tmp_path / "rendezvous")
    mp.spawn(_entry, args=(worker.__name__, init_method, str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(WORLD)]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- reference
@pytest.fixture(scope="module")
def ref():
    params, norms = reference()
    return params, norms


def test_clip_is_binding_and_varies(ref):
    """Without this the distributed comparisons below could not see a wrong norm."""
    _, norms = ref
    clipped = [n for n in norms if n > MAX_GRAD_NORM]
    assert len(clipped) >= STEPS // 2, norms                 # the clip binds on most steps
    assert max(clipped) / min(clipped) > 2, norms            # with a coefficient that changes
    unclipped, _ = reference(max_grad_norm=0.0)
    assert max_abs_diff(unclipped, ref[0]) > 100 * ATOL


def path_variants():
    """Every implementation path; the fused one when the extension is built."""
    variants = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}
    if _ext.fused_supported(torch.device("cpu")):
        variants["fused"] = dict(fused=True)
    return variants


# --------------------------------------------------------------------- DDP
def _ddp_worker(rank, out_dir, variants):
    from torch.nn.parallel import DistributedDataParallel as DDP
    result = {}
    for name, kw in variants.items():
        model = DDP(make_model())
        opt = Adan(model.parameters(), **HP, **kw)
        train(model, opt, range(STEPS), rank)
        result[name] = _params(model.module)
        result[name + "_ran_fused"] = opt._uses_fused(opt.param_groups[0])
    return result


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path, ref):
    variants = path_variants()
    results = spawn(_ddp_worker, tmp_path, variants)
    for rank, res in enumerate(results):
        for name in variants:
            assert_params_close(res[name], ref[0], f"DDP rank {rank} {name}")
            assert res[name + "_ran_fused"] == (name == "fused")


# -------------------------------------------------------------------- ZeRO
def _zero_worker(rank, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build(clip_process_group, seed=SEED):
        model = DDP(make_model(seed))
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adan,
                                      clip_process_group=clip_process_group, **HP)
        return model, opt

    result = {}
    ckpt = os.path.join(out_dir, "zero.pt")
    model, opt = build("world")
    train(model, opt, range(RESUME_AT), rank)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, ckpt)
    dist.barrier()
    train(model, opt, range(RESUME_AT, STEPS), rank)
    result["global"] = _params(model.module)
    result["owned_numel"] = sum(p.numel() for g in opt.optim.param_groups for p in g["params"])

    # Resume from another initialisation, so only the checkpoint can make it
    # match; the group named by its name this time.  A ProcessGroup object
    # would end up in ZeRO's state_dict, which then could not be saved.
    group = dist.new_group(list(range(WORLD)))
    try:
        build(group)
    except ValueError as err:
        result["object_refused"] = str(err)
    model, opt = build(group.group_name, seed=SEED + 1)
    saved = torch.load(ckpt, weights_only=True)
    model.module.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    result["resumed_step"] = opt.optim.param_groups[0]["step"]
    train(model, opt, range(RESUME_AT, STEPS), rank)
    result["resumed"] = _params(model.module)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save(opt.state_dict(), os.path.join(out_dir, "zero_named_group.pt"))

    # What the official and mmpretrain Adans do under ZeRO: clip by the norm
    # of the shard this rank's optimizer holds.
    model, opt = build(None)
    train(model, opt, range(STEPS), rank)
    result["local"] = _params(model.module)

    # One parameter for two ranks: rank 1's Adan holds nothing, yet must join
    # the norm's all-reduce or rank 0 would wait forever.
    lone = lone_param()
    opt = ZeroRedundancyOptimizer([lone], optimizer_class=Adan, clip_process_group="world", **HP)
    for step in range(3):
        lone.grad = lone_grad(step)
        opt.step()
    result["lone"] = lone.detach().clone()
    unknown = Adan([lone], max_grad_norm=1.0, clip_process_group="no such group")
    try:
        unknown.step()
    except RuntimeError as err:
        result["unknown_group"] = str(err)
    result["lone_owned"] = len(opt.optim.param_groups[0]["params"])
    return result


def lone_param():
    torch.manual_seed(SEED)
    return torch.randn(5, requires_grad=True)


def lone_grad(step):
    return torch.linspace(-1.0, 2.0, 5) * (1.0 + 2 * step)   # norm > MAX_GRAD_NORM, growing


@pytest.mark.slow
def test_zero_global_clip_matches_single_process_and_local_clip_does_not(tmp_path, ref):
    results = spawn(_zero_worker, tmp_path)
    total = sum(p.numel() for p in ref[0])
    owned = [res["owned_numel"] for res in results]
    assert sum(owned) == total and min(owned) > 0, owned   # really sharded
    for rank, res in enumerate(results):
        assert_params_close(res["global"], ref[0], f"ZeRO rank {rank}, clip_process_group='world'")
        # The same comparison fails for the local norm: the test can fail.
        assert max_abs_diff(res["local"], ref[0]) > 100 * ATOL, "local-norm clip should not match"
        with pytest.raises(AssertionError):
            assert_params_close(res["local"], ref[0], "local")
        # consolidate_state_dict -> load_state_dict continues bit for bit.
        assert res["resumed_step"] == RESUME_AT
        assert "group.group_name" in res.get("object_refused", ""), res.get("object_refused")
        for got, want in zip(res["resumed"], res["global"]):
            assert torch.equal(got, want), f"ZeRO resume diverged on rank {rank}"
    assert sorted(res["lone_owned"] for res in results) == [0, 1]
    assert all("names no process group" in res.get("unknown_group", "") for res in results)
    saved = torch.load(tmp_path / "zero_named_group.pt", weights_only=True)
    assert len(saved["state"]) == len(ref[0]) and saved["param_groups"][0]["step"] == STEPS
    lone = lone_param()
    opt = Adan([lone], **HP)
    for step in range(3):
        lone.grad = lone_grad(step)
        opt.step()
    for res in results:
        torch.testing.assert_close(res["lone"], lone.detach(), rtol=RTOL, atol=ATOL)




def _fsdp_worker(rank, out_dir, variants):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (WORLD,))

    def build(seed=SEED, on=mesh, **kw):
        model = make_model(seed)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=on)
        fully_shard(model, mesh=on)
        return model, Adan(model.parameters(), **{**HP, **kw})

    def full(model):
        return [p.full_tensor().detach().clone() for p in model.parameters()]

    result = {}
    for name, kw in variants.items():
        model, opt = build(**kw)
        train(model, opt, range(STEPS), rank)
        result[name] = full(model)
        result[name + "_ran_fused"] = opt._uses_fused(opt.param_groups[0])
        if name == "single":
            result["local_shapes"] = [tuple(p.to_local().shape) for p in model.parameters()]
            result["state_is_dtensor"] = all(isinstance(v, DTensor) for st in opt.state.values()
                                             for v in st.values())

    # HSDP on a (replicate=2, shard=1) mesh: every rank holds whole gradients
    # as DTensors (Replicate, Shard(0)); summing over the replicate dimension
    # would count each gradient twice.
    hsdp_mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    model, opt = build(on=hsdp_mesh, **variants["single"])
    train(model, opt, range(STEPS), rank)
    result["hsdp"] = full(model)
    result["hsdp_placements"] = str(next(model.parameters()).grad.placements)

    # torch.distributed.checkpoint: save after RESUME_AT steps, resume a model
    # built from another seed, continue.
    ckpt = os.path.join(out_dir, "dcp")
    model, opt = build(**variants["single"])
    train(model, opt, range(RESUME_AT), rank)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    train(model, opt, range(RESUME_AT, STEPS), rank)
    result["straight"] = full(model)

    model, opt = build(seed=SEED + 1, **variants["single"])
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    result["resumed_step"] = opt.param_groups[0]["step"]
    train(model, opt, range(RESUME_AT, STEPS), rank)
    result["resumed"] = full(model)

    # Gradients Adan must refuse, before changing anything.
    weight = next(model.parameters())
    before = [t.to_local().clone() for t in (weight, *opt.state[weight].values())]
    step_before = opt.param_groups[0]["step"]
    errors = {}
    for name, bad in (("partial", DTensor.from_local(torch.ones(weight.shape), mesh, [Partial()])),
                      ("plain", torch.ones(weight.shape))):
        weight.grad = bad
        try:
            opt.step()
        except RuntimeError as err:
            errors[name] = str(err)
    after = [t.to_local() for t in (weight, *opt.state[weight].values())]
    result["errors"] = errors
    result["untouched"] = (opt.param_groups[0]["step"] == step_before
                           and all(torch.equal(a, b) for a, b in zip(before, after)))
    return result


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_resumes_with_dcp(tmp_path, ref):
    variants = {**path_variants(),
                "caution": dict(foreach=False, fused=False, caution=True),
                "no_prox": dict(foreach=False, fused=False, no_prox=True)}
    results = spawn(_fsdp_worker, tmp_path, variants)
    refs = {name: reference(**{k: v for k, v in kw.items() if k not in ("foreach", "fused")})[0]
            for name, kw in variants.items()}
    for rank, res in enumerate(results):
        assert res["state_is_dtensor"]
        for name in variants:
            assert_params_close(res[name], refs[name], f"FSDP2 rank {rank} {name}")
            assert res[name + "_ran_fused"] == (name == "fused")
        assert "Replicate" in res["hsdp_placements"], res["hsdp_placements"]
        assert_params_close(res["hsdp"], refs["single"], f"HSDP rank {rank}")
        assert res["resumed_step"] == RESUME_AT
        for got, want in zip(res["resumed"], res["straight"]):
            assert torch.equal(got, want), f"FSDP2 DCP resume diverged on rank {rank}"
        assert "partial sum" in res["errors"].get("partial", ""), res["errors"]
        assert "plain tensor" in res["errors"].get("plain", ""), res["errors"]
        assert res["untouched"]
    # Really sharded, unevenly, with an empty shard on rank 1.
    assert results[0]["local_shapes"][0] == (4, 6) and results[1]["local_shapes"][0] == (3, 6)
    assert results[1]["local_shapes"][-1] == (0,)


# ------------------------------------------------------- single-process API
def test_clip_process_group_argument_is_checked_and_kept():
    params = [torch.zeros(3, requires_grad=True)]
    for bad in (3, "", ["world"]):
        with pytest.raises(ValueError, match="clip_process_group"):
            Adan(params, clip_process_group=bad)
    import copy
    opt = Adan(params, max_grad_norm=1.0, clip_process_group="world")
    # Pickling must not silently turn the global clip into a local one.
    assert copy.deepcopy(opt).clip_process_group == "world"
    assert "clip_process_group" not in opt.state_dict()["param_groups"][0]


def test_clip_process_group_without_init_raises_and_changes_nothing():
    assert not dist.is_initialized()
    p = torch.ones(3, requires_grad=True)
    opt = Adan([p], max_grad_norm=1.0, clip_process_group="world")
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        opt.step()
    assert opt.state_dict()["state"] == {} and "step" not in opt.param_groups[0]
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.cuda
def test_step_does_not_wait_for_the_gpu(tmp_path):
    """FSDP2 (DTensor) and clip_process_group on one GPU under sync-debug mode 'error'.

    World size 1 (one GPU is what the GPU test machines have): the clip's
    all-reduces are skipped for one-rank groups, the DTensor and norm code
    around them runs as on N GPUs.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method="file://" + str(tmp_path / "rendezvous"), rank=0, world_size=1)
    try:
        sharded = make_model().cuda()
        fully_shard(sharded, mesh=init_device_mesh("cuda", (1,)))
        plain = make_model().cuda()
        for model, extra in ((sharded, {}), (plain, dict(clip_process_group="world"))):
            opt = Adan(model.parameters(), **HP, **extra)
            for step in range(3):
                x, y = (t.cuda() for t in batch(step))
                opt.zero_grad(set_to_none=True)
                loss_of(model, x, y).backward()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close([p.full_tensor() for p in sharded.parameters()],
                                   list(plain.parameters()), rtol=RTOL, atol=ATOL)
    finally:
        dist.destroy_process_group()
