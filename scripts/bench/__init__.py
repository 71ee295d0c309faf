"""The parts of scripts/benchmark.py, each readable on its own:

- stats: medians, ratios, run order, the targets and their checks, markdown tables (pure)
- measure: what a step costs: the step probe (time, UNet rows), FLOPs, live tensor bytes, call counters
- models: ComfyUI in CPU or CUDA mode, full-size random-weight base UNets and stock ControlNets, conditionings
- runner: the configurations of each model family and how they are measured side by side
- long_video: ControlNeXt-SVD v2 long videos, time per frame and memory per model call vs windows
- preprocessors: time per frame of the preprocessor nodes
- report: the generated part of docs/benchmarks.md
"""
import os

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS_DIR = os.path.join(PACK_DIR, "tests")
GB = 1024 ** 3
