"""bench.source_ab: kernel source variants side by side. On the CPU: the variants files it ships still fit the present
sources, its edits and file checks name what is wrong, and the variants compile for sm_90 (Gluon has no interpreter;
the timing itself runs only on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import source_ab as sa

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "bench" / "ablations").glob("*.json"))
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_the_shipped_variants_fit_the_present_sources(path: Path) -> None:
    data = sa.read_variants(path)
    sources = sa.variant_sources(data, list(data["variants"]))
    original = Path(sa.importlib.import_module(data["module"]).__file__).read_text()
    assert set(sources) == set(data["variants"]) and all(source != original for source in sources.values())
    entry, config_class = sa.ENTRIES[data["path"]][1:]
    module = sa.load_variant(data["module"], sources[next(iter(sources))], "test")
    assert callable(getattr(module, entry)) and getattr(module, config_class) is not None


def write(tmp_path: Path, variants: dict, path: str = "wgmma", module: str = "qkernels.gemm_wgmma") -> Path:
    file = tmp_path / "variants.json"
    file.write_text(json.dumps(dict(module=module, path=path, variants=variants)))
    return file


def test_edits_apply_in_order_and_name_what_does_not_fit() -> None:
    variants = {"a": [{"old": "x = 1", "new": "x = 2"}], "b": ["a", {"old": "x = 2", "new": "x = 3"}], "loop": ["loop"],
                "bad": [3], "twice": [{"old": "y", "new": "z", "count": 2}]}
    assert sa.apply_edits("x = 1\n", sa.edits_of(variants, "b"), "b") == "x = 3\n"
    assert sa.apply_edits("y y", sa.edits_of(variants, "twice"), "twice") == "z z"
    with pytest.raises(ValueError, match=r"variant 'a': the text 'x = 1' occurs 0 times in the source, not 1"):
        sa.apply_edits("x = 5\n", sa.edits_of(variants, "a"), "a")
    with pytest.raises(ValueError, match=r"occurs 1 times in the source, not 2"):
        sa.apply_edits("y", sa.edits_of(variants, "twice"), "twice")
    with pytest.raises(ValueError, match=r"variant 'c' is not in the file; choose from \['a', 'b'"):
        sa.edits_of(variants, "c")
    with pytest.raises(ValueError, match="includes itself"):
        sa.edits_of(variants, "loop")
    with pytest.raises(ValueError, match=r"variant 'bad': 3 is neither a variant name nor an edit"):
        sa.edits_of(variants, "bad")


def test_a_variants_file_names_its_bad_path_or_module(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"path 'mma' is not valid; choose from \['wgmma', 'wgmma_ws', 'gemv_mma'\]"):
        sa.read_variants(write(tmp_path, {"a": []}, path="mma"))
    with pytest.raises(ValueError, match="is not path 'wgmma''s module 'qkernels.gemm_wgmma'"):
        sa.read_variants(write(tmp_path, {"a": []}, module="qkernels.gemv_mma"))
    with pytest.raises(ValueError, match="non-empty 'variants'"):
        sa.read_variants(write(tmp_path, {}))


def test_a_stale_edit_stops_the_run_before_the_gpu(tmp_path: Path, capsys) -> None:
    file = write(tmp_path, {"stale": [{"old": "no such text in the module", "new": ""}]})
    with pytest.raises(SystemExit):
        sa.main(["--variants", str(file)])
    assert "variant 'stale': the text 'no such text in the module' occurs 0 times" in capsys.readouterr().err


def test_the_variants_compile_for_sm90() -> None:
    """Two of the shipped ablations (the decode asm and the split-K epilogue edited) against every wgmma case of
    qkernels.compile_check, in a fresh process with the interpreter off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.source_ab", "--variants", str(ROOT / "bench" / "ablations" / "wgmma_session24.json"),
                           "--compile-only", "--only", "nodecode,noreduce"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if " | " in line]
    assert len(lines) == 8 and all("REG:" in line for line in lines), done.stdout
    assert {line.split(" | ")[0] for line in lines} == {"nodecode", "noreduce"}


@pytest.mark.skipif(not HOPPER, reason="the wgmma GEMM needs a Hopper GPU")
def test_a_variant_is_timed_beside_the_package_and_cublas(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    variants = Path(__file__).parents[1] / "bench" / "ablations" / "wgmma_session24.json"
    assert sa.main(["--variants", str(variants), "--only", "before_evict", "--shapes", "1024x2048", "--batches", "64",
                    "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp16", "package", "before_evict"]
    assert all(r["us"] > 0 for r in rows)
    assert all(r["rel_error"] < 1e-2 for r in rows[1:])


def test_config_overrides_name_a_field_the_path_lacks(capsys) -> None:
    with pytest.raises(SystemExit):
        sa.main(["--variants", str(ROOT / "bench" / "ablations" / "gemv_session26.json"), "--config", "k_warps=4,group_ahead=2"])
    err = capsys.readouterr().err
    assert "'group_ahead' is not a field of GemvMmaConfig" in err and "'k_warps'" in err


@pytest.mark.skipif(not HOPPER, reason="run with the GPU tests (Hopper)")
def test_config_overrides_reach_every_module_of_the_cell(tmp_path: Path) -> None:
    """``--config``: the GEMV's warp groups along K at a cell whose rule runs another config, the package and the variant
    alike (ternary: the variant's edit is outside its code path, so both give the reference's result)."""
    out = tmp_path / "rows.json"
    assert sa.main(["--variants", str(ROOT / "bench" / "ablations" / "gemv_session26.json"), "--kernels", "ternary2", "--shapes", "1024x2048",
                    "--batches", "1", "--config", "stages=0,block_n=64,num_warps=16,split_k=1,k_warps=4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp16", "package", "kw_values_once"]
    assert all(r["config"]["k_warps"] == 4 and r["config"]["stages"] == 0 for r in rows[1:])
    assert all(r["rel_error"] < 1e-2 for r in rows[1:])
