"""Point the ROS 2 wheels' CMake export files at this venv's Python headers and numpy.

The PyPI ROS 2 wheels hard-code their build machine's paths (/opt/python/cp3XX-.../include/python3.XX and
.../site-packages/numpy/_core/include) in *.cmake files; colcon builds of rosidl packages fail until those
paths name this venv's. Idempotent: files already patched are left alone.
"""

import re
import sys
import sysconfig
from pathlib import Path

import numpy

INCLUDE = re.compile(r"/opt/python/cp3\d+-cp3\d+t?/include/python3\.\d+t?")
NUMPY = re.compile(r"/opt/python/cp3\d+-cp3\d+t?/lib/python3\.\d+t?/site-packages/numpy/_core/include")


def main() -> int:
    venv = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix)
    include, numpy_include = sysconfig.get_paths()["include"], numpy.get_include()
    patched = 0
    for path in (venv / "share").rglob("*.cmake"):
        text = path.read_text(errors="surrogateescape")
        new = INCLUDE.sub(include, NUMPY.sub(numpy_include, text))
        if new != text:
            path.write_text(new, errors="surrogateescape")
            patched += 1
    print(f"[setup] ROS wheel CMake files patched: {patched}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
