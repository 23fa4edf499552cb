"""The commands that run a model to measure it: the speed suite (speed, speed_models, speed_results), the stage
benchmarks (bench_stage1, bench_kv), the calibration of alpha (calibrate) and the stage 1 figures (visualize).

They sit above ``llava`` (docs/architecture.md, "Layers"); the rest of ``eval`` only reads files.
"""
