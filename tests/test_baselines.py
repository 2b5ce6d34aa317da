"""Baselines and their shared machinery: GPTQ solver, folded transforms, block-wise passes, pipeline runs."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from bench.data import CalibrationData
from bench.errors import ConfigError
from bench.models import ModelBundle, bundle_of
from bench.pipeline import run_cell
from methods.common.capture import capture_block_inputs
from methods.common.act import attach_act_quant, attach_kv_quant, attach_static_act_quant, observe_input_ranges
from methods.common.formats import IntFormat
from methods.common.gptq_solver import gptq_quantize, relative_output_error
from methods.common.method import ActQuant
from methods.common.rotation import attach_online_hadamard, rotate_residual_stream, rotate_values
from methods.common.sequential import BlockRunner, run_blockwise
from methods.common.transforms import decoder_parts, norm_offset, scale_pairs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SEQLEN = 48


def tiny_llama() -> ModelBundle:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return _randomize_norms(bundle_of(LlamaForCausalLM(config).eval(), "llama", "llm"))


def tiny_gemma() -> ModelBundle:
    """Gemma-3 blocks: (1 + w) norms, sandwich norms, q/k norms, sliding and global layers with their own masks."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128, query_pre_attn_scalar=16,
    )  # fmt: skip
    return _randomize_norms(bundle_of(Gemma3ForCausalLM(config).eval(), "gemma", "llm"))


def _randomize_norms(bundle: ModelBundle) -> ModelBundle:
    """Non-trivial norm gains, so that folding them is actually tested."""
    with torch.no_grad():
        for name, module in bundle.model.named_modules():
            if name.endswith("norm") or name.endswith("layernorm"):
                module.weight.uniform_(0.5, 1.5) if norm_offset(module) == 0 else module.weight.uniform_(-0.5, 0.5)
    return bundle


