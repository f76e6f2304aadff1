"""dict(type='ZeroRedundancyOptimizer', optimizer_type='Adan') from an mmengine config, on 2 gloo processes.

The sharded run must give the parameters of single-process Adan on the full
batch, with a binding max_grad_norm and paramwise_cfg; the same run with the
local (per-shard) norm must not, which shows the comparison can fail.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

import adan_plugin  # noqa: F401  (registers Adan with mmengine)

WORLD = 2
STEPS = 4
BATCH = 16
OPTIM = dict(lr=0.05, betas=(0.98, 0.92, 0.99), weight_decay=0.02, max_grad_norm=0.05)
PARAMWISE = dict(norm_decay_mult=0.0, bias_decay_mult=0.0)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(),
        torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 8, generator=g), torch.randint(0, 3, (STEPS, BATCH), generator=g)


def optim_cfg(**extra):
    return dict(optimizer=dict(type="ZeroRedundancyOptimizer", optimizer_type="Adan", **OPTIM, **extra),
                paramwise_cfg=PARAMWISE)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    import adan_plugin  # noqa: F401
    from adan_plugin import Adan

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    DefaultScope.get_instance(f"zero_test_{rank}", scope_name="mmpretrain")
    xs, ys = make_data()
    results = {}
    for name, extra in (("global", {}), ("local", dict(clip_process_group=None))):
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        wrapper = build_optim_wrapper(model, optim_cfg(**extra))
        zero = wrapper.optimizer
        assert type(zero).__name__ == "ZeroRedundancyOptimizer" and isinstance(zero.optim, Adan)
        for step in range(STEPS):
            x, y = xs[step][rank::WORLD], ys[step][rank::WORLD]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            wrapper.update_params(loss)
        results[name] = [p.detach().clone() for p in model.module.parameters()]
        if name == "global":
            state = zero.state_dict()  # collective: every rank calls it
            if rank == 0:
                results["state_keys"] = sorted({k for st in state["state"].values() for k in st})
                results["state_count"] = len(state["state"])
                results["steps"] = [g["step"] for g in state["param_groups"]]
            # What ZeroCheckpointHook and mmengine's rank-0-only save do: gather on every rank,
            # then state_dict() on rank 0 alone (it must not wait for the others).
            loss = torch.nn.functional.cross_entropy(model(xs[0][rank::WORLD]), ys[0][rank::WORLD])
            wrapper.update_params(loss)
            zero.consolidate_state_dict()
            if rank == 0:
                results["steps_after_one_more"] = [g["step"] for g in zero.state_dict()["param_groups"]]
            dist.barrier()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "zero.pt"))
    dist.destroy_process_group()


def single_process_params(**override):
    from mmengine.optim import build_optim_wrapper

    xs, ys = make_data()
    model = make_model()
    optimizer = dict(type="Adan", **{**OPTIM, **override})
    wrapper = build_optim_wrapper(model, dict(optimizer=optimizer, paramwise_cfg=PARAMWISE))
    for step in range(STEPS):
        wrapper.update_params(torch.nn.functional.cross_entropy(model(xs[step]), ys[step]))
    return [p.detach() for p in model.parameters()]


def test_zero_adan_on_two_gloo_processes_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "zero.pt")
    want = single_process_params()
    unclipped = single_process_params(max_grad_norm=0.0)
    assert max((a - b).abs().max().item() for a, b in zip(unclipped, want)) > 1e-4, "the clip must bind"
    assert got["state_count"] == len(want)
    assert got["state_keys"] == ["exp_avg", "exp_avg_diff", "exp_avg_sq", "neg_pre_grad"]
    assert all(step == STEPS for step in got["steps"])
    assert all(step == STEPS + 1 for step in got["steps_after_one_more"])
    for p_zero, p_ref in zip(got["global"], want):
        torch.testing.assert_close(p_zero, p_ref, rtol=1e-5, atol=1e-6)
    worst_local = max((a - b).abs().max().item() for a, b in zip(got["local"], want))
    assert worst_local > 1e-4, "a per-shard clip norm went unnoticed: the test could not fail"


def test_zero_resolves_optimizer_type_through_the_registry_and_reports_bad_names():
    from adan_plugin import Adan
    from adan_plugin.integrations.mmengine_zero import resolve_optimizer_class

    assert resolve_optimizer_class("Adan") is Adan
    assert resolve_optimizer_class("AdamW") is torch.optim.AdamW
    with pytest.raises(KeyError, match="optimizer_type='Adna' is not a registered optimizer"):
        resolve_optimizer_class("Adna")


def _resume_worker(rank, init_file, out_dir, state_dtype):
    # Two steps, a checkpoint (gathered on every rank, saved by rank 0), then two more steps; against a
    # fresh ZeroRedundancyOptimizer that loads the checkpoint and takes the same two steps.
    torch.set_num_threads(1)
    import torch.distributed as dist
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    import adan_plugin  # noqa: F401

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    DefaultScope.get_instance(f"zero_resume_{rank}", scope_name="mmpretrain")
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(4, BATCH, 64, generator=g), torch.randint(0, 3, (4, BATCH), generator=g)

    def build(model):
        cfg = dict(optimizer=dict(type="ZeroRedundancyOptimizer", optimizer_type="Adan", state_dtype=state_dtype,
                                  **OPTIM))
        return build_optim_wrapper(model, cfg)

    def train(model, wrapper, steps):
        for step in steps:
            loss = torch.nn.functional.cross_entropy(model(xs[step][rank::WORLD]), ys[step][rank::WORLD])
            wrapper.update_params(loss)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 3))
    model = torch.nn.parallel.DistributedDataParallel(net)
    wrapper = build(model)
    train(model, wrapper, [0, 1])
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    wrapper.optimizer.consolidate_state_dict()
    if rank == 0:
        torch.save(wrapper.optimizer.state_dict(), os.path.join(out_dir, "optim.pt"))
    dist.barrier()
    train(model, wrapper, [2, 3])

    saved = torch.load(os.path.join(out_dir, "optim.pt"), weights_only=True)
    net2 = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 3))
    net2.load_state_dict(weights)
    model2 = torch.nn.parallel.DistributedDataParallel(net2)
    wrapper2 = build(model2)
    zero2 = wrapper2.optimizer
    big = net2[0].weight  # 8192 elements: 8-bit states under state_dtype='8bit'
    owner = zero2._param_to_rank[big]
    damaged = {**saved, "state": dict(saved["state"])}
    damaged["state"][0] = {**saved["state"][0]}
    for key in list(damaged["state"][0]):
        if torch.is_tensor(damaged["state"][0][key]) and damaged["state"][0][key].dim() == 2:
            damaged["state"][0][key] = damaged["state"][0][key][:, :-1]
    try:
        zero2.load_state_dict(damaged)
        refused = None
    except ValueError as err:
        refused = str(err)
    untouched = not zero2.optim.state
    zero2.load_state_dict(saved)
    kept = {k: (v.dtype, tuple(v.shape)) for k, v in zero2.optim.state[big].items()} if owner == rank else None
    train(model2, wrapper2, [2, 3])
    torch.save({"refused": refused, "untouched": untouched, "owner": owner, "kept": kept,
                "resumed": [p.detach().clone() for p in net2.parameters()],
                "straight": [p.detach().clone() for p in net.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_zero_adan_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path, state_dtype):
    if state_dtype == "8bit" and not adan_plugin.fused_extension_available():
        pytest.skip("8-bit states need the fused kernels")
    mp.spawn(_resume_worker, args=(str(tmp_path / "rdzv"), str(tmp_path), state_dtype), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    owner = ranks[0]["owner"]
    for rank, got in enumerate(ranks):
        for a, b in zip(got["resumed"], got["straight"]):
            assert torch.equal(a, b), f"rank {rank}"
        # the damaged state (the big weight's) is refused by its owner, before anything is written there
        if rank == owner:
            assert got["refused"] is not None and got["untouched"]
        else:
            assert got["refused"] is None
    assert "has shape" in ranks[owner]["refused"]
    code = torch.int8 if state_dtype == "8bit" else torch.float32
    kept = ranks[owner]["kept"]
    assert kept["exp_avg"] == (code, (128, 64)) and ("exp_avg_scale" in kept) == (state_dtype == "8bit")
