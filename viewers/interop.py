"""CUDA-OpenGL interop: a CUDA frame into a vispy texture with no host round trip.

The texture is registered with CUDA once (cuda-python's runtime bindings:
``cudaGraphicsGLRegisterImage``); each frame is map, one device-to-device copy into the
mapped array, unmap, on a non-blocking CUDA stream, in the thread that owns the GL context.
CuPy has no GL interop API, so cuda-python does the registering; torch supplies the pointer.
Used only when the GL context lives on the frame's GPU (``cudaGLGetDevices``); otherwise,
and whenever anything here fails, the viewer uploads from host memory and says so.

vispy's ``Texture2D.id`` is a GLIR id, not the GL name: the name comes from the context's
GLIR parser once the texture exists (``gl_texture_name``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

log = logging.getLogger("probescope")

GL_TEXTURE_2D = 0x0DE1


def gl_texture_name(canvas, texture) -> int:
    """The OpenGL name of a vispy gloo texture (created on the GL side first if needed)."""
    canvas.context.flush_commands()
    glir_object = canvas.context.shared.parser.get_object(texture.id)
    if glir_object is None:
        raise RuntimeError("the texture does not exist on the GL side yet (draw the canvas once first)")
    return int(glir_object.handle)


def why_not_interop(device) -> str | None:
    """None when CUDA-GL interop can be tried for frames on ``device``, else the reason."""
    import torch

    if device is None or getattr(device, "type", None) != "cuda":
        return "frames are not on a CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        return "cuda-python (cuda-bindings) is not installed"
    return None


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    from cuda.bindings import runtime

    if err != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what}: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


class InteropTexture:
    """A vispy texture registered with CUDA; ``upload(rgba)`` copies an (H, W, 4) uint8 CUDA
    tensor of the texture's shape into it on the device."""

    def __init__(self, canvas, texture, device):
        import torch
        from cuda.bindings import runtime

        self.runtime, self.device, self.canvas = runtime, device, canvas
        # CUDA resolves the texture name in the calling thread's current GL context: make it
        # this canvas's (another canvas may have drawn last).
        canvas.set_current()
        name = gl_texture_name(canvas, texture)
        count, devices = _check(
            runtime.cudaGLGetDevices(1, runtime.cudaGLDeviceList.cudaGLDeviceListAll), "cudaGLGetDevices"
        )
        if count < 1 or int(devices[0]) != (device.index or 0):
            raise RuntimeError(
                f"the GL context is on CUDA device {list(devices)[:count]}, frames on {device}"
            )
        self.resource = _check(
            runtime.cudaGraphicsGLRegisterImage(
                name, GL_TEXTURE_2D, runtime.cudaGraphicsRegisterFlags.cudaGraphicsRegisterFlagsWriteDiscard
            ),
            f"cudaGraphicsGLRegisterImage(texture {name})",
        )
        self.stream = torch.cuda.Stream(device)  # non-blocking: never serialises with training
        self.shape = tuple(texture.shape[:2])

    def upload(self, rgba) -> None:
        import torch

        runtime = self.runtime
        if tuple(rgba.shape[:2]) != self.shape or rgba.dtype != torch.uint8:
            raise ValueError(
                f"interop texture is {self.shape} uint8, frame is {tuple(rgba.shape)} {rgba.dtype}"
            )
        rgba = rgba.contiguous()
        self.canvas.set_current()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        handle = self.stream.cuda_stream
        _check(runtime.cudaGraphicsMapResources(1, self.resource, handle), "cudaGraphicsMapResources")
        try:
            array = _check(
                runtime.cudaGraphicsSubResourceGetMappedArray(self.resource, 0, 0), "GetMappedArray"
            )
            row = self.shape[1] * 4
            _check(
                runtime.cudaMemcpy2DToArrayAsync(
                    array, 0, 0, rgba.data_ptr(), row, row, self.shape[0],
                    runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice, handle,
                ),
                "cudaMemcpy2DToArrayAsync",
            )  # fmt: skip
        finally:
            _check(runtime.cudaGraphicsUnmapResources(1, self.resource, handle), "cudaGraphicsUnmapResources")
        rgba.record_stream(self.stream)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the context may already be gone
            self.runtime.cudaGraphicsUnregisterResource(self.resource)
