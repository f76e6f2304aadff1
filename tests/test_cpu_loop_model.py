"""tools/cpu_loop_model.py: the loops it hands to llvm-mca are the kernels' hot loops."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cpu_loop_model as clm  # noqa: E402

# objdump -d -C -M att output in miniature: jump annotations carry template names with '<' and '>'.
FN = "adan_plugin::avx512::update_range_q8_t<float, false, true>(adan_plugin::CpuTensor const&)"
OBJDUMP = f"""
0000000000001000 <void {FN}>:
    1000:	push   %rbp
    1004:	vmovups (%rsi),%zmm0
    1008:	vsqrtps %zmm0,%zmm1
    100c:	vsqrtps %zmm2,%zmm3
    1010:	call   2000 <free@plt>
    1012:	vaddps %zmm1,%zmm2,%zmm3
    1014:	jne    1004 <void {FN}+0x4>
    1018:	vmulps %zmm1,%zmm2,%zmm3
    101c:	vsqrtps %zmm0,%zmm1
    1020:	vdivps %zmm1,%zmm2,%zmm3
    1024:	vsqrtps %zmm2,%zmm3    # a comment
    1028:	jb     1018 <void {FN}+0x18>
    102c:	vrsqrt14ps %zmm4,%zmm5
    1030:	vminps %zmm4,%zmm5,%zmm6
    1034:	vpsubb %xmm4,%xmm5,%xmm6
    1038:	jge    102c <void {FN}+0x2c>
    103c:	vrsqrt14ps %zmm4,%zmm5
    1040:	vpsubb %xmm4,%xmm5,%xmm6
    1044:	jge    103c <void {FN}+0x3c>
    1048:	vrsqrt14ps %zmm4,%zmm5
    104c:	vpmaxub %xmm4,%xmm5,%xmm6
    1050:	jl     1048 <void {FN}+0x48>
    1054:	ret

0000000000003000 <other_function>:
    3000:	ret
"""


def test_parse_strips_annotations_and_finds_the_hot_loops():
    fns = clm.parse_functions(OBJDUMP, ["update_range_q8_t<float, false, true>(", "not there"])
    assert list(fns) == ["update_range_q8_t<float, false, true>("]
    instrs = fns["update_range_q8_t<float, false, true>("]
    assert instrs[0] == (0x1000, "push   %rbp")
    assert (0x1014, "jne    1004") in instrs  # '<void ...<float, ...>+0x4>' gone, so the target parses
    assert (0x1024, "vsqrtps %zmm2,%zmm3") in instrs  # comment gone

    loops = clm.find_loops(instrs)
    assert [lp.start for lp in loops] == [0x103c, 0x1048, 0x102c, 0x1018, 0x1004]  # shortest first
    main = clm.update_loop(loops)
    assert main.start == 0x1018  # two square roots and no call (the loop at 0x1004 calls)
    assert main.lanes("vsqrtps") == 16
    signed, sq = clm.quantizer_loops(loops)
    assert (signed.start, sq.start) == (0x103c, 0x1048)  # 0x102c clamps (vminps): the non-finite sequence


def test_missing_loops_are_named():
    fns = clm.parse_functions(OBJDUMP.replace("vsqrtps", "vmulps").replace("vpmaxub", "vpaddb"), [FN[:40]])
    loops = clm.find_loops(next(iter(fns.values())))
    with pytest.raises(LookupError, match="update loop"):
        clm.update_loop(loops)
    with pytest.raises(LookupError, match="quantizer"):
        clm.quantizer_loops(loops)


needs_tools = pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("llvm-mca") is None
                                 or not glob.glob(os.path.join(ROOT, "adan_plugin", "_C*.so")),
                                 reason="needs objdump, llvm-mca and the built extension")


@needs_tools
def test_built_kernels_loops_are_found_and_modelled():
    so = clm.extension_path()
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", "-M", "att", so],
                          capture_output=True, text=True, check=True).stdout
    names = {(isa, kind): clm.symbol(isa, kind) for isa in ("avx2", "avx512") for kind in clm.STATE_KINDS}
    fns = clm.parse_functions(text, list(names.values()))
    for (isa, kind), name in names.items():
        loops = clm.find_loops(fns[name])
        main = clm.update_loop(loops)
        width = 16 if isa == "avx512" else 8
        assert main.lanes("vsqrtps") == width and main.count("vdivps") == 2  # two vectors a group
        if kind == "8bit":
            signed, sq = clm.quantizer_loops(loops)
            assert signed.start != sq.start
            for lp in (signed, sq):
                assert lp.count("vrsqrt14ps" if isa == "avx512" else "vrsqrtps") >= 1
                assert lp.count("vmovdqu", "vmovdqu8") >= 1  # each stores its codes
        r = clm.model(fns, isa, kind, "icelake-server" if isa == "avx512" else "znver3")
        assert r["update"] > 0 and r["total"] == pytest.approx(r["update"] + r.get("quantize", 0.0))
        if kind == "8bit":
            assert r["quantize"] > 0


@needs_tools
def test_command_line_prints_a_row_per_build_and_state(capsys):
    assert clm.main(["--mcpu", "icelake-server", "--isa", "avx512"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| icelake-server")]
    assert [r.split(" | ")[1:3] for r in rows] == [["avx512", "bf16"], ["avx512", "8bit"]]


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("llvm-mca") is None,
                    reason="needs objdump and llvm-mca")
@pytest.mark.parametrize("argv, message", [(["--mcpu", "znver9"], "no CPU model znver9"),
                                           (["--isa", "avx3"], "--isa avx3: the builds are")])
def test_unknown_model_or_build_is_a_one_line_refusal(argv, message, capsys):
    # llvm-mca itself would go on with a generic model for some misspellings; the tool refuses first.
    assert clm.main(argv) == 2
    err = capsys.readouterr()
    assert message in err.err and err.out == ""
