"""The parts of scripts/benchmark.py, each readable on its own:

- stats: medians, ratios, run order, the targets and their checks, markdown tables (pure)
- measure: what a step costs: the step probe (time, UNet rows), FLOPs, live tensor bytes, call counters
- models: ComfyUI in CPU or CUDA mode, full-size random-weight base UNets and stock ControlNets, conditionings
- runner: the configurations of each model family and how they are measured side by side
- long_video: ControlNeXt-SVD v2 long videos, time per frame and memory per model call vs windows
- preprocessors: time per frame of the preprocessor nodes
- training: the convergence toy and training throughput
- silent_signal: MIControlNet's data balancing on a toy (total variation in silent regions, plain vs balanced)
- model_patches: Z-Image with two Fun ControlNet Union patches, and Qwen-Image with an InstantX and a 2512 Fun
  ControlNet (Apply ControlNet), summed vs balanced
- asymmetry: MIControlNet's Asym of a ControlNeXt and of a stock ControlNet (estimate, spread, time) and the
  conservativity stage's cost per training step
- two_controls: MIControlNet's training recipe on a toy (two controls summed vs balanced; Asym with and without
  the conservativity stage)
- report: the generated part of docs/benchmarks.md
"""
import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS_DIR = os.path.join(PACK_DIR, "tests")
# The benchmark builds its models and imports ComfyUI with the tests' harness (tests/harness: one
# home for random weights in the released layouts and for loading the pack as ComfyUI does).
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
GB = 1024 ** 3
