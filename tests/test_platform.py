"""lowbit._platform: the machine description printed beside benchmark numbers."""

from lowbit._platform import cpu_features

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 fma

processor\t: 1
cpu family\t: 99
model\t\t: 99
flags\t\t: avx512f avx512_vnni
"""

SPR = """processor\t: 0
cpu family\t: 6
model\t\t: 143
flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_names_family_model_and_kernel_relevant_flags_of_the_first_processor():
    assert cpu_features(ZEN3) == "x86 family 25 model 1: AVX2"
    assert cpu_features(SPR) == "x86 family 6 model 143: AVX2, AVX-512, VNNI, AVX-512 BF16, AMX-INT8, AMX-BF16"


def test_says_nothing_when_cpuinfo_has_nothing_to_say():
    assert cpu_features("") == ""
    assert cpu_features("processor\t: 0\nflags\t\t: fpu sse\n") == ""
    assert cpu_features("Processor\t: ARMv8\nFeatures\t: fp asimd\n") == ""
