"""CUDA-graph capture and GPU peak-memory helpers shared by the GPU test files (tests marked ``cuda``)."""
from typing import Callable, List, Sequence, Tuple

import torch


def capture_step(opt: torch.optim.Optimizer) -> "torch.cuda.CUDAGraph":
    """One warm-up step on a side stream (it creates the state and JIT-compiles Triton kernels, as CUDA
    graphs require), then one ``opt.step()`` captured into the returned graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def assert_replay_equals_eager(make: Callable[[], Tuple[List[torch.Tensor], torch.optim.Optimizer]],
                               grads: Sequence[Sequence[torch.Tensor]]) -> torch.optim.Optimizer:
    """``make()`` gives fresh parameters (each with a ``.grad`` to copy into) and a capturable optimizer.
    The steps over ``grads`` run eagerly on one such pair and as one captured step replayed on another:
    parameters and every state tensor must be equal bit for bit.  Returns the graph-stepped optimizer."""
    eager_params, eager = make()
    for gs in grads:
        for p, g in zip(eager_params, gs):
            p.grad.copy_(g)
        eager.step()
    graph_params, opt = make()
    for p, g in zip(graph_params, grads[0]):
        p.grad.copy_(g)
    graph = capture_step(opt)
    for gs in grads[1:]:
        for p, g in zip(graph_params, gs):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager_params, graph_params):
        assert torch.equal(a, b)
        for key, v in eager.state[a].items():
            if torch.is_tensor(v):
                assert torch.equal(v, opt.state[b][key]), key
    return opt


def step_peak_bytes(opt: torch.optim.Optimizer) -> int:
    """GPU memory one ``opt.step()`` allocates beyond what is allocated before it (its peak)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def grad_scaler_steps_without_sync(opt_factory: Callable, checked_from: int = 1) -> torch.optim.Optimizer:
    """Four fp16-autocast steps of a small MLP through a GradScaler, every ``scaler.step`` from step
    ``checked_from`` on under ``torch.cuda.set_sync_debug_mode("error")`` (a host sync raises).  The first
    steps create the state (and compile Triton kernels): allocations are not syncs, but they stay plain."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)).cuda()
    opt = opt_factory(model.parameters())
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    for it in range(4):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if it >= checked_from:
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        opt.zero_grad()
    return opt
