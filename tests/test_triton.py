"""The Triton kernels (adan_plugin/triton_adan.py), run on CPU tensors by Triton's interpreter, against the
float64 reference, the CPU kernel and the CUDA kernel's code; backend selection; the kernel compiled for a
GPU (sm_90) without one.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when triton and adan_plugin.triton_adan are
imported: it is set here, at collection, before any test imports them, and stays set (triton's lazily
imported modules check that it has not changed).  CPU code never runs Triton otherwise: fused=None on CPU
tensors never picks the Triton kernels, and torch.compile's CPU backend generates C++.  What the interpreter cannot show: GPU execution itself (scheduling, the 16-byte
vector loads, CUDA-graph capture); tools/bench_step.py --device cuda and tools/gpu_checks.sh are for that."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
triton_adan = pytest.importorskip("adan_plugin.triton_adan")

from adan_plugin import Adan, _ext  # noqa: E402
from adan_plugin.adan import _triton_lacks  # noqa: E402
from adan_plugin.functional import STATE_KEYS  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402
from problems import make_problem, param_groups, run_torch  # noqa: E402
from reference import RefAdan  # noqa: E402
from test_fused import OP_KW, _assert_bit_identical, _assert_tracks, _op_lists, _reference, _snapshot  # noqa: E402

if not triton_adan.interpreted():
    pytest.fail("adan_plugin.triton_adan was imported before this module set TRITON_INTERPRET=1", pytrace=False)

BUILT = pytest.mark.skipif(not _ext.extension_loaded(), reason="adan_plugin._C is not built")
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
B, C = triton_adan.BLOCK, triton_adan.CHUNK


def _triton(**kw):
    return dict(fused_backend="triton", **kw)


# ---------------------------------------------------------------- the op against the C++ kernels
@BUILT
@pytest.mark.parametrize("param_dtype,state_dtype", DTYPE_PAIRS)
def test_op_matches_the_cuda_code_bit_for_bit_and_the_cpu_kernel(param_dtype, state_dtype):
    # Sizes around the block and the chunk; every third tensor an offset (unaligned) view; clip and AMP
    # scale together.  The CUDA code built for the CPU does not contract to FMA, nor does the
    # interpreter: the same operations in the same order give the same bits.  The CPU kernel's AVX2
    # loop contracts, so against it the tolerances of test_fused.py apply.
    sizes = [1, 3, B - 1, B, B + 1, C - 1, C + 1]

    def make(i, n, dtype):
        return torch.empty(n + 1, dtype=dtype)[1:] if i % 3 == 2 else torch.empty(n, dtype=dtype)

    ops = torch.ops.adan_plugin
    lists = _op_lists(sizes, param_dtype, state_dtype, make)
    kw = dict(OP_KW, step=3.0, grad_coef=torch.tensor(0.5), grad_scale=torch.tensor(4.0))
    cuda_code = [[t.clone() for t in ts] for ts in lists]
    cpu = [[t.clone() for t in ts] for ts in lists]
    ops.fused_adan_triton_(*lists, **kw)
    ops._fused_adan_cuda_code_on_cpu_(*cuda_code, **kw)
    ops.fused_adan_(*cpu, **kw)
    grads_before = cpu[1]
    for a, b, c in zip(lists, cuda_code, cpu):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y)
            tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
            torch.testing.assert_close(x, z, **tol)
    assert all(torch.equal(g, h) for g, h in zip(lists[1], grads_before))  # gradients never written


@BUILT
def test_many_tensors_across_several_launches(monkeypatch):
    # Launches of 7 programs: tensors spill over launch boundaries, and an unaligned tensor between
    # aligned ones puts them into two launch classes; device step counts, one of them a first step.
    monkeypatch.setattr(triton_adan, "MAX_PROGRAMS", 7)
    monkeypatch.setattr(triton_adan, "CHUNK", 2 * B)
    sizes = [5 * B + 3, 1, 0, 2 * B, 9, 3 * B - 1] * 3

    def make(i, n, dtype):
        return torch.empty(n + 1, dtype=dtype)[1:] if i == 4 else torch.empty(n, dtype=dtype)

    lists = _op_lists(sizes, torch.float32, torch.float32, make)
    steps = [torch.tensor(1.0 if i == 3 else 4.0) for i in range(len(sizes))]
    kw = dict(OP_KW, step=0.0, step_tensor=torch.tensor(4.0), param_steps=steps)
    theirs = [[t.clone() for t in ts] for ts in lists]
    triton_adan._plans.clear()
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    (plan,) = triton_adan._plans.values()
    assert sorted(launch.aligned for launch in plan) == [False, True]
    assert sum(len(launch.launches) for launch in plan) > 2
    torch.ops.adan_plugin._fused_adan_cuda_code_on_cpu_(*theirs, **kw)
    for a, b in zip(lists, theirs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_plan_is_cached_and_rebuilt_when_a_tensor_moves():
    lists = _op_lists([10, 20], torch.float32, torch.float32, lambda i, n, dt: torch.empty(n, dtype=dt))
    kw = dict(OP_KW, step=2.0)
    triton_adan._plans.clear()
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    assert len(triton_adan._plans) == 1
    before = lists[2][1].clone()
    lists[2][1] = before.clone()  # a state replaced (as a checkpoint load does): new address
    torch.ops.adan_plugin.fused_adan_triton_(*lists, **kw)
    assert len(triton_adan._plans) == 2 and not torch.equal(lists[2][1], before)  # the new tensor was written


def test_op_checks_before_writing():
    p, g = torch.randn(8), torch.randn(8)
    m, n, d, neg = (torch.zeros(8) for _ in range(4))
    op = torch.ops.adan_plugin.fused_adan_triton_
    kw = dict(OP_KW, step=1.0)
    p0 = p.clone()
    with pytest.raises(RuntimeError, match="neg_pre_grad of parameter 1 is torch.float64"):
        op([p, p.clone()], [g, g], [m, m], [n, n], [d, d], [neg, neg.double()], **kw)
    with pytest.raises(RuntimeError, match="has sizes"):
        op([p], [g], [m], [n], [d.view(2, 4)], [neg], **kw)
    with pytest.raises(RuntimeError, match="not dense"):
        op([torch.randn(16)[::2]], [g], [m], [n], [d], [neg], **kw)
    with pytest.raises(RuntimeError, match="found_inf must be a one-element float32"):
        op([p], [g], [m], [n], [d], [neg], **kw, found_inf=torch.tensor([0.0, 1.0]))
    assert torch.equal(p, p0) and not m.any()


def test_launcher_allocates_no_parameter_sized_temporaries():
    size = C  # 64 KiB per fp32 tensor; the launcher's tables are a few hundred bytes
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adan(params, max_grad_norm=1.0, **_triton())
    opt.step()  # creates the state
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)  # device-step mode, scalars too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    assert [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= size * 4] == []


# ---------------------------------------------------------------- the optimizer on the Triton backend
@pytest.mark.parametrize("clip", [None, "binding"])
def test_adan_on_triton_matches_reference(clip):
    prob = make_problem(1, steps=12, clip=clip)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    assert opt.fused_backends == ("triton",) * len(groups)
    run_torch(opt, groups, prob.grads)
    _assert_tracks(groups, _reference(prob), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("param_dtype,state_dtype,tol", [
    (torch.bfloat16, None, 0.03), (torch.float16, None, 4e-3), (torch.float32, torch.bfloat16, 2e-3),
    (torch.bfloat16, torch.float32, 0.03), (torch.float16, torch.bfloat16, 5e-3)])
def test_low_precision_params_and_states(param_dtype, state_dtype, tol):
    prob = make_problem(4, steps=10, none_prob=0.1, n_groups=2, clip="binding")
    groups = param_groups(prob, dtype=param_dtype)
    opt = Adan(groups, state_dtype=state_dtype, max_grad_norm=prob.max_grad_norm, **_triton())
    run_torch(opt, groups, prob.grads, dtype=param_dtype)
    _assert_tracks(groups, _reference(prob), rtol=tol, atol=tol)
    default = torch.float32 if param_dtype == torch.float16 else param_dtype  # fp16 states would overflow
    assert all(st[k].dtype == (state_dtype or default) for st in opt.state.values() for k in STATE_KEYS)


def test_found_inf_leaves_everything_untouched():
    prob = make_problem(7, steps=7, clip="binding", none_prob=0.0, n_groups=2)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    run_torch(opt, groups, prob.grads[:3])
    opt.found_inf = torch.tensor(0.0)
    run_torch(opt, groups, prob.grads[3:4])  # into device-step mode
    before = _snapshot(opt, groups)
    for grads in prob.grads[4:7]:
        for group, gs in zip(groups, grads):
            for p, g in zip(group["params"], gs):
                p.grad = None if g is None else torch.full_like(p, float("inf"))
        opt.grad_scale = torch.tensor(65536.0)
        opt.found_inf = torch.tensor(1.0)
        opt.step()
    _assert_bit_identical(before, _snapshot(opt, groups))


def test_skipped_first_steps_late_parameters_and_grad_scale_match_reference():
    # GradScaler skips the first steps; one parameter gets its first gradient late, another only on a
    # skipped step: each parameter's first applied step must see a zero gradient difference.
    prob = make_problem(9, steps=9, clip="binding", none_prob=0.0, n_groups=2)
    for k in range(4):
        prob.grads[k][1][0] = None
    for k in range(8):
        prob.grads[k][0][0] = None
    skipped = {0, 1, 3, 8}
    ref = RefAdan([{"params": ts, **{k: v for k, v in g.items() if k != "shapes"}}
                   for g, ts in zip(prob.groups, prob.init)], max_grad_norm=prob.max_grad_norm)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    for k, grads in enumerate(prob.grads):
        bad = k in skipped
        for group, gs in zip(groups, grads):
            for p, g in zip(group["params"], gs):
                p.grad = None if g is None else (torch.full_like(p, float("nan")) if bad else (g * 8).float())
        opt.grad_scale = torch.tensor(8.0)
        opt.found_inf = torch.tensor(1.0 if bad else 0.0)
        opt.step()
        if not bad:
            ref.step(grads)
    _assert_tracks(groups, ref, rtol=2e-5, atol=2e-6)
    assert [float(g["step"]) for g in opt.param_groups] == [len(prob.grads) - len(skipped)] * 2


def test_grad_scaler_and_no_host_reads():
    from test_no_host_sync import RefuseHostReads
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    opt = Adan(model.parameters(), lr=1e-2, max_grad_norm=0.5, **_triton())
    plain = Adan(twin.parameters(), lr=1e-2, max_grad_norm=0.5, fused=False)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for it in range(4):
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if it == 2:
            model[0].weight.grad[0, 0] = float("inf")
        with RefuseHostReads():
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if it != 2:
            torch.nn.functional.mse_loss(twin(x), y).backward()
            plain.step()
            plain.zero_grad()
    assert int(opt.param_groups[0]["step"]) == 3 == plain.param_groups[0]["step"]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_traces_the_triton_step():
    prob = make_problem(2, steps=3, clip="binding", none_prob=0.0, n_groups=1)
    groups = param_groups(prob)
    opt = Adan(groups, max_grad_norm=prob.max_grad_norm, **_triton())
    compiled = torch.compile(opt.step, backend="aot_eager")  # fake impl + functionalization, no C++ build
    for grads in prob.grads:
        for p, g in zip(groups[0]["params"], grads[0]):
            p.grad = g.float()
        compiled()
    _assert_tracks(groups, _reference(prob), rtol=2e-5, atol=2e-6)


def test_checkpoint_keeps_this_optimizers_backend():
    prob = make_problem(3, steps=4, none_prob=0.0, n_groups=1)
    groups = param_groups(prob)
    opt = Adan(groups, **_triton())
    run_torch(opt, groups, prob.grads[:2])
    other = Adan(param_groups(prob))  # fused=None on CPU: the compiled kernels or an unfused path
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.param_groups[0]["fused_backend"] is None
    assert other.fused_backends == (("cpu",) if _ext.extension_loaded() else (None,))


# ---------------------------------------------------------------- selection
def test_fused_none_never_picks_triton_on_cpu():
    p = torch.nn.Parameter(torch.randn(3))
    assert Adan([p]).fused_backends == (("cpu",) if _ext.extension_loaded() else (None,))
    assert Adan([p], fused=False).fused_backends == (None,)
    if _ext.extension_loaded():
        assert Adan([p], fused_backend="cpu").fused_backends == ("cpu",)
    assert Adan([p], fused_backend="triton").fused_backends == ("triton",)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(fused_backend="triton", caution=True), ValueError, "caution"),
    (dict(fused_backend="tritno"), ValueError, "fused_backend must be None or one of"),
    (dict(fused_backend="triton", fused=False), ValueError, "need the fused kernels"),
    (dict(fused_backend="triton", foreach=True), ValueError, "need the fused kernels"),
    (dict(fused_backend="cuda"), RuntimeError, "runs on cuda tensors, not on cpu"),
])
def test_bad_backend_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        Adan([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_options_the_triton_kernels_lack_are_refused_by_name():
    # kahan_sum and 8-bit states come with the low-memory kernels (issue 11); the check is already here.
    group = dict(Adan([torch.nn.Parameter(torch.randn(3))]).defaults, fused_backend="triton")
    assert _triton_lacks(group) == []
    for extra, name in ((dict(kahan_sum=True), "kahan_sum"), (dict(state_dtype="8bit"), "state_dtype='8bit'"),
                        (dict(caution=True), "caution")):
        assert _triton_lacks({**group, **extra}) == [name]
    with pytest.raises(ValueError, match="fused_backend='triton': the Triton kernels do not implement kahan_sum"):
        Adan._check_fused_options({**group, "kahan_sum": True})


def test_triton_on_cpu_outside_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(triton_adan, "interpreted", lambda: False)
    monkeypatch.setattr(_ext, "_triton_status", {})
    with pytest.raises(RuntimeError, match="CPU tensors only under TRITON_INTERPRET=1"):
        Adan([torch.nn.Parameter(torch.randn(3))], fused_backend="triton")


@pytest.mark.parametrize("compiled_cuda,triton_ok,lacks,requested,expected", [
    (True, True, (), None, "cuda"),          # compiled kernels first
    (False, True, (), None, "triton"),       # then Triton
    (False, False, (), None, None),          # then an unfused path (fused=None) / an error (fused=True)
    (False, True, ("kahan_sum",), None, None),
    (True, True, ("kahan_sum",), None, "cuda"),
    (True, True, (), "triton", "triton"),    # forced
    (False, True, (), "cuda", None),
])
def test_gpu_selection_order(monkeypatch, compiled_cuda, triton_ok, lacks, requested, expected):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_ext, "extension_loaded", lambda: True)
    monkeypatch.setattr(_ext, "fused_supported", lambda device: device.type == "cpu" or compiled_cuda)
    monkeypatch.setattr(_ext, "_triton_status", {cuda: (triton_ok, "" if triton_ok else "no GPU Triton")})
    backend, why = _ext.select_fused_backend(cuda, requested, lacks)
    assert backend == expected
    assert (why == "") == (expected is not None)


def test_gpu_without_compiled_kernels_uses_triton_then_unfused(monkeypatch):
    # An Adan on a "GPU" (meta tensors standing in): Triton when it is there, the unfused path when not.
    meta = torch.device("meta")
    monkeypatch.setattr(_ext, "_triton_status", {meta: (True, "")})
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert Adan([p]).fused_backends == ("triton",)
    assert Adan([p], caution=True).fused_backends == (None,)
    monkeypatch.setattr(_ext, "_triton_status", {meta: (False, "Triton is not importable")})
    assert Adan([p]).fused_backends == (None,)
    # fused=True builds on meta (as torch's fused optimizers do); stepping there says why it cannot.
    opt = Adan([p], fused=True)
    p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="Triton: Triton is not importable"):
        opt.step()


# ---------------------------------------------------------------- the benchmark row
def test_bench_triton_row_constructs_and_steps(monkeypatch):
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import bench_step as bs
    params = [torch.randn(s, requires_grad=True) for s in [(3, 4), (5,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = bs.VARIANTS["ours-fused-triton"].make(params)
    opt.step()
    assert opt.fused_backends == ("triton",)
    assert bs.step_bytes(opt) == 44 * 17
    monkeypatch.setattr(triton_adan, "interpreted", lambda: False)
    monkeypatch.setattr(_ext, "_triton_status", {})
    with pytest.raises(bs.Unavailable, match="TRITON_INTERPRET=1"):
        bs.VARIANTS["ours-fused-triton"].make(params)


# ---------------------------------------------------------------- compiled for GPUs, without a GPU
_COMPILE = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from adan_plugin import triton_adan as ta

    def compile_kernel(p_dtype, s_dtype, aligned, device_scalars, target):
        k = ta._adan_kernel
        sig = {name: "fp32" for name in k.arg_names}
        sig.update(tensor_table="*i64", chunk_table="*i32", chunk_base="i32", host_step="i64")
        consts = dict(FIRST=False, HAS_PARAM_STEPS=device_scalars, ALIGNED=aligned, LOW1=True, LOW2=False,
                      P_DTYPE=p_dtype, S_DTYPE=s_dtype, BLOCK=ta.BLOCK, CHUNK=ta.CHUNK)
        for name in ("step_ptr", "grad_coef_ptr", "grad_scale_ptr", "found_inf_ptr"):
            if device_scalars:
                sig[name] = "*fp32"
            else:
                consts[name] = None
        sig.update({name: "constexpr" for name in consts})
        src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in consts.items()})
        return triton.compile(src, target=target, options={"num_warps": ta.NUM_WARPS}).asm

    out = {}
    if sys.argv[1] == "1":
        for name, args in {"bf16-aligned": (tl.bfloat16, tl.bfloat16, True, True),
                           "fp16-fp32-unaligned": (tl.float16, tl.float32, False, False)}.items():
            asm = compile_kernel(*args, GPUTarget("cuda", 90, 32))
            out[name] = [line.split()[0] for line in asm["ptx"].splitlines()
                         if line.strip().startswith(("ld.global", "st.global"))] + [str(len(asm["cubin"]))]
    asm = compile_kernel(tl.float32, tl.bfloat16, True, False, GPUTarget("hip", "gfx942", 64))
    out["rocm-fp32-bf16-aligned"] = [line.split()[0] for line in asm["amdgcn"].splitlines()
                                     if "_load_" in line or "_store_" in line] + [str(len(asm["hsaco"]))]
    print(json.dumps(out))
""")


