"""ONNX Runtime in place of the torch network at inference (CPU), for models written by `saltkit export --format onnx`.

`OnnxRuntimeNetwork(path)` is called like the network: a float32 `(B, 3, S, S)` tensor in [0, 1] gives
`(logit (B, 1, S, S), image_logit (B, 1))` as torch tensors (a NamedTuple, so `.logit` / `.image_logit` work as on
SaltOutput); `.eval()` and `.to(device)` do nothing, so code that treats it as a module runs unchanged.
onnxruntime is an optional dependency: `pip install saltkit[onnx]`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import NamedTuple

import torch

ONNX_EXTRA = "saltkit[onnx]"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logit", "image_logit")
METADATA_KEY = "saltkit.json"


def require_module(name: str, what: str):
    """Import the optional module `name`, or fail with an ImportError that names the extra that provides it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package '{name}', which is not installed: "
                          f"pip install '{ONNX_EXTRA}' (onnx, onnxscript, onnxruntime)") from e


class OnnxOutput(NamedTuple):
    """What `OnnxRuntimeNetwork` returns: `(B, 1, S, S)` final salt logit and `(B, 1)` image logit."""

    logit: torch.Tensor
    image_logit: torch.Tensor


class OnnxRuntimeNetwork:
    """An exported ONNX model run by ONNX Runtime on the CPU, with the torch network's calling convention.

    threads: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require_module("onnxruntime", "the ONNX Runtime inference path")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise ValueError(f"{self.path}: not a model ONNX Runtime can load ({e})") from e
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = tuple(o.name for o in self.session.get_outputs())
        if inputs != [INPUT_NAME] or outputs != OUTPUT_NAMES:
            raise ValueError(f"{self.path}: expected a saltkit export with input '{INPUT_NAME}' and outputs "
                             f"{OUTPUT_NAMES}, got inputs {inputs} and outputs {outputs}")
        self.input_shape = tuple(self.session.get_inputs()[0].shape)  # ("batch", 3, S, S)
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}")
        self.metadata = json.loads(meta)

    def __call__(self, images: torch.Tensor) -> OnnxOutput:
        """`(B, 3, S, S)` float tiles in [0, 1] -> OnnxOutput of CPU float32 tensors on `images`' device."""
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.input_shape[1:]):
            raise ValueError(f"{self.path}: expected input (B, {', '.join(map(str, self.input_shape[1:]))}), "
                             f"got {tuple(images.shape)}")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logit, image_logit = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return OnnxOutput(torch.from_numpy(logit).to(images.device), torch.from_numpy(image_logit).to(images.device))

    def eval(self) -> OnnxRuntimeNetwork:
        return self

    def train(self, mode: bool = True) -> OnnxRuntimeNetwork:
        if mode:
            raise ValueError(f"{self.path}: an ONNX Runtime model runs inference only")
        return self

    def to(self, *args, **kwargs) -> OnnxRuntimeNetwork:
        """No-op: ONNX Runtime runs on the CPU; outputs come back on the input's device."""
        return self

    def __repr__(self) -> str:
        return f"OnnxRuntimeNetwork({str(self.path)!r}, input {self.input_shape})"
