"""Prompt decoders exported from PyTorch to ONNX Runtime, in memory: which runtime a decoder uses, and the export.

SAM's decoder (sam_decoder.py) and the transformers models' (hf_decoder.py) are exported from the loaded weights
the same way, so a decoder runs as fast on a CPU whichever model it belongs to: ONNX Runtime runs them about
twice as fast as PyTorch there (bench/interactive.py, bench/models.py); on a GPU PyTorch is used.
"""

from __future__ import annotations

import io
import warnings

import torch


def decoder_runtime(device: torch.device, runtime: str) -> str:
    """`runtime` ("torch", "onnx", or "auto": ONNX Runtime on CPU when installed, PyTorch otherwise) resolved."""
    if runtime == "auto":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "torch"
        return "onnx" if device.type == "cpu" else "torch"
    if runtime in ("onnx", "torch"):
        return runtime
    raise ValueError(f"unknown DECODER_RUNTIME {runtime!r}; use auto, torch or onnx")


def onnx_session(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    threads: int,
):  # -> onnxruntime.InferenceSession
    """`module` traced on `example` into an ONNX graph (constants folded, so whatever depends on no input, such as
    an image-wide positional encoding, is computed once here) and loaded into a CPU session of `threads` threads."""
    import onnxruntime

    graph = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the models' shape arithmetic, expected
        torch.onnx.export(
            module.eval(),
            example,
            graph,  # type: ignore[arg-type]  # torch's stub names paths only; its docs and code take a file object
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Each session has its own threads: spinning idle ones (ONNX Runtime's default) take the cores another
    # session's run, or the encoder, needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
