"""The fused DPM-Solver++ step as a C++/CUDA extension (the cpp_ext issue fills this in)."""
