"""Run inside the worker image (`python - < this file`): imports every model library and every backend module, and
checks that one OpenCV is installed, the headless build, whose cv2 loads without libGL or libxcb. Prints a JSON
summary; exits non-zero with the first failure."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import pkgutil

LIBRARIES = [
    "torch",
    "torchvision",
    "segment_anything",
    "groundingdino.util.inference",  # imports supervision and cv2 as groundingdino's own predictions do
    "groundingdino.models",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "imgviz",
    "supervision",
    "cv2",
]
# Not imported: the Gradio demo (an extra the image does not install: requirements-demo.txt) and the command line's
# entry point (importing it runs it).
SKIPPED = {"backend.tools.demo", "backend.__main__"}


def main() -> None:
    for name in LIBRARIES:
        importlib.import_module(name)
    import backend

    modules = [info.name for info in pkgutil.walk_packages(backend.__path__, "backend.") if info.name not in SKIPPED]
    for name in modules:
        importlib.import_module(name)
    installed = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    opencvs = sorted(name for name in installed if name.startswith("opencv"))
    if opencvs != ["opencv-python-headless"]:
        raise SystemExit(f"expected one OpenCV, the headless build; installed: {opencvs}")
    import cv2
    import torch

    cv2.cvtColor(__import__("numpy").zeros((4, 4, 3), "uint8"), cv2.COLOR_RGB2GRAY)
    summary = {"libraries": len(LIBRARIES), "backend_modules": len(modules), "opencv": opencvs}
    print(json.dumps({**summary, "cv2": cv2.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
