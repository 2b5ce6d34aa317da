"""What GPTQ costs on this machine: SmolLM2 at W3 g64 with 128 x 2048 calibration tokens by default.

Runs one pipeline cell (so the quantized model is evaluated and stored like any other) and prints the
quantization time, the process's peak resident memory and the activation memory held while quantizing
(one block's inputs, overwritten in place by its outputs). Hydra overrides on the command line change
the cell, e.g. ``python -m bench.gptq_cost calib.n_samples=32 store.path=/tmp/s.sqlite``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from bench.pipeline import run_cell

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
DEFAULTS = ["model=smollm2", "method=gptq", "bits=3", "calib.n_samples=128", "calib.seqlen=2048", "tracker=none"]
GIB = 2**30


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=DEFAULTS + overrides)
    record = run_cell(cfg)
    report, timings = record["report"], record["timings"]
    calib = record["protocol"]["calibration"]
    params = record["protocol"]["model"]["params"]
    print(f"GPTQ on {record['model']} ({record['format']}), calibration {calib['n_samples']} x {calib['seqlen']} tokens, {record['env']['torch_threads']} threads")
    print(f"  quantization time : {timings['quantize']:.0f} s ({timings['quantize'] / 60:.1f} min)")
    print(f"  peak memory (RSS) : {report['quantize_peak_bytes'] / GIB:.2f} GiB for the whole process up to the end of quantization")
    print(f"  activations held  : {report['extras']['activation_bytes'] / GIB:.2f} GiB (one block's inputs/outputs)")
    print(f"  model weights     : {params * 4 / GIB:.2f} GiB per fp32 copy (the pristine model and the cell's copy)")
    print(f"  avg layer error   : {report['extras']['avg_layer_error']:.4f} (relative output error on calibration inputs)")
    print(f"  perplexity        : {', '.join(f'{k}={v:.3f}' for k, v in record['metrics'].items())}")


if __name__ == "__main__":
    main(sys.argv[1:])
