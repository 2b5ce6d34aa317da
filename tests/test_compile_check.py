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
