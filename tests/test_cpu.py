"""CPU feature detection: /proc/cpuinfo texts of this project's CPU kinds, the
$GLYPH_ENGINE_CPU_FLAGS setting that masks or fakes them, and the kernels' own cap
($ONEDNN_MAX_CPU_ISA) that glyph-engine follows."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glyph_engine import cpu
from glyph_engine.errors import GlyphEngineError

from cpu_kinds import CPU_KINDS, KERNEL_CAPS


def cpuinfo(model: str, flags: str, processors: int = 2) -> str:
    """A /proc/cpuinfo text as Linux writes it: one block per logical processor, tab-aligned."""
    block = (
        "processor\t: {n}\nvendor_id\t: {vendor}\ncpu family\t: 25\nmodel name\t: {model}\ncpu MHz\t\t: 2450.000\n"
        "cache size\t: 512 KB\nphysical id\t: 0\nsiblings\t: {processors}\ncore id\t\t: {n}\n"
        "cpu cores\t: {processors}\nfpu\t\t: yes\nflags\t\t: {flags}\nbogomips\t: 4900.00\n"
        "address sizes\t: 48 bits physical, 48 bits virtual\npower management:\n"
    )
    vendor = "AuthenticAMD" if "AMD" in model else "GenuineIntel"
    return "\n".join(
        block.format(n=n, vendor=vendor, model=model, flags=flags, processors=processors) for n in range(processors)
    )


BASE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
    "nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq "
    "pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor "
    "lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall "
    "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero"
)
EPYC_ZEN2 = cpuinfo("AMD EPYC 7B12", BASE + " xsaves umip rdpid")
XEON_CASCADE_LAKE = cpuinfo(
    "Intel(R) Xeon(R) CPU @ 2.80GHz",
    BASE + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni md_clear arch_capabilities",
)
EPYC_ZEN4 = cpuinfo(
    "AMD EPYC 9B14",
    BASE + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 gfni "
    "vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq",
)
XEON_SAPPHIRE_RAPIDS = cpuinfo(
    "Intel(R) Xeon(R) Processor",
    BASE + " avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni amx_bf16 avx512_fp16 "
    "amx_tile amx_int8",
)


@pytest.mark.parametrize(
    "text, model, flags, bf16, int8",
    [
        (EPYC_ZEN2, "AMD EPYC 7B12", ("avx2", "fma"), False, False),
        (XEON_CASCADE_LAKE, "Intel(R) Xeon(R) CPU @ 2.80GHz", ("avx2", "fma", "avx512f", "avx512_vnni"), False, True),
        (EPYC_ZEN4, "AMD EPYC 9B14", ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"), True, True),
        (XEON_SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Processor", cpu.RELEVANT_FLAGS, True, True),
    ],
    ids=["avx2", "avx512", "avx512-bf16", "amx"],
)
def test_parse_cpuinfo_of_each_kind(text, model, flags, bf16, int8):
    fields = cpu.parse_cpuinfo(text)
    assert fields["model name"] == model and fields["processor"] == "0"
    assert fields["cpu MHz"] == "2450.000" and fields["power management"] == ""
    info = cpu.CpuInfo(model, tuple(f for f in cpu.RELEVANT_FLAGS if f in fields["flags"].split()), 2)
    assert sorted(info.flags) == sorted(flags)
    assert (info.has_bf16, info.has_int8) == (bf16, int8)


def test_parse_cpuinfo_reads_the_first_processor_only():
    text = cpuinfo("AMD EPYC 7B12", "fma avx2", processors=1) + "\n" + cpuinfo("Other", "avx512f", processors=1)
    fields = cpu.parse_cpuinfo(text.replace("processor\t: 0", "processor\t: 7", 1))
    assert (fields["processor"], fields["model name"], fields["flags"]) == ("7", "AMD EPYC 7B12", "fma avx2")


def test_parse_cpuinfo_without_flags():
    """An ARM or emulated CPU: no flags line, so nothing beyond FP32 is assumed."""
    fields = cpu.parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n")
    assert "flags" not in fields and fields["Features"] == "fp asimd"


def test_detected_flags_are_this_machines(monkeypatch):
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    monkeypatch.delenv(cpu.ISA_CAP_VAR, raising=False)
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert set(cpu.cpu_info().flags) == set(flags.partition(":")[2].split()) & set(cpu.RELEVANT_FLAGS)


@pytest.mark.parametrize("kind", sorted(CPU_KINDS))
def test_the_setting_replaces_the_flags(monkeypatch, kind):
    monkeypatch.delenv(cpu.ISA_CAP_VAR, raising=False)
    monkeypatch.setenv(cpu.ENV_VAR, CPU_KINDS[kind])
    info = cpu.cpu_info()
    assert set(info.flags) == set(CPU_KINDS[kind].split(","))
    assert info.has_bf16 == (kind == "avx512-bf16") and info.has_int8 == (kind != "avx2")
    assert info.model == cpu.detected_cpu().model and info.cores == cpu.detected_cpu().cores


def test_the_setting_is_read_at_each_call(monkeypatch):
    """Not cached: a test (or a process that sets it late) sees the value in force now."""
    monkeypatch.setenv(cpu.ENV_VAR, "avx2")
    assert cpu.cpu_info().flags == ("avx2",)
    monkeypatch.setenv(cpu.ENV_VAR, " AVX512F,  avx512_bf16 ")
    assert cpu.cpu_info().flags == ("avx512f", "avx512_bf16")
    monkeypatch.setenv(cpu.ENV_VAR, "")
    assert cpu.cpu_info().flags == ()  # empty: no flags, FP32 only


def test_an_unknown_flag_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, "avx2,avx3")
    with pytest.raises(GlyphEngineError, match="GLYPH_ENGINE_CPU_FLAGS names avx3, which glyph-engine does not use"):
        cpu.cpu_info()


def test_claiming_flags_the_cpu_lacks_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "detected_cpu", lambda: cpu.CpuInfo("AMD EPYC 7B12", ("avx2", "fma"), 2))
    cpu._warn_if_claimed.cache_clear()
    monkeypatch.setenv(cpu.ENV_VAR, "avx2,fma,avx512f,avx512_bf16")
    with caplog.at_level(logging.WARNING, logger="glyph_engine.cpu"):
        assert cpu.cpu_info().has_bf16  # claimed: glyph-engine chooses as on a BF16 CPU...
        cpu.cpu_info()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # ...and says so once
    assert "claims avx512f, avx512_bf16, which this CPU lacks: OpenVINO emulates such units" in warnings[0]
    caplog.clear()
    monkeypatch.setenv(cpu.ENV_VAR, "avx2")  # masking only: exact, nothing to warn about
    with caplog.at_level(logging.WARNING, logger="glyph_engine.cpu"):
        cpu.cpu_info()
    assert caplog.records == []


def test_info_says_when_the_flags_are_forced(monkeypatch):
    from glyph_engine.commands import environment

    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    assert "forced" not in dict(environment())["cpu"]
    monkeypatch.setenv(cpu.ENV_VAR, "avx2,fma")
    assert dict(environment())["cpu"].endswith("(avx2, fma; forced by $GLYPH_ENGINE_CPU_FLAGS)")


AMX_XEON = cpu.CpuInfo("Intel Xeon", cpu.RELEVANT_FLAGS, 2)


@pytest.mark.parametrize(
    ("cap", "flags"),
    [
        ("AVX2", ("avx2", "fma")),
        ("avx512_core", ("avx2", "fma", "avx512f")),
        ("avx512_core_vnni", ("avx2", "fma", "avx512f", "avx512_vnni")),
        ("AVX512_CORE_BF16", ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16")),
        ("avx", ()),
    ],
)
def test_the_kernels_cap_masks_the_flags_above_it(monkeypatch, cap, flags):
    """$ONEDNN_MAX_CPU_ISA keeps PyTorch's and OpenVINO's kernels below a level; glyph-engine then
    chooses as on such a CPU (no bf16 under an AVX2 cap), and names the cap with the CPU."""
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu, "detected_cpu", lambda: AMX_XEON)
    monkeypatch.setenv(cpu.ISA_CAP_VAR, cap)
    info = cpu.cpu_info()
    assert info.flags == flags and info.cores == 2
    assert info.has_bf16 == ("avx512_bf16" in flags)
    assert info.model == f"Intel Xeon (kernels capped at {cap.lower()} by $ONEDNN_MAX_CPU_ISA)"


@pytest.mark.parametrize("cap", ["", "all", "DEFAULT", "avx512_core_amx"])
def test_no_cap_or_one_above_the_cpu_changes_nothing(monkeypatch, cap):
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu, "detected_cpu", lambda: AMX_XEON)
    monkeypatch.setenv(cpu.ISA_CAP_VAR, cap)
    assert cpu.cpu_info() == AMX_XEON


def test_an_unknown_cap_is_ignored_with_a_warning(monkeypatch, caplog):
    """oneDNN ignores a name it does not know, so the kernels run uncapped: glyph-engine must too."""
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu, "detected_cpu", lambda: AMX_XEON)
    monkeypatch.setenv(cpu.ISA_CAP_VAR, "avx3")
    cpu._warn_unknown_cap.cache_clear()
    with caplog.at_level(logging.WARNING, logger="glyph_engine.cpu"):
        assert cpu.cpu_info() == AMX_XEON
    assert "ONEDNN_MAX_CPU_ISA=avx3 is not an ISA name oneDNN knows" in caplog.text


def test_forced_flags_replace_the_capped_ones_for_choices_not_for_kernels(monkeypatch):
    monkeypatch.setattr(cpu, "detected_cpu", lambda: AMX_XEON)
    monkeypatch.setenv(cpu.ISA_CAP_VAR, "avx512_core")
    monkeypatch.setenv(cpu.ENV_VAR, "avx2")
    assert cpu.cpu_info().flags == ("avx2",)
    assert cpu.kernel_cpu().flags == ("avx2", "fma", "avx512f")  # what the matmul peaks are measured on


def test_kernel_caps_below_avx512_also_cap_aten_and_mkl():
    """PyTorch's vector loops and MKL's fp32 products ignore oneDNN's cap: an AVX2 kind left
    them on AVX-512 (a 2-core Xeon's fp32 matmul ran at 331 GFLOP/s so, 200 with MKL capped)."""
    assert cpu.kernel_caps("avx2") == {
        "ONEDNN_MAX_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"
    }  # fmt: skip
    assert cpu.kernel_caps("avx512_core_bf16") == {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}
    assert cpu.kernel_caps("avx")["MKL_ENABLE_INSTRUCTIONS"] == "SSE4_2"


# Compiles one convolution in OpenVINO (in bf16 it gets AMX's kernels where nothing caps them, in
# fp32 AVX-512's; under an AVX2 cap a bf16 model fails to compile) and reports which kernel
# OpenVINO chose, ATen's vector level and what glyph-engine makes of the CPU.
_KERNELS_PROBE = """
import json, sys, numpy as np, openvino as ov, torch
from openvino import opset13 as ops
from glyph_engine.cpu import cpu_info
x = ops.parameter([8, 32, 16, 16], np.float32)
w = ops.constant(np.ones((32, 32, 3, 3), np.float32))
model = ov.Model([ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])], [x])
compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": sys.argv[1]})
info = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
kinds = [i["primitiveType"].astype(str) for i in info if i["layerType"].astype(str) == "Convolution"]
print(json.dumps({"conv": kinds, "aten": torch.backends.cpu.get_cpu_capability(), "flags": cpu_info().flags}))
"""


def test_the_kernels_run_as_on_the_cpu_kind(cpu_flags):
    """Under `--cpu-kind` (else as on the AVX2 kind), PyTorch's and OpenVINO's kernels stay at or
    below the kind's instructions in a fresh process, and glyph-engine sees the kind's flags:
    the kind runs are that kind's kernels, not only its choices."""
    kind = next((k for k, flags in CPU_KINDS.items() if os.environ.get(cpu.ENV_VAR) == flags), None)
    env = os.environ if kind else {**os.environ, **KERNEL_CAPS["avx2"]}
    # bf16 is where AMX would show, on a CPU that has it; elsewhere OpenVINO may refuse the hint.
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    hint = "bf16" if amx and (kind or "avx2") != "avx2" else "f32"
    probe = [sys.executable, "-c", _KERNELS_PROBE, hint]
    out = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    (conv,) = seen["conv"]
    assert "amx" not in conv, conv  # no kind has AMX
    if (kind or "avx2") == "avx2":
        assert "avx512" not in conv and seen["aten"] in ("AVX2", "DEFAULT"), seen
        assert set(seen["flags"]) <= {"avx2", "fma"}
    if kind:
        assert set(seen["flags"]) == cpu_flags
