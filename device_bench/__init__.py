"""device_bench: run converted TFLite models on a device, measure them, check the user's budgets, report.

Host side (this package, numpy/Pillow/PyYAML/matplotlib only — never torch, litert-torch or coremltools) and device
side (`runner.py`, one file: standard library, numpy and a TFLite interpreter). They talk through job folders.
"""
