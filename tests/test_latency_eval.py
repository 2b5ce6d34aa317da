"""eval=latency: composed from its YAML, skipped (not failed) without a GPU, timed with one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench.metrics import EvalContext  # noqa: E402
from bench.metrics.latency import Latency  # noqa: E402
from bench.models import ModelBundle, find_blocks  # noqa: E402
from methods.common.formats import IntFormat  # noqa: E402
from methods.common.method import QuantSpec  # noqa: E402
from methods.common.microscaling import MxFormat, NvFormat  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"


def tiny_bundle(device: str) -> ModelBundle:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval().to(device)
    blocks, prefix = find_blocks(model)
    layers = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in b.named_modules() if isinstance(m, nn.Linear)}
    return ModelBundle("tiny", "llm", model, None, list(blocks), prefix, layers)


@pytest.fixture(scope="module")
def cpu_bundle() -> ModelBundle:
    return tiny_bundle("cpu")


def composed_latency(bits: int = 4) -> Latency:
    """The evaluator as the pipeline builds it: eval/latency.yaml with the cell's format interpolated."""
    cfg = OmegaConf.create({
        "bits": bits, "group_size": 128,
        "format": OmegaConf.load(CONF / "format" / "int.yaml"),
        "eval": OmegaConf.load(CONF / "eval" / "latency.yaml"),
    })
    evaluator = instantiate(cfg.eval.latency)
    assert isinstance(evaluator, Latency) and isinstance(evaluator.format, IntFormat)
    return evaluator


def test_latency_is_recorded_as_skipped_without_a_gpu(tmp_path: Path, cpu_bundle: ModelBundle) -> None:
    result = composed_latency()(cpu_bundle, EvalContext(cache_dir=tmp_path, cell_key="k"))
    assert result.metrics == {}
    assert result.protocol["latency"]["skipped"] == "no GPU"


def test_latency_skips_formats_without_kernels(cpu_bundle: ModelBundle) -> None:
    evaluator = Latency(format=IntFormat(bits=8, group_size=128))
    bundle = cpu_bundle
    bundle_on_gpu = type("B", (), {"device": torch.device("cuda")})()
    assert "no packed kernel" in evaluator.skip_reason(bundle_on_gpu)
    assert evaluator.skip_reason(bundle) == "no GPU"
    assert Latency(format=NvFormat("e2m1")).skip_reason(bundle_on_gpu) is None  # the block kernels


