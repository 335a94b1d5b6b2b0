"""``pyrank env``: versions, devices and which backends can run here (and why not)."""
from __future__ import annotations

import os
import platform
import sys


def report() -> str:
    import torch

    from . import __version__, ops

    lines = [
        f"pyrank        {__version__}",
        f"python        {sys.version.split()[0]} ({platform.machine()}, {platform.system()})",
        f"torch         {torch.__version__} (threads: {torch.get_num_threads()})",
    ]
    try:
        import triton

        lines.append(f"triton        {triton.__version__}")
    except ImportError:
        lines.append("triton        not installed (pip install 'pyrank[triton]')")
    from importlib import metadata

    for pkg, extra, what in (("transformers", "transformers", "Rank1Callback"),
                             ("peft", "peft", "adapters.init_peft_model")):
        try:  # the version only: importing transformers here would cost seconds
            lines.append(f"{pkg:<13} {metadata.version(pkg)} ({what})")
        except metadata.PackageNotFoundError:
            lines.append(f"{pkg:<13} not installed ({what} needs pip install 'pyrank[{extra}]')")
    if torch.cuda.is_available():
        lines.append(f"cuda device   {torch.cuda.get_device_name(0)}")
    else:
        lines.append("cuda device   none")
    try:
        from . import _C

        feats = ", ".join(f for f, on in _C.cpu_features().items() if on) or "none detected"
        lines.append(f"cpu features  {feats}")
        if hasattr(_C, "selected_isa"):
            lines.append(f"cpu kernels   {_C.selected_isa()} variant")
    except ImportError:
        pass
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s:<3} "
                 f"PYRANK_BACKEND={os.environ.get('PYRANK_BACKEND', '')}")
    lines.append("backends:")
    for name, reason in ops.backend_status().items():
        lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    cpu_auto = ops.resolve_backend("auto", torch.device("cpu"))[0]
    lines.append(f"auto picks    {cpu_auto} for CPU tensors"
                 + (f", {ops.resolve_backend('auto', torch.device('cuda'))[0]} for CUDA tensors"
                    if torch.cuda.is_available() else ""))
    return "\n".join(lines)
