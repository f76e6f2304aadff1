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