def test_latency_measurement_flow_with_stubbed_gpu_timers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_bundle: ModelBundle) -> None:
    """The GPU branch end to end on the CPU: timers and CUDA memory calls stubbed, kernels on the torch path."""
    import bench.kernel_latency
    import bench.metrics.latency as latency

    monkeypatch.setattr(Latency, "skip_reason", lambda self, bundle, act=None: None)
    monkeypatch.setattr(bench.kernel_latency, "copies_for", lambda nbytes: 2)
    monkeypatch.setattr(latency, "time_side_by_side", lambda makers, modes: {key: (make(), {mode: 2.0 for mode in modes})[1]
                                                                             for key, make in makers.items()})
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1e9)
    monkeypatch.setattr(latency, "compiled_decode_tokens_per_s", lambda model, prompt, tokens: 5.0)
    prompts = []
    monkeypatch.setattr(latency, "prefill_ms", lambda model, prompt: prompts.append(prompt.shape) or 3.0)
    bundle = cpu_bundle
    evaluator = composed_latency()
    evaluator.decode_tokens = 2
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k"))
    assert result.metrics["latency/layers_steady_speedup/b16"] == 1.0
    assert result.metrics["latency/decode_peak_memory_gb"] == 1.0
    metrics = result.metrics
    assert metrics["latency/decode_compiled_tokens_per_s"] == metrics["latency/decode_compiled_tokens_per_s_unquantized"] == 5.0
    assert result.metrics["latency/decode_tokens_per_s"] > 0 and result.protocol["latency"]["decode"]["loops"] == ["eager", "compiled"]
    assert metrics["latency/prefill_ms"] == metrics["latency/prefill_ms_unquantized"] == 3.0
    assert prompts == [(1, 256)] * 2 and result.protocol["latency"]["decode"]["prefill_tokens"] == 256  # 512 capped at the positions

    def cannot_compile(model, prompt, tokens):
        raise RuntimeError("Unsupported: a graph break\nmore detail")

    monkeypatch.setattr(latency, "compiled_decode_tokens_per_s", cannot_compile)
    decode = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k")).protocol["latency"]["decode"]
    assert decode["failed_loops"] == {"compiled": "RuntimeError: Unsupported: a graph break"}  # recorded; eager still timed
    assert decode["tokens_per_s"] > 0 and "compiled_tokens_per_s" not in decode
    assert {row["in"] for row in result.protocol["latency"]["layer_shapes"]} == {256, 512}
    assert not any(type(m).__name__ == "QuantLinear" for m in bundle.model.modules())

    evaluator.format = MxFormat("e2m1")  # an MX cell: its layers on the block kernels, its decode with BlockLinear layers
    monkeypatch.setattr(latency, "compiled_decode_tokens_per_s", lambda model, prompt, tokens: 5.0)
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k"))
    assert {(row["batch"], row["path"]) for row in result.protocol["latency"]["layer_shapes"]} == {(1, "block mma"), (16, "block mma")}
    assert result.metrics["latency/decode_tokens_per_s"] > 0 and result.protocol["latency"]["format"] == MxFormat("e2m1").describe()
    assert not any(type(m).__name__ == "BlockLinear" for m in bundle.model.modules())
    evaluator.format = MxFormat("int8")  # 8-bit elements: the GEMV at batch 1, the dot kernel above
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k"))
    assert {(row["batch"], row["path"]) for row in result.protocol["latency"]["layer_shapes"]} == {(1, "block gemv"), (16, "block")}

    # a W8A8 cell (per-channel int8 weights, dynamic per-token int8 activations): the W8A8 kernel with its activation
    # quantization timed, the decode with ActQuantLinear layers; W4 g128 A8: the W4A8 kernel; W2 g128 A8: lowbit
    w8 = IntFormat(bits=8, group_size="channel", symmetric=True)
    spec = QuantSpec(weight=w8, act=IntFormat(bits=8, group_size="token"))
    evaluator.format = w8
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k", spec=spec))
    assert {(row["batch"], row["path"]) for row in result.protocol["latency"]["layer_shapes"]} == {(1, "w8a8 triton"), (16, "w8a8 triton")}
    assert result.protocol["latency"]["activations"] == "int8-asym-gtoken (w8a8 kernel)" and result.metrics["latency/decode_tokens_per_s"] > 0
    assert not any(type(m).__name__ == "ActQuantLinear" for m in bundle.model.modules())
    evaluator.format = IntFormat(bits=4, group_size=128)  # W4A8: its kernel
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k", spec=QuantSpec(weight=evaluator.format, act=spec.act)))
    assert {row["path"] for row in result.protocol["latency"]["layer_shapes"]} == {"w4a8 triton"}  # (on a GPU: "w4a8 lowbit")
    evaluator.format = IntFormat(bits=2, group_size=128)  # W2 g128 A8: lowbit (fake-quantized tokens on the weight-only kernels)
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k", spec=QuantSpec(weight=evaluator.format, act=spec.act)))
    assert result.protocol["latency"]["activations"].startswith("int8-asym-gtoken (lowbit kernel: fake-quantized per token")
    assert {row["path"] for row in result.protocol["latency"]["layer_shapes"]} == {"lowbit"}
    # clipped W2 g128 weights with A8: no activation kernel (they take min-max weights), so the weight-only one, and the record says so
    evaluator.format = IntFormat(bits=2, group_size=128, clip="percentile")
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k", spec=QuantSpec(weight=evaluator.format, act=spec.act)))
    assert result.protocol["latency"]["activations"].startswith("fp16 in the timed kernels: activation-quantized kernels take min-max int weights")
    assert {row["path"] for row in result.protocol["latency"]["layer_shapes"]} == {"torch"}  # (the CPU's path for the packed weight)

    # on a Hopper GPU the rows name the Gluon kernels' tile configs (path picked as there; the stubbed timer runs no kernel)
    import qkernels.lowbit_matmul as lm

    monkeypatch.setattr(lm, "pick_path", lambda m, pw, device, dtype=None: "gemv_mma" if m == 1 else "wgmma")
    evaluator.format = IntFormat(bits=4, group_size=128)
    _, rows = evaluator.time_layers(bundle)
    assert {row["path"] for row in rows} == {"gemv_mma", "wgmma"}
    assert all(row["config"]["split_k"] >= 1 for row in rows) and {row["config"].get("block_m") for row in rows if row["batch"] == 16} == {16}


def test_decode_loops_and_token_counts_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\['graph'\]; choose from \['eager', 'compiled'\]"):
        Latency(format=IntFormat(bits=4, group_size=128), decode_loops=["eager", "graph"])
    with pytest.raises(ValueError, match=r"\{'prefill_tokens': -1\}"):
        Latency(format=IntFormat(bits=4, group_size=128), prefill_tokens=-1)