def ids(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def logits(bundle: ModelBundle, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bundle.model(input_ids).logits


BUNDLES = {"llama": tiny_llama, "gemma": tiny_gemma}


# ---------------------------------------------------------------- GPTQ solver


def correlated_inputs(tokens: int = 2048, width: int = 128) -> torch.Tensor:
    """Inputs like an LLM's: correlated channels, a few with large magnitudes."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(width // 4, width, generator=g)
    x = torch.randn(tokens, width // 4, generator=g) @ mixing + 0.1 * torch.randn(tokens, width, generator=g)
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("group_size", [32, "channel"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_solver_has_less_output_error_than_rtn(group_size, symmetric, act_order, static_groups):
    x = correlated_inputs()
    weight = torch.randn(96, x.shape[1], generator=torch.Generator().manual_seed(1))
    hessian = x.T @ x / x.shape[0]
    fmt = IntFormat(bits=3, group_size=group_size, symmetric=symmetric)
    result = gptq_quantize(weight, hessian, fmt, act_order=act_order, static_groups=static_groups, block_size=48)
    rtn_error = relative_output_error(weight, fmt.fake_quant(weight), hessian)
    measured = ((x @ (weight - result.weight).T).pow(2).sum() / (x @ weight.T).pow(2).sum()).item()
    assert result.relative_error == pytest.approx(measured, rel=1e-3)
    assert result.relative_error < 0.8 * rtn_error


def test_gptq_solver_output_lies_on_the_format_grid():
    x = correlated_inputs()
    weight = torch.randn(32, x.shape[1])
    fmt = IntFormat(bits=3, group_size=32, symmetric=False)
    result = gptq_quantize(weight, x.T @ x / x.shape[0], fmt, static_groups=True, act_order=True)
    scale, zero = fmt.scales_for(weight.reshape(32, -1, 32))
    codes = result.weight.reshape(32, -1, 32) / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= fmt.qmin - 1e-3 and codes.max() <= fmt.qmax + 1e-3


# ---------------------------------------------------------------- function-preserving transforms


def test_norm_offset_is_found_by_probing():
    assert norm_offset(tiny_llama().blocks[0].input_layernorm) == 0.0
    assert norm_offset(tiny_gemma().blocks[0].input_layernorm) == 1.0


@pytest.mark.parametrize("arch", sorted(BUNDLES))
def test_folded_smoothing_scales_leave_the_output_unchanged(arch):
    bundle = BUNDLES[arch]()
    before = logits(bundle, ids())
    names = {layer: name for name, layer in bundle.layers.items()}
    g = torch.Generator().manual_seed(2)
    for block in bundle.blocks:
        for pair in scale_pairs(decoder_parts(block), names, ("attn_in", "v_o", "mlp_in", "up_down")):
            width = pair.prev.weight.shape[0]
            pair.apply(torch.rand(width, generator=g) * 4 + 0.25)
    assert torch.allclose(logits(bundle, ids()), before, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(BUNDLES))
def test_rotations_leave_the_output_unchanged(arch):
    bundle = BUNDLES[arch]()
    before = logits(bundle, ids())
    rotate_residual_stream(bundle, seed=0)
    for block in bundle.blocks:
        parts = decoder_parts(block)
        rotate_values(parts)
        attach_online_hadamard(parts.down)
        attach_online_hadamard(parts.o)
    head, embed = bundle.model.get_output_embeddings(), bundle.model.get_input_embeddings()
    assert head.weight.data_ptr() != embed.weight.data_ptr()
    assert torch.allclose(logits(bundle, ids()), before, atol=1e-4)


# ---------------------------------------------------------------- block-wise passes


@pytest.mark.parametrize("arch", sorted(BUNDLES))
def test_blockwise_pass_holds_one_block_of_activations_and_reproduces_the_model(arch):
    bundle = BUNDLES[arch]()
    calib = CalibrationData(ids(n=5))
    shape = (5, SEQLEN, bundle.model.config.hidden_size)
    buffers = []

    def visit(runner: BlockRunner) -> None:
        gc.collect()
        alive = [o for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == shape]
        assert len(alive) == 1
        buffers.append(runner.hidden)

    run_blockwise(bundle, calib, visit, batch_size=2)
    assert all(buffer is buffers[0] for buffer in buffers)
    parent = bundle.model.get_submodule(bundle.block_prefix.rsplit(".", 1)[0])
    with torch.no_grad():
        expected = bundle.model(calib.input_ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(parent.norm(buffers[0]), expected, atol=1e-5)


def test_layer_groups_follow_shared_inputs():
    bundle = tiny_llama()
    inputs = capture_block_inputs(bundle, ids(1), batch_size=1)
    runner = BlockRunner(0, bundle.blocks[0], bundle.block_layers(0), inputs.hidden, inputs.calls[0])
    groups = [[name.rsplit(".", 1)[-1] for name in group] for group in runner.layer_groups()]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


# ---------------------------------------------------------------- activation quantization


def test_static_and_dynamic_activation_quantization():
    bundle = tiny_llama()
    calib = CalibrationData(ids(n=4))
    fmt = IntFormat(bits=8, group_size="token", symmetric=False)
    ranges = observe_input_ranges(bundle, calib)
    assert set(ranges) == set(bundle.layers)
    reference = logits(bundle, ids())
    for granularity in ("tensor", "channel"):
        handles = attach_static_act_quant(bundle, fmt, ranges, granularity, clip_ratio=1.0)
        assert (logits(bundle, ids()) - reference).abs().max() < 0.2
        for handle in handles:
            handle.remove()
    handles = attach_act_quant(bundle, IntFormat(bits=2, group_size="token"), clip_ratio=0.5)
    handles += attach_kv_quant(bundle, bits=2)
    assert not torch.allclose(logits(bundle, ids()), reference, atol=1e-2)
    for handle in handles:
        handle.remove()
    assert torch.allclose(logits(bundle, ids()), reference)


@pytest.mark.parametrize("knobs", [{"static": "row"}, {"clip_ratio": 1.5}, {"kv_bits": 1}])
def test_act_quant_rejects_bad_values_naming_the_choices(knobs):
    with pytest.raises(ConfigError, match=str(next(iter(knobs.values())))):
        ActQuant(**knobs)


# ---------------------------------------------------------------- pipeline runs (compose API)


def compose_cell(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "model=tiny", "tracker=none", f"store.path={tmp_path}/s.sqlite", "calib.n_samples=4",
                "calib.seqlen=64", "eval.ppl.max_windows=1", *overrides,
            ],
        )  # fmt: skip


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("gptq", ["method.act_order=true", "bits=3"]),
        ("awq", ["bits=3"]),
        ("smoothquant", ["bits=8", "act_bits=8", "group_size=channel"]),
        ("quarot", ["method.weight_method=gptq", "act_bits=8", "group_size=channel"]),
        ("rtn", ["act_bits=8", "act_quant.static=channel"]),
    ],
)
def test_pipeline_runs_baselines_and_records_calibration(tmp_path, method, overrides):
    cfg = compose_cell(tmp_path, f"method={method}", *overrides)
    record = run_cell(cfg)
    assert record["method"] == method
    assert all(value == value and value > 0 for value in record["metrics"].values())
    calibration = record["protocol"]["calibration"]
    assert (calibration["source"], calibration["n_samples"], calibration["seqlen"], calibration["seed"]) == ("wiki", 4, 64, 0)


def test_methods_without_calibration_record_none(tmp_path):
    overrides = ["act_bits=4", "group_size=channel", "act_quant.clip_ratio=0.9", "act_quant.kv_bits=4"]
    record = run_cell(compose_cell(tmp_path, "method=quarot", *overrides))
    assert record["metrics"] and "calibration" not in record["protocol"]


@pytest.mark.parametrize(
    "method,override,message",
    [
        ("gptq", "method.damp_percent=2", "damp_percent=2"),
        ("quarot", "method.weight_method=awq", "weight_method='awq'"),
        ("quarot", "method.online_hadamard=[q_proj]", "q_proj"),
        ("smoothquant", "method.alpha=1.5", "alpha=1.5"),
        ("awq", "method.max_shrink=1", "max_shrink=1"),
    ],
)
def test_bad_method_knobs_are_named(tmp_path, method, override, message):
    with pytest.raises(ConfigError, match=message):
        run_cell(compose_cell(tmp_path, f"method={method}", override))


# ---------------------------------------------------------------- sweep preset


def expanded_cells(preset: str) -> list[dict[str, str]]:
    """The cells ``python run.py -m +sweep=<preset>`` launches, as override dicts (Hydra's own expansion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={preset}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)  # as the sweeper receives them
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [dict(item.split("=", 1) for item in cell) for batch in batches for cell in batch]


def test_baselines_sweep_expands_to_the_intended_grid():
    cells = expanded_cells("baselines")
    weight_only = [c for c in cells if c["method"] in ("rtn", "gptq", "awq")]
    assert len(weight_only) == 2 * 3 * 3 * 2 * 2  # models x methods x bits x group sizes x sym/asym
    assert {c["+granularity"] for c in weight_only} == {"model_default", "channel"}
    assert {c["model"] for c in cells} == {"smollm2", "gemma3_270m"}
    assert any(c["method"] == "fp" for c in cells)


def test_baselines_wa_sweep_expands_to_the_intended_grid():
    cells = expanded_cells("baselines_wa")
    pairs = {(c["method"], c["+precision"]) for c in cells}
    assert {("smoothquant", "w8a8"), ("rtn", "w4a4"), ("quarot", "w4a4"), ("rtn", "w4a8"), ("quarot", "w4a8")} <= pairs
    assert {c["model"] for c in cells} == {"smollm2", "gemma3_270m"}
