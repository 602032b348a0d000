"""Choosing vispy's backend: never implicitly, never Qt without a display.

Two traps, handled here once for every caller: Triton must be imported before any GL
context exists (Mesa's llvmpipe and Triton's LLVM otherwise clash and the process can
segfault), and vispy left to itself may pick a Qt backend on a headless machine and abort.
Offscreen rendering uses EGL (Mesa's llvmpipe without a GPU) with ``EGL_PLATFORM=surfaceless``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ONSCREEN = ("pyqt6", "pyside6", "pyqt5", "glfw")
_chosen: dict[str, str] = {}


class ViewerUnavailable(RuntimeError):
    """No OpenGL backend can be used here; the message says what to do instead."""


def in_notebook() -> bool:
    """True in a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab): an IPython shell
    whose outputs go to a frontend. Imports nothing that is not imported already."""
    if "IPython" not in sys.modules or "ipykernel" not in sys.modules:
        return False
    try:
        from ipykernel.zmqshell import ZMQInteractiveShell
        from IPython import get_ipython

        return isinstance(get_ipython(), ZMQInteractiveShell)
    except Exception:
        return False


NO_DISPLAY = (
    "no display here (DISPLAY and WAYLAND_DISPLAY are unset): watch the run from another "
    "machine with `probescope view RUN --follow`, render offscreen (`--offscreen`), or use "
    "`probescope export RUN --format mp4`"
)


def has_display() -> bool:
    """Whether a window can be shown here (an X or Wayland display, or macOS or Windows)."""
    return bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32")
    )


def use_backend(offscreen: bool) -> str:
    """Select vispy's application backend (once per process) and return its name.

    ``offscreen``: EGL. Otherwise jupyter_rfb in a notebook when installed, else the first
    desktop backend that loads, only when a display exists.
    """
    if "name" in _chosen:
        if offscreen and _chosen["name"] != "egl":
            raise ViewerUnavailable(
                f"vispy already uses the {_chosen['name']} backend in this process; offscreen needs egl"
            )
        return _chosen["name"]
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401  (before any GL context: see the module docstring)
    try:
        import vispy
    except ImportError as err:
        raise ViewerUnavailable("the viewer needs vispy: pip install vispy") from err
    if offscreen:
        os.environ.setdefault("EGL_PLATFORM", "surfaceless")
        candidates = ["egl"]
    elif in_notebook() and importlib.util.find_spec("jupyter_rfb") is not None:
        candidates = ["jupyter_rfb"]
    elif has_display():
        candidates = [name for name in ONSCREEN if _importable(name)]
    else:
        raise ViewerUnavailable(NO_DISPLAY)
    errors = []
    for name in candidates:
        try:
            vispy.use(app=name)
            from vispy import app

            app.use_app(name)
            _chosen["name"] = name
            return name
        except Exception as err:  # a backend that does not load: try the next
            errors.append(f"{name}: {type(err).__name__}: {err}")
    hint = (
        "install Mesa's EGL (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri)"
        if offscreen
        else "install a GUI toolkit (pip install pyqt6 or glfw)"
    )
    raise ViewerUnavailable(
        f"no OpenGL backend could start ({'; '.join(errors) or 'none installed'}); {hint}, "
        "or use `probescope export RUN --format mp4` for the matplotlib exporters"
    )


def _importable(backend: str) -> bool:
    module = {"pyqt6": "PyQt6", "pyside6": "PySide6", "pyqt5": "PyQt5", "glfw": "glfw"}[backend]
    return importlib.util.find_spec(module) is not None
