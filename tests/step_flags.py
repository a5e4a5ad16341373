"""The fused step op's flag grid, shared by tests/test_cpp_ext.py and make gpu-check's parity
sweep (bench/gpu_parity.py), so both check every variant the op compiles (a helper, not a
test module): guided or not, first or second order, x0 clamped or not."""

import itertools
from typing import NamedTuple


class StepFlags(NamedTuple):
    guided: bool  # eps_uncond given: the guidance combine runs
    second_order: bool  # a previous x0 given: the 2M update
    clamp: bool  # x0 clamped to the pixel range


FLAGS = [StepFlags(*flags) for flags in itertools.product([False, True], repeat=3)]
