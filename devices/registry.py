"""Which onnxruntime execution providers serve each device class, best first, with their default options.

The registry is data, not logic: placement walks these lists in order, so changing a preference or
adding a provider is an edit here. Left out on purpose: NNAPI (deprecated in Android 15; its
successors are vendor providers such as QNN) and the TensorRT family (datacenter GPUs, not edge).

Graph variants (docs/kv-interface.md): ``fused`` graphs use com.microsoft contrib operators
(GroupQueryAttention, RotaryEmbedding, MatMulNBits, SkipSimplifiedLayerNormalization) that only
CPU, CUDA, DirectML and WebGPU implement; ``static`` graphs use plain ONNX operators with every
dimension fixed, which is what NPU compilers (QNN HTP, OpenVINO NPU, CoreML, VitisAI) accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FUSED, STATIC = "fused", "static"
DEVICE_CLASSES = ("npu", "gpu", "cpu")  # also the "auto" preference order
CPU_PROVIDER = "CPUExecutionProvider"
THREADS = "{threads}"  # option value replaced by the session's intra-op thread count


@dataclass(frozen=True)
class ProviderEntry:
    """One way to run a graph: an execution provider on one kind of hardware, with default options."""

    key: str  # what users write for `device=` to ask for exactly this entry
    provider: str  # onnxruntime's provider name
    device_class: str  # "npu" | "gpu" | "cpu"
    hardware: str  # the OrtHardwareDeviceType name it needs: "NPU" | "GPU" | "CPU"
    variants: tuple[str, ...]  # graph variants it can run, best first
    static_shapes: bool  # compiles one program per input shape: needs the static variant
    options: dict[str, str] = field(default_factory=dict)
    session_config: dict[str, str] = field(default_factory=dict)
    plugin: str | None = None  # Python package that ships it as a plugin EP (onnxruntime >= 1.23)
    device_options: tuple[str, ...] = ()  # options a plugin's OrtEpDevice choice replaces
    ep_context: bool = False  # can save its compiled graph as an EP-context model (ep.context_enable)
    cache_option: str | None = None  # provider option naming a directory for its own compiled-blob cache
    note: str = ""


REGISTRY: dict[str, tuple[ProviderEntry, ...]] = {
    "npu": (
        ProviderEntry("qnn-htp", "QNNExecutionProvider", "npu", "NPU", (STATIC,), True,
                      options={"backend_type": "htp", "htp_performance_mode": "burst",
                               "htp_graph_finalization_optimization_mode": "3",
                               "enable_htp_fp16_precision": "1"},
                      plugin="onnxruntime_qnn", ep_context=True,
                      note="Qualcomm Hexagon; a plugin EP since onnxruntime-qnn 2.x; QDQ (u16/u8) or fp16 graphs"),
        ProviderEntry("openvino-npu", "OpenVINOExecutionProvider", "npu", "NPU", (STATIC,), True,
                      options={"device_type": "NPU"}, plugin="onnxruntime_ep_openvino",
                      device_options=("device_type",), cache_option="cache_dir", note="Intel NPU"),
        ProviderEntry("coreml-ane", "CoreMLExecutionProvider", "npu", "NPU", (STATIC,), True,
                      options={"ModelFormat": "MLProgram", "MLComputeUnits": "CPUAndNeuralEngine",
                               "RequireStaticInputShapes": "1"},
                      cache_option="ModelCacheDirectory", note="Apple Neural Engine"),
        ProviderEntry("vitisai", "VitisAIExecutionProvider", "npu", "NPU", (STATIC,), True,
                      ep_context=True, note="AMD Ryzen AI NPU"),
    ),
    "gpu": (
        ProviderEntry("qnn-gpu", "QNNExecutionProvider", "gpu", "GPU", (STATIC,), True,
                      options={"backend_type": "gpu"}, plugin="onnxruntime_qnn", ep_context=True,
                      note="Qualcomm Adreno through QNN"),
        ProviderEntry("openvino-gpu", "OpenVINOExecutionProvider", "gpu", "GPU", (STATIC,), False,
                      options={"device_type": "GPU"}, plugin="onnxruntime_ep_openvino",
                      device_options=("device_type",), cache_option="cache_dir",
                      note="Intel GPU; has no GroupQueryAttention/RotaryEmbedding, so it takes static graphs"),
        ProviderEntry("coreml-gpu", "CoreMLExecutionProvider", "gpu", "GPU", (STATIC,), False,
                      options={"ModelFormat": "MLProgram", "MLComputeUnits": "CPUAndGPU"},
                      cache_option="ModelCacheDirectory", note="Apple GPU"),
        ProviderEntry("webgpu", "WebGpuExecutionProvider", "gpu", "GPU", (FUSED,), False,
                      plugin="onnxruntime_ep_webgpu", note="Dawn: Vulkan/Metal/D3D12; has GQA and MatMulNBits"),
        ProviderEntry("directml", "DmlExecutionProvider", "gpu", "GPU", (FUSED,), False,
                      options={"device_id": "0"},
                      note="Windows DX12; in sustained engineering (WinML is the successor)"),
        ProviderEntry("cuda", "CUDAExecutionProvider", "gpu", "GPU", (FUSED,), False,
                      options={"device_id": "0"}, note="NVIDIA (Jetson and discrete)"),
    ),
    "cpu": (
        # XNNPACK takes a subset of operators and leaves the rest (attention, MatMulNBits) to the CPU
        # provider; its own thread pool competes with onnxruntime's, so onnxruntime's must not spin.
        ProviderEntry("xnnpack", "XnnpackExecutionProvider", "cpu", "CPU", (FUSED, STATIC), False,
                      options={"intra_op_num_threads": THREADS},
                      session_config={"session.intra_op.allow_spinning": "0"}, note="Arm/x86 CPU kernels"),
        # OpenVINO runs a static graph whole. Of a fused graph it leaves GroupQueryAttention (and, in
        # graphs before it rotated q and k itself, RotaryEmbedding) to the CPU provider; that split
        # measured slower per token than the CPU provider alone (SmolLM2-135M, fp32 and int4), so fused
        # graphs stay with the CPU provider.
        ProviderEntry("openvino-cpu", "OpenVINOExecutionProvider", "cpu", "CPU", (STATIC,), False,
                      options={"device_type": "CPU", "num_of_threads": THREADS}, plugin="onnxruntime_ep_openvino",
                      device_options=("device_type",), cache_option="cache_dir", note="Intel/AMD x86 CPU"),
        ProviderEntry("default-cpu", CPU_PROVIDER, "cpu", "CPU", (FUSED, STATIC), False,
                      note="onnxruntime's own CPU kernels; always present"),
    ),
}

ENTRIES: dict[str, ProviderEntry] = {e.key: e for entries in REGISTRY.values() for e in entries}
PLUGIN_PACKAGES: tuple[str, ...] = tuple(dict.fromkeys(e.plugin for e in ENTRIES.values() if e.plugin))


def entries_for(device_class: str) -> tuple[ProviderEntry, ...]:
    """The entries of one device class, best first."""
    if device_class not in REGISTRY:
        raise ValueError(f"unknown device class {device_class!r}; expected one of {', '.join(DEVICE_CLASSES)}")
    return REGISTRY[device_class]
