"""The CPU kinds the suite runs as (`pytest --cpu-kind`): a helper module, since `conftest`
names two modules (tests/ and bench/) when both folders are collected."""

from glyph_engine.cpu import CPU_KIND_ISAS, kernel_caps

# The CPUs of this project's machines, as the $GLYPH_ENGINE_CPU_FLAGS that makes glyph-engine
# choose as it would there (precision, cache keys): AMD EPYC with AVX2 only; Intel Xeon with
# AVX-512 and VNNI, no BF16; AMD EPYC Zen 4/5 with AVX-512 BF16. Intel's AMX Xeons run natively.
CPU_KINDS = {
    "avx2": "avx2,fma",
    "avx512": "avx2,fma,avx512f,avx512_vnni",
    "avx512-bf16": "avx2,fma,avx512f,avx512_vnni,avx512_bf16",
}
# The same kinds as caps on the kernels PyTorch and OpenVINO pick (`kernel_caps`): on a CPU
# above the kind the suite then runs that kind's kernels too, not only its choices; on one
# below, a cap above it changes nothing.
KERNEL_CAPS = {kind: kernel_caps(CPU_KIND_ISAS[kind]) for kind in CPU_KINDS}
CPU_FLAGS_VAR = "GLYPH_ENGINE_CPU_FLAGS"  # spelled out, not imported: the tests check glyph_engine.cpu
