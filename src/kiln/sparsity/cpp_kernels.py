"""ctypes front of ``csrc/block_sparse.cpp``: build once (seconds), call with tensors.

The C++ file has a plain C ABI and includes no torch headers, so it compiles with ``g++`` in a
few seconds (a torch extension with pybind took ~47 s) and does not depend on the torch ABI.
Tensors are allocated here and passed as pointers. Loaded after torch, the library's
``libgomp.so.1`` resolves to the copy torch already loaded, so its OpenMP regions share torch's
intra-op thread pool. :func:`kiln.sparsity.kernels.cpp_extension` decides whether to use it.

The same source builds twice: the AVX512-BF16 library, and (``amx=True``: ``-DKILN_AMX
-mamx-tile -mamx-bf16``) a second one whose products run on AMX tiles, loaded only where
:func:`kiln.sparsity.kernels.amx_extension` finds AMX and Linux grants the tile data
(:meth:`CppKernels.amx_init`). A compiler without the AMX flags fails only the second build.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kiln.sparsity.kernels import BlockLayout

__all__ = ["CSRC", "CppKernels", "build_library"]

CSRC = Path(__file__).parent / "csrc" / "block_sparse.cpp"
_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl"]
_FLAGS += ["-mavx512bf16"]
_AMX_FLAGS = ["-DKILN_AMX", "-mamx-tile", "-mamx-bf16"]


def build_library(amx: bool = False) -> Path:
    """Compile csrc/block_sparse.cpp (plain C ABI, no torch headers: a few seconds) once;
    ``amx``: the AMX tile build.

    The shared object is cached under ``$KILN_EXTENSIONS_DIR`` (default
    ``~/.cache/kiln/torch_extensions``), named by a hash of the source, compiler and flags, and
    written to a temporary name first so concurrent first uses never see a half-written file.
    """
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    flags = _FLAGS + (_AMX_FLAGS if amx else [])
    digest = hashlib.sha1(CSRC.read_bytes() + " ".join([cxx, *flags]).encode()).hexdigest()
    root = Path(os.environ.get("KILN_EXTENSIONS_DIR", "~/.cache/kiln/torch_extensions"))
    lib = root.expanduser() / f"kiln_block_sparse{'_amx' if amx else ''}_{digest[:12]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, *flags, str(CSRC), "-o", str(tmp)], check=True, capture_output=True)
        tmp.replace(lib)
    return lib


class CppKernels:
    """ctypes front of the compiled kernels: tensors in, tensors out (allocated here).

    Loading after torch makes the library's ``libgomp.so.1`` resolve to torch's copy, so the
    kernels' OpenMP regions share torch's intra-op thread pool.
    """

    def __init__(self, path: Path, amx: bool = False):
        lib = ctypes.CDLL(str(path))
        self.amx = amx
        """True for the AMX tile build (call :meth:`amx_init` before its first use)."""
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        sig = {
            "bs_linear_forward": [p, i64, i64, i64, p, i32, p, p, p, p, p, i64, p, p, p, p, i32],
            "bs_linear_backward": [p, p, i64, i64, i64, p, p, p, p, p, i64]
            + [p, p, p, p, i32, p, i32],
            "bs_mlp_forward": [p, i64, i64, i64]
            + [p, i32, p, p, p, p, p, i64, p, p, p] * 2
            + [p, p, p, i32],
            "bs_mlp_backward": [p, p, p, p, i64, i64, i64]
            + [p, p, p, p, p, i64, i32, p] * 2
            + [p] * 6
            + [i32],
        }
        for name, args in sig.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
        if amx:
            lib.bs_amx_init.argtypes, lib.bs_amx_init.restype = [], i32
        self.lib = lib

    def amx_init(self) -> str | None:
        """Ask Linux for AMX tile data (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``; the
        first tile instruction faults without it). None when granted, else why not."""
        code = self.lib.bs_amx_init()
        if code == 0:
            return None
        return "the CPU reports no AMX-TILE/AMX-BF16" if code == 1 else "Linux refused AMX tiles"

    def linear_forward(self, x2, w, lay: BlockLayout, bias):
        """(y, W packed for grad-input) in one parallel region: pack W twice, then y."""
        w = (w if w.dtype in (_F32, _BF16) else w.float()).contiguous()
        nnzb, b = lay.rows.numel(), lay.block_size
        wp, wt = (torch.empty(nnzb, b * b, dtype=_BF16) for _ in "pt")
        y = torch.empty(x2.shape[0], lay.out_features, dtype=_BF16)
        self.lib.bs_linear_forward(
            x2.data_ptr(), x2.shape[0], lay.in_features, lay.out_features, w.data_ptr(),
            int(w.dtype == _F32), lay.crow.data_ptr(), lay.rows.data_ptr(), lay.cols.data_ptr(),
            lay.csc_rows.data_ptr(), lay.csc_cols.data_ptr(), b,
            0 if bias is None else bias.data_ptr(), wp.data_ptr(), wt.data_ptr(), y.data_ptr(),
            _threads(),
        )  # fmt: skip
        return y, wt

    def linear_backward(self, dy2, x2, wt, lay: BlockLayout, need_x, need_w, need_b, f32):
        """(dx, dw, db) in one parallel region: token tiles (dx, pairs, db), then dW.

        db comes only with need_w (it rides on packing dY); dw is fp32 if f32 else bf16."""
        T, b, Tp = dy2.shape[0], lay.block_size, (dy2.shape[0] + 1) // 2
        dx = torch.empty(T, lay.in_features, dtype=_BF16) if need_x else None
        dyp = torch.empty(lay.out_features // b, Tp, b, 2, dtype=_BF16) if need_w else None
        xp = torch.empty(lay.in_features // b, Tp, b, 2, dtype=_BF16) if need_w else None
        db = torch.empty(lay.out_features, dtype=_F32) if need_w and need_b else None
        dw = None
        if need_w:
            dw = torch.empty(lay.out_features, lay.in_features, dtype=_F32 if f32 else _BF16)
        ptrs = [0 if t is None else t.data_ptr() for t in (dx, dyp, xp, db)]
        self.lib.bs_linear_backward(
            dy2.data_ptr(), x2.data_ptr(), T, lay.in_features, lay.out_features, wt.data_ptr(),
            lay.ccol.data_ptr(), lay.csc_rows.data_ptr(), lay.crow.data_ptr(),
            lay.cols.data_ptr(), b, *ptrs, int(f32), 0 if dw is None else dw.data_ptr(),
            _threads(),
        )  # fmt: skip
        return dx, dw, db

    def mlp_forward(self, x2, w1, lay1: BlockLayout, b1, w2, lay2: BlockLayout, b2):
        """(y, gelu'(h), gp, w1t, w2t) in one parallel region: pack W1, W2 (both orientations), then
        token tiles with the GELU fused and g kept in L2 (gp: g as token pairs, for dW2)."""
        T, (d, f) = x2.shape[0], (lay1.in_features, lay1.out_features)
        h, y = torch.empty(T, f, dtype=_BF16), torch.empty(T, d, dtype=_BF16)
        gp = torch.empty(f // lay2.block_size, (T + 1) // 2, lay2.block_size, 2, dtype=_BF16)
        args, alive = [x2.data_ptr(), T, d, f], []  # alive: every tensor passed by pointer
        for w, lay, bias in ((w1, lay1, b1), (w2, lay2, b2)):
            w = (w if w.dtype in (_F32, _BF16) else w.float()).contiguous()
            wp, wt = (torch.empty(lay.rows.numel(), lay.block_size**2, dtype=_BF16) for _ in "pt")
            args += [w.data_ptr(), int(w.dtype == _F32)]
            args += [t.data_ptr() for t in (lay.crow, lay.rows, lay.cols, lay.csc_rows)]
            args += [lay.csc_cols.data_ptr(), lay.block_size]
            args += [0 if bias is None else bias.data_ptr(), wp.data_ptr(), wt.data_ptr()]
            alive += [w, wp, wt]
        self.lib.bs_mlp_forward(*args, h.data_ptr(), gp.data_ptr(), y.data_ptr(), _threads())
        return y, h, gp, alive[2], alive[5]

    def mlp_backward(self, dy2, x2, dgelu, gp, w1t, lay1, w2t, lay2, need_w, f32s, need_b):
        """(dx, dw1, dw2, db1, db2) in one parallel region: token tiles, then both dW."""
        T, (d, f), (b1, b2) = x2.shape[0], (lay1.in_features, lay1.out_features), _bs(lay1, lay2)
        Tp = (T + 1) // 2
        dx = torch.empty(T, d, dtype=_BF16)
        dyp = torch.empty(d // b2, Tp, b2, 2, dtype=_BF16)
        dhp = torch.empty(f // b1, Tp, b1, 2, dtype=_BF16)
        xp = torch.empty(d // b1, Tp, b1, 2, dtype=_BF16)
        dw1, dw2 = (
            torch.empty(lay.out_features, lay.in_features, dtype=_F32 if fp32 else _BF16)
            if need_w
            else None
            for lay, fp32 in zip((lay1, lay2), f32s)
        )
        db1, db2 = (torch.empty(n, dtype=_F32) if nb else None for n, nb in zip((f, d), need_b))
        args = [dy2.data_ptr(), x2.data_ptr(), dgelu.data_ptr(), gp.data_ptr(), T, d, f]
        for wt, lay, fp32, dw in ((w2t, lay2, f32s[1], dw2), (w1t, lay1, f32s[0], dw1)):
            args += [t.data_ptr() for t in (wt, lay.ccol, lay.csc_rows, lay.crow, lay.cols)]
            args += [lay.block_size, int(fp32), 0 if dw is None else dw.data_ptr()]
        args += [t.data_ptr() for t in (dx, dyp, dhp, xp)]
        args += [0 if t is None else t.data_ptr() for t in (db1, db2)]
        self.lib.bs_mlp_backward(*args, _threads())
        return dx, dw1, dw2, db1, db2


_F32, _BF16 = torch.float32, torch.bfloat16


def _threads() -> int:
    return torch.get_num_threads()


def _bs(*layouts: BlockLayout) -> tuple[int, ...]:
    return tuple(lay.block_size for lay in layouts)
