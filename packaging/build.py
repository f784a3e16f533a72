"""Build the one-folder bundle ``dist/inspection-engine/`` (``make bundle``).

    python packaging/build.py [--weights dinov2_vits14_pretrain.pth] [--clean] [--no-strip] [--no-trim]

Runs PyInstaller on ``packaging/inspection_engine.spec``, strips the torch libraries that ship
unstripped (Linux, when ``strip`` is on PATH), copies an optional DINOv2 weights file into
``<bundle>/data/weights/`` (where ``auto`` finds it with the default data root), writes
``<bundle>/BUILD_INFO.json`` and prints the build time and the bundle size per top-level item.
OS-neutral: the same command builds ``inspection-engine.exe`` on Windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "packaging" / "inspection_engine.spec"
NAME = "inspection-engine"
# names the engine's ``auto`` backbone rule looks for in <data root>/weights (engine.backbones)
DINOV2_NAMES = ("dinov2_vits14_pretrain.pth", "dinov2_vits14.pth", "dinov2-small.safetensors", "model.safetensors")
# unstripped ELF libraries in the torch wheel (~98 MB of symbols); the auditwheel-repaired libraries
# of numpy / opencv / faiss are stripped already, and strip can break files patchelf has rewritten
STRIP_GLOBS = ("torch/lib/libtorch_cpu.so*", "torch/lib/libtorch_python.so*", "torch/lib/libc10.so*",
               "torch/lib/libshm.so*", "torch/lib/libtorch_global_deps.so*", "torch/_C*.so")


def bundle_dir(dist: Path) -> Path:
    return dist / NAME


def executable(dist: Path) -> Path:
    return bundle_dir(dist) / (NAME + (".exe" if os.name == "nt" else ""))


def du(path: Path) -> int:
    """Bytes on disk of a file or folder (apparent sizes; links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_symlink() or p.is_file())


def size_report(bundle: Path, top: int = 15) -> list[tuple[str, int]]:
    """(item, bytes) for the bundle's top-level items and for those of its contents folder."""
    items: list[tuple[str, int]] = []
    for child in bundle.iterdir():
        if child.name == "_internal" and child.is_dir():
            items += [(f"_internal/{c.name}", du(c)) for c in child.iterdir()]
        else:
            items.append((child.name, du(child)))
    return sorted(items, key=lambda kv: -kv[1])[:top]


def strip_libraries(internal: Path) -> int:
    """Strip symbols from the torch libraries; returns the bytes saved (0 where strip is absent)."""
    tool = shutil.which("strip")
    if platform.system() != "Linux" or tool is None:
        return 0
    saved = 0
    for pattern in STRIP_GLOBS:
        for lib in internal.glob(pattern):
            if lib.is_symlink() or not lib.is_file():
                continue
            before = lib.stat().st_size
            subprocess.run([tool, "--strip-unneeded", str(lib)], check=True)
            saved += before - lib.stat().st_size
    return saved


def add_weights(bundle: Path, weights: Path) -> Path:
    if not weights.is_file():
        raise SystemExit(f"--weights {weights}: no such file")
    if weights.name not in DINOV2_NAMES:
        raise SystemExit(f"--weights {weights}: the engine only finds DINOv2 files named one of {DINOV2_NAMES}; "
                         "rename the file")
    target = bundle / "data" / "weights" / weights.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, target)
    return target


def build(dist: Path, work: Path, *, weights: Path | None = None, clean: bool = False,
          strip: bool = True, trim: bool = True) -> dict[str, object]:
    started = time.time()
    cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
           "--distpath", str(dist), "--workpath", str(work)]
    if clean:
        cmd.append("--clean")
    cmd.append(str(SPEC))
    if not trim:
        cmd += ["--", "--no-trim"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    bundle = bundle_dir(dist)
    saved = strip_libraries(bundle / "_internal") if strip else 0
    added = add_weights(bundle, weights) if weights is not None else None
    info = {
        "started_at": started,                 # sources newer than this make the bundle stale
        "build_s": round(time.time() - started, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "trim": trim,
        "stripped_bytes": saved,
        "weights": added.relative_to(bundle).as_posix() if added else None,
        "size_bytes": du(bundle),
    }
    (bundle / "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="DINOv2 ViT-S/14 file to ship in <bundle>/data/weights/")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "pyinstaller",
                        help="PyInstaller work folder (default: build/pyinstaller/)")
    parser.add_argument("--clean", action="store_true", help="empty PyInstaller's cache first")
    parser.add_argument("--no-strip", dest="strip", action="store_false", help="keep the torch library symbols")
    parser.add_argument("--no-trim", dest="trim", action="store_false",
                        help="keep everything the hooks collect (to measure the trimming)")
    args = parser.parse_args(argv)
    info = build(args.dist.resolve(), args.work.resolve(), weights=args.weights, clean=args.clean,
                 strip=args.strip, trim=args.trim)
    bundle = bundle_dir(args.dist.resolve())
    print(f"bundle: {executable(args.dist.resolve())}")
    print(f"build: {info['build_s']} s, size: {info['size_bytes'] / 2**20:.0f} MiB "
          f"(strip saved {int(info['stripped_bytes']) / 2**20:.0f} MiB)")
    for item, size in size_report(bundle):
        print(f"  {size / 2**20:8.1f} MiB  {item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