def test_compiled_step_decodes_as_the_eager_loop_with_quantlinear_layers(cpu_bundle: ModelBundle) -> None:
    """The compiled loop's step (static KV cache, one graph with the qkernels operator) gives the eager loop's
    greedy tokens; Inductor is swapped for aot_eager to keep the test short."""
    from bench.metrics.latency import compiled_step
    from qkernels.qlinear import quantize_linear_layers, restore_linear_layers

    prompt = torch.randint(0, 512, (1, 6))
    originals = quantize_linear_layers(cpu_bundle, IntFormat(bits=4, group_size=128))
    try:
        with torch.no_grad():
            out = cpu_bundle.model(prompt, use_cache=True)
            past, token, eager = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for _ in range(4):
                eager.append(int(token))
                out = cpu_bundle.model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            step, token, pos = compiled_step(cpu_bundle.model, prompt, 4, backend="aot_eager")
            compiled = []
            for _ in range(4):
                compiled.append(int(token))
                step()
    finally:
        restore_linear_layers(cpu_bundle, originals)
    assert compiled == eager and int(pos) == 6 + 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_format", [None, NvFormat("e2m1")], ids=["int", "nvfp4"])
def test_latency_on_gpu_times_layers_and_decode(tmp_path: Path, block_format) -> None:
    bundle = tiny_bundle("cuda")
    evaluator = composed_latency()
    evaluator.modes, evaluator.decode_tokens = ("steady",), 4
    evaluator.format = block_format or evaluator.format
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k"))
    assert result.metrics["latency/layers_steady_us/b1"] > 0
    assert result.metrics["latency/decode_tokens_per_s"] > 0 and result.metrics["latency/prefill_ms"] > 0
    decode = result.protocol["latency"]["decode"]  # QuantLinear and BlockLinear: custom operators under torch.compile
    assert "failed_loops" not in decode and result.metrics["latency/decode_compiled_tokens_per_s"] > 0
    assert result.protocol["latency"]["gpu"] != "none"
    assert not any(type(m).__name__ in ("QuantLinear", "BlockLinear") for m in bundle.model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4)], ids=["w8a8", "w4a4-lowbit"])
def test_latency_on_gpu_runs_activation_quantized_cells(tmp_path: Path, w_bits: int, a_bits: int) -> None:
    """Per-channel weights and per-token activations: the layers and the eager decode on the activation-quantized
    kernels, eager and compiled (the layer is the operator qkernels::act_quant_matmul under torch.compile)."""
    bundle = tiny_bundle("cuda")
    evaluator = composed_latency()
    evaluator.modes, evaluator.decode_tokens = ("steady",), 4
    evaluator.format = IntFormat(bits=w_bits, group_size="channel", symmetric=w_bits == 8)
    spec = QuantSpec(weight=evaluator.format, act=IntFormat(bits=a_bits, group_size="token"))
    result = evaluator(bundle, EvalContext(cache_dir=tmp_path, cell_key="k", spec=spec))
    assert result.metrics["latency/layers_steady_us/b1"] > 0 and result.metrics["latency/decode_tokens_per_s"] > 0
    assert "kernel" in result.protocol["latency"]["activations"]
    paths = {row["path"] for row in result.protocol["latency"]["layer_shapes"]}
    assert paths == ({"w8a8 triton"} if w_bits == 8 else {"lowbit"})  # (batches 1 and 16)
    assert "failed_loops" not in result.protocol["latency"]["decode"] and result.metrics["latency/decode_compiled_tokens_per_s"] > 0
    assert not any(type(m).__name__ == "ActQuantLinear" for m in bundle.model.modules())


