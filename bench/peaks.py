"""Dense bf16 peak FLOP/s (no sparsity) by exact `torch.cuda.get_device_name()`: an H100 PCIe or NVL is not an
H100 SXM, so names are matched whole, never by substring. Unknown cards give None (pass --peak-tflops)."""

PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10G": 70e12,
    "NVIDIA GeForce RTX 4090": 165e12,
}


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    return PEAK_BF16.get(device_name or "")
