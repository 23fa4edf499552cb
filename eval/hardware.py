"""Accelerator presets for the roofline model (``eval.roofline``).

A preset is the four numbers LLM-Viewer's roofline needs: memory bandwidth, dense FP16 and INT8 tensor peaks, and
the on-chip buffer (only used when FlashAttention is modelled). Peaks are *dense* figures: the datasheets print the
2:4-sparsity figure first, which no pruning method in this project produces.

``a100-40gb`` is LLM-Viewer's ``nvidia_A100`` entry unchanged, because the paper's Table 6 was made with it (the
1555 GB/s figure is what reproduces 30.3 ms; the 80 GB part's 2039 GB/s gives 29.4 ms). The on-chip buffer is the
register file, 256 KB per SM, counted in LLM-Viewer's units (1 KB = 1e3 B): 108 SMs x 256e3 = 27648e3 B. The other
presets follow the same rule so that FlashAttention estimates are comparable across GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes / s
    fp16_ops: float  # dense tensor-core OPS at 16-bit operands
    int8_ops: float  # dense tensor-core OPS at 8-bit operands (used when every bit width is <= 8)
    onchip_buffer: float  # bytes; only the FlashAttention estimate reads it
    source: str

    def peak(self, w_bits: int, a_bits: int, kv_bits: int) -> float:
        """LLM-Viewer's rule: the INT8 peak as soon as weights, activations and KV cache all fit in 8 bits.

        There is no INT4 peak: W4A4 runs at the INT8 rate, which is why the paper's INT4 row is barely faster
        than its INT8 row.
        """
        return self.int8_ops if max(w_bits, a_bits, kv_bits) <= 8 else self.fp16_ops

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (OPs per byte) above which an op is compute-bound at the FP16 peak."""
        return self.fp16_ops / self.bandwidth


HARDWARE: dict[str, Hardware] = {
    "a100-40gb": Hardware(
        name="a100-40gb",
        bandwidth=1555e9,
        fp16_ops=312e12,
        int8_ops=624e12,
        onchip_buffer=27648e3,
        source="LLM-Viewer hardware_params 'nvidia_A100' (= A100 40GB SXM datasheet: 1555 GB/s, 312 TFLOPS FP16, "
        "624 TOPS INT8 dense); the entry behind the paper's Table 6",
    ),
    "a100-80gb": Hardware(
        name="a100-80gb",
        bandwidth=2039e9,
        fp16_ops=312e12,
        int8_ops=624e12,
        onchip_buffer=27648e3,
        source="LLM-Viewer 'nvidia_A100_80G'; NVIDIA A100 datasheet, 80GB SXM: 2039 GB/s HBM2e, 312 TFLOPS FP16, "
        "624 TOPS INT8 (dense)",
    ),
    "h100-sxm": Hardware(
        name="h100-sxm",
        bandwidth=3.35e12,
        fp16_ops=989.5e12,
        int8_ops=1979e12,
        onchip_buffer=132 * 256e3,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 3.35 TB/s HBM3, FP16 tensor 1979 TFLOPS and INT8 "
        "3958 TOPS with sparsity, halved for dense; 132 SMs",
    ),
    "rtx-4090": Hardware(
        name="rtx-4090",
        bandwidth=1008e9,
        fp16_ops=165.2e12,
        int8_ops=660.6e12,
        onchip_buffer=128 * 256e3,
        source="NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 1008 GB/s GDDR6X; dense FP16 tensor "
        "165.2 TFLOPS with FP32 accumulate (what PyTorch's fp16/bf16 GEMMs use; 330.3 with FP16 accumulate); "
        "dense INT8 tensor 660.6 TOPS; 128 SMs",
    ),
}


def get_hardware(name: str | Hardware) -> Hardware:
    """A preset by name (an existing ``Hardware`` passes through), with the known names in the error."""
    if isinstance(name, Hardware):
        return name
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}")
    return HARDWARE[name]
