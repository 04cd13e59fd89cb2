"""OpenBLAS preloading (mlx_sdft.machine.blas): the path choice on fake files, and in fresh processes which
BLAS ends up mapped. No timings: the speed-up is measured by bench/, not asserted here."""

import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mlx_sdft.machine.blas import EXPLICIT, OPT_OUT, candidates, choose, mapped

linux = pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS preloading is Linux-only")
# Every fresh process reports the BLAS libraries it mapped, one per line, after its own code.
MAPS = "\nfrom mlx_sdft.machine.blas import mapped; print(*mapped(open('/proc/self/maps').read()), sep='\\n')"


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (OPT_OUT, EXPLICIT, "LD_PRELOAD")}
    return subprocess.run(
        [sys.executable, "-c", code + MAPS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def openblas_mapped(out: str) -> bool:
    return any(Path(line).name.startswith("libopenblas") for line in out.splitlines())


def test_choose_takes_the_first_existing_candidate(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.so", "b.so", "c.so"))
    for f in (b, c):
        f.touch()
    assert choose(None, [str(a), str(b), str(c)]) == str(b)
    assert choose(None, [str(a)]) is None
    assert choose("", [str(c)]) == str(c)


def test_choose_prefers_an_existing_explicit_path(tmp_path):
    mine, std = tmp_path / "mine.so", tmp_path / "std.so"
    for f in (mine, std):
        f.touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose(str(mine), [str(std)]) == str(mine)


def test_choose_warns_about_a_missing_explicit_path_and_falls_back(tmp_path):
    std = tmp_path / "std.so"
    std.touch()
    with pytest.warns(UserWarning, match=EXPLICIT):
        assert choose(str(tmp_path / "missing.so"), [str(std)]) == str(std)


def test_candidates_cover_debian_multiarch_and_fedora():
    assert (
        candidates("aarch64")[0] == "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0"
    )
    assert "/usr/lib64/libopenblas.so.0" in candidates("x86_64")


def test_mapped_keeps_blas_paths_only():
    maps = (
        "7f00-7f01 r-xp 0 08:01 1 /usr/lib/libopenblasp-r0.3.21.so\n"
        "7f01-7f02 r-xp 0 08:01 2 /x/mlx.libs/libblas-1.so.3\n"
        "7f02-7f03 r-xp 0 08:01 3 /usr/lib/libc.so.6\n7f03-7f04 rw-p 0 00:00 0 \n"
    )
    assert mapped(maps) == ["/usr/lib/libopenblasp-r0.3.21.so", "/x/mlx.libs/libblas-1.so.3"]


@linux
def test_reference_opt_out_maps_no_openblas():
    out = run(
        "import mlx_sdft, mlx.core as mx; mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))",
        **{OPT_OUT: "reference"},
    )
    assert not openblas_mapped(out.stdout), out.stdout


@linux
def test_missing_explicit_path_warns_at_import(tmp_path):
    out = run("import mlx_sdft", **{EXPLICIT: str(tmp_path / "missing.so")})
    assert "UserWarning" in out.stderr and EXPLICIT in out.stderr, out.stderr


@linux
def test_installed_openblas_serves_mlx_matmuls():
    found = choose(None, candidates(platform.machine()))
    if found is None:
        pytest.skip(f"no OpenBLAS installed in {candidates(platform.machine())}")
    code = (
        "import mlx_sdft; import mlx.core as mx\n"
        "c = mx.ones((64, 64)) @ mx.ones((64, 64)); mx.eval(c)\n"
        "assert mx.all(c == 64).item(), c"
    )
    out = run(code)
    assert openblas_mapped(out.stdout), out.stdout
