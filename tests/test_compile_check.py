"""qkernels.compile_check: the Triton kernels compile for Hopper on a machine without a GPU (in a fresh process, the
interpreter off), and a kernel that only the interpreter accepts is caught."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from qkernels.compile_check import Case, cases, signature


def run_clean(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_every_kernel_compiles_for_sm90() -> None:
    done = run_clean("-m", "qkernels.compile_check", "--arch", "90")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if ": " in line]
    assert [line.split(": ")[0] for line in lines] == [case.name for case in cases()]
    assert all("FAILED" not in line for line in lines)
    serialized = [line for line in lines if "WGMMA SERIALIZED" in line]  # correct but slow: no decode overlaps the tensor cores
    assert not serialized, serialized


def test_a_kernel_only_the_interpreter_runs_is_caught(tmp_path) -> None:
    """Session 17's bug: a constexpr ``if`` whose branches return int8 and uint8 (the interpreter runs it)."""
    script = textwrap.dedent('''
        import triton, triton.language as tl
        from triton.compiler.errors import CompilationError
        from qkernels.compile_check import Case, compile_case

        @triton.jit
        def operand(ptrs, A_ZERO: tl.constexpr):
            if A_ZERO:
                return (tl.load(ptrs) ^ 128).to(tl.int8, bitcast=True)
            return tl.load(ptrs)

        @triton.jit
        def kernel(a_ptr, y_ptr, A_ZERO: tl.constexpr):
            offs = tl.arange(0, 16)
            tl.store(y_ptr + offs, operand(a_ptr + offs, A_ZERO))

        try:
            compile_case(Case("broken", kernel, {"a_ptr": "*u8", "y_ptr": "*i8"}, dict(A_ZERO=True)), 90)
        except CompilationError:
            print("caught")
    ''')
    (tmp_path / "broken.py").write_text(script)  # (triton.jit reads the kernel's source from its file)
    done = run_clean(str(tmp_path / "broken.py"))
    assert done.stdout.strip() == "caught", done.stdout + done.stderr


def test_signature_names_what_is_missing_or_unknown() -> None:
    from qkernels import int_matmul as im

    case = Case("x", im._scale_int32_kernel, {"acc_ptr": "*i32"}, dict(BLOCK_M=32, BLOCK_N=128, A_ZERO=True))
    assert signature(case)["acc_ptr"] == "*i32" and signature(case)["M"] == "i32" and signature(case)["BLOCK_M"] == "constexpr"
    with pytest.raises(ValueError, match=r"no value for the constexprs \['A_ZERO'\]"):
        signature(Case("x", im._scale_int32_kernel, {}, dict(BLOCK_M=32, BLOCK_N=128)))
    with pytest.raises(ValueError, match=r"\['a_ptr'\] are not arguments"):
        signature(Case("x", im._scale_int32_kernel, {"a_ptr": "*i8"}, dict(BLOCK_M=32, BLOCK_N=128, A_ZERO=True)))


def test_the_dispatch_of_a_named_gpu_compiles_as_it_would_run_there() -> None:
    """``--dispatch``: the H200's saved batch-1 W4 config (three chunks in flight), its rules' wgmma configs (16 rows) and
    warp-specialized ones (64 rows), compiled with the launch's specializations; none serialized, and the dispatcher's
    view of this machine is restored."""
    done = run_clean("-m", "qkernels.compile_check", "--dispatch", "NVIDIA H200", "--shapes", "8192x8192", "--kinds", "w4g128,w1g128",
                     "--batches", "1,16,64")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" Gemv")[0].split(" Gemm")[0] for line in lines] == [
        "w4g128 8192x8192 M=1 gemv_mma", "w4g128 8192x8192 M=16 wgmma", "w4g128 8192x8192 M=64 wgmma_ws",
        "w1g128 8192x8192 M=1 gemv_mma", "w1g128 8192x8192 M=16 wgmma", "w1g128 8192x8192 M=64 wgmma_ws"]
    assert "values_tma=True" in lines[2]
    assert "stages=3" in lines[0] and "route=True" in lines[3]  # the saved H200 entry; W1's routed TMA rule (Hopper only)
    assert all("REG:" in line and "SERIALIZED" not in line for line in lines), lines


def test_as_gpu_puts_the_machine_back() -> None:
    import torch

    from qkernels import lowbit_matmul as lm
    from qkernels.compile_check import as_gpu

    before = lm.is_hopper
    with as_gpu("NVIDIA H200", 132):
        assert lm.is_hopper(torch.device("cpu"))
    assert lm.is_hopper is before and not lm.is_hopper(torch.device("cpu"))


def test_loop_spills_counts_only_the_main_loops() -> None:
    from qkernels.compile_check import loop_spills

    sass = "\n".join(f"        /*{addr:04x}*/  {op} ;" for addr, op in [
        (0x10, "STL [R1], R2"), (0x20, "HGMMA.64x64x16.F32 R24, R56, gdesc[UR4], R24"), (0x30, "LDL R3, [R1]"),
        (0x40, "@P0 BRA 0x20"),  # the main loop: 0x20-0x40, one spill in it
        (0x50, "STL [R1+0x4], R5"), (0x60, "@P1 BRA 0x50"),  # an epilogue loop without MMAs
        (0x70, "@!P0 BRA 0x70"), (0x80, "BRA 0x30")])  # an mbarrier retry and its jump back
    assert loop_spills(sass) == 1