def _ptxas():
    for path in (os.environ.get("TRITON_PTXAS_PATH"), "/usr/local/cuda/bin/ptxas"):
        if path and os.path.isfile(path):
            return path
    import shutil
    return shutil.which("ptxas")


def test_kernel_compiles_for_nvidia_and_amd_gpus_with_vector_loads_when_aligned():
    # Not interpreted (TRITON_INTERPRET unset in the child): the real compiler pipeline down to a cubin
    # for sm_90 (needs ptxas: the CUDA toolkit CI builds with) and a hsaco for gfx942 (MI300).  The
    # alignment hints must give 16-byte loads and stores; the unaligned launch must not use them.
    import json
    ptxas = _ptxas()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if ptxas:
        env["TRITON_PTXAS_PATH"] = ptxas
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _COMPILE, "1" if ptxas else "0"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    rocm = out.pop("rocm-fp32-bf16-aligned")
    assert int(rocm[-1]) > 0 and any("dwordx4" in op for op in rocm)
    if not ptxas:
        pytest.skip("no ptxas (CUDA toolkit) here: the NVIDIA half of this check did not run")
    for name, ops in out.items():
        assert int(ops[-1]) > 0, name  # a cubin came out
        vector = [op for op in ops[:-1] if ".v4." in op]
        if name.endswith("-aligned"):
            assert any(op.startswith("ld.global.v4") for op in vector), (name, ops)
            assert any(op.startswith("st.global.v4") for op in vector), (name, ops)
        else:
            assert vector == [], (name, ops)