def test_kernel_latency_rejects_unknown_tune_paths(capsys: pytest.CaptureFixture) -> None:
    """A bad ``--tune-paths`` is named with the valid choices before anything is timed (with or without a GPU)."""
    from bench.kernel_latency import main

    with pytest.raises(SystemExit):
        main(["--tune", "--tune-paths", "gemv,gemm"])
    err = capsys.readouterr().err
    assert "['gemm']" in err and "'gemv', 'mma'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_kernel_latency_takes_tune_wgmma(capsys: pytest.CaptureFixture) -> None:
    """``--tune-wgmma`` parses; without a GPU nothing is timed (exit code 1, said on stderr)."""
    from bench.kernel_latency import main

    assert main(["--tune-wgmma", "--shapes", "8192x8192", "--batches", "64", "--kernels", "w4g128"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_kernel_latency_takes_tune_gemv_mma(capsys: pytest.CaptureFixture) -> None:
    """``--tune-gemv-mma`` parses; without a GPU nothing is timed (exit code 1, said on stderr)."""
    from bench.kernel_latency import main

    assert main(["--tune-gemv-mma", "--shapes", "8192x8192", "--batches", "1", "--kernels", "w1g128"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_tune_cell_installs_the_fastest_and_times_the_default_once() -> None:
    """The shared step of ``--tune-wgmma`` and ``--tune-gemv-mma``: the default is timed once (in or beside the
    search), the fastest config that ran is installed, failing candidates are skipped, a stale entry goes."""
    from bench.kernel_latency import tune_cell
    from qkernels.gemv_mma import GemvMmaConfig

    default, fast, broken = GemvMmaConfig(64, 4, 4), GemvMmaConfig(128, 4, 4), GemvMmaConfig(128, 8, 8)
    calls: list = []
    times = {default: 12.0, fast: 10.0, broken: None}
    tuned = {("key",): broken}
    result = tune_cell(tuned, ("key",), default, [fast, broken], lambda c: calls.append(c) or times[c], "cell")
    assert tuned == {("key",): fast} and calls.count(default) == 1 and result["default"][0] == 12.0
    assert [us for us, _ in result["timed"]] == [10.0, 12.0]
    assert tune_cell(tuned, ("key",), broken, [], lambda c: None, "cell") is None and tuned == {}
    winners: dict = {}
    tune_cell(tuned, ("key",), default, [fast], lambda c: times[c], "cell", winners)
    tune_cell(tuned, ("other",), default, [fast], lambda c: {default: 9.0, fast: 10.0}[c], "cell", winners)
    assert winners == {("key",): (fast, 10.0)}  # only configs that beat the rules' default are kept for saving


def test_save_winners_merges_the_winners_and_drops_what_the_rules_won(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import kernel_latency
    from qkernels import tuned
    from qkernels.gemv_mma import GemvMmaConfig

    monkeypatch.setenv("QKERNELS_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_latency, "gpu_name", lambda: "NVIDIA Test")
    monkeypatch.setattr(tuned, "gpu_of", lambda device: "NVIDIA Test")
    tuned.save("NVIDIA Test", "gemv_mma", {("a",): (GemvMmaConfig(split_k=2), 1.0), ("b",): (GemvMmaConfig(split_k=8), 1.0)})
    kernel_latency.save_winners("gemv_mma", {("c",): (GemvMmaConfig(num_warps=8, block_n=128), 2.0)}, [("b",), ("c",)])
    assert tuned.saved("gemv_mma", GemvMmaConfig, torch.device("cpu")) == {("a",): GemvMmaConfig(split_k=2),
                                                                           ("c",): GemvMmaConfig(num_warps=8, block_n=128)}


def test_save_tuned_needs_a_tuner(capsys: pytest.CaptureFixture) -> None:
    from bench.kernel_latency import main

    with pytest.raises(SystemExit):
        main(["--save-tuned"])
    assert "--save-tuned saves what --tune-gemv-mma or --tune-wgmma finds" in capsys.readouterr().err


def test_kernel_table_times_the_fp32_gemv_beside_the_pair_one_at_batch_1(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.kernel_latency import paths_for
    from qkernels import lowbit_matmul as lm
    from qkernels.pack import pack_weight

    def packed(layout: str, top: int):
        return pack_weight(torch.randint(0, top + 1, (64, 1024)), torch.rand(64, 8).half(), torch.randint(0, top + 1, (64, 8)).half(),
                           layout, 128)

    assert "gemv_fp32" in paths_for(1, packed("uint2", 3)) and "gemv_fp32" not in paths_for(16, packed("uint2", 3))
    monkeypatch.setattr(lm, "is_hopper", lambda device: False)
    assert paths_for(2, packed("uint3", 7)) == ["gemv", "mma"]  # the MMA kernel timed beside the dispatcher's pair GEMV
    monkeypatch.setattr(lm, "is_hopper", lambda device: True)
    assert paths_for(2, packed("uint3", 7)) == ["wgmma", "gemv", "mma"]  # on Hopper the wgmma GEMM's, the others beside it
    assert paths_for(16, packed("uint3", 7)) == ["wgmma", "mma"]  # (the GEMV to GEMV_MAX_M rows)
    assert {"gemv", "gemv_fp32"} <= set(paths_for(1, packed("uint3", 7)))
