"""Every kind of chain, read through a real chainfs mount, equals
`qemu-img convert -O raw` of its active layer; the root lists the exports;
getattr tells the virtual size and the allocated blocks.

All chains live in one image directory and are served by one mount, so
the suite mounts once."""
import os
import stat

import pytest

from helpers import (KiB, MiB, chain_info, create_qcow2, make_chain, mounted,
                     qemu_img, qemu_io, run)
from test_daemon_common import assert_export_equals_image, export_names

SIZE = 16 * MiB


def build_all(d):
    """Build one chain of each kind in d; return {export name: top file}."""
    d = str(d)
    chains = {}

    def chain(export, **kw):
        names = make_chain(d, size=SIZE, prefix=export + "-", top_name=export + ".qcow2",
                           **kw)
        chains[export] = names[-1]

    chain("v3", depth=3, base_fmt="qcow2", seed=1)
    chain("v2", depth=3, base_fmt="qcow2", compat="0.10", seed=2)
    chain("rawbase", depth=3, base_fmt="raw", seed=3)
    chain("c512", depth=2, base_fmt="qcow2", cluster_size=512, seed=4)
    chain("c2m", depth=2, base_fmt="qcow2", cluster_size=2 * MiB, seed=5)
    chain("deep16", depth=16, base_fmt="qcow2", seed=6, writes_per_layer=3)

    # Depth 1: a lone qcow2.
    single = os.path.join(d, "single.qcow2")
    create_qcow2(single, SIZE)
    qemu_io(single, "write -P 9 1M 3M", "write -P 10 10000 5000")
    chains["single"] = "single.qcow2"

    # Compressed clusters below a normal overlay.
    src = os.path.join(d, "comp-src.qcow2")
    create_qcow2(src, SIZE)
    qemu_io(src, "write -P 21 0 2M", "write -P 22 5M 1M", "write -P 23 12345 777")
    run(["qemu-img", "convert", "-c", "-O", "qcow2", src, os.path.join(d, "comp-base.qcow2")])
    os.unlink(src)
    create_qcow2(os.path.join(d, "comp.qcow2"), backing="comp-base.qcow2")
    qemu_io(os.path.join(d, "comp.qcow2"), "write -P 24 1M 100k")
    chains["comp"] = "comp.qcow2"

    # Zero clusters (v3) over data below, whole and partial clusters.
    make_chain(d, depth=2, size=SIZE, base_fmt="qcow2", prefix="zero-",
               top_name="zero.qcow2", seed=7)
    zb = os.path.join(d, "zero-base.qcow2")
    qemu_io(zb, "write -P 31 0 8M")
    qemu_io(os.path.join(d, "zero.qcow2"), "write -z 64k 1M", "write -z 3000 5000",
            "write -z -u 4M 2M")
    chains["zero"] = "zero.qcow2"

    # An internal snapshot in the active layer: the current state is served.
    isnap = os.path.join(d, "isnap.qcow2")
    create_qcow2(isnap, SIZE)
    qemu_io(isnap, "write -P 41 0 4M")
    qemu_img("snapshot", "-c", "before", isnap)
    qemu_io(isnap, "write -P 42 1M 1M", "write -z 3M 64k")
    chains["isnap"] = "isnap.qcow2"
    return chains


@pytest.fixture(scope="module")
def all_chains(tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon-read")
    d = root / "images"
    d.mkdir()
    chains = build_all(d)
    mnt = root / "mnt"
    with mounted(d, mnt) as m:
        yield m, d, chains, root


def test_root_lists_every_export(all_chains):
    m, d, chains, _ = all_chains
    assert export_names(m.mountpoint) == sorted(chains)
    assert ".control" in os.listdir(m.mountpoint)
    st = os.stat(m.path(".control"))
    assert stat.S_ISREG(st.st_mode)
    # readdir agrees with lookup
    for name in chains:
        st = os.lstat(m.path(name))
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) in (0o644, 0o600)
    assert not os.path.exists(m.path("nonexistent"))


@pytest.mark.parametrize("export", ["v3", "v2", "rawbase", "c512", "c2m", "deep16",
                                    "single", "comp", "zero", "isnap"])
def test_export_reads_like_qemu(all_chains, export):
    m, d, chains, root = all_chains
    assert_export_equals_image(m.path(export), os.path.join(str(d), chains[export]), root)


def test_odirect_convert_of_export(all_chains):
    """qemu-img reading the export as a raw disk with O_DIRECT (cache=none)."""
    m, d, chains, root = all_chains
    out = os.path.join(str(root), "direct.raw")
    run(["qemu-img", "convert", "-f", "raw", "-T", "none", "-O", "raw",
         m.path("deep16"), out])
    exp = os.path.join(str(root), "deep16.raw")
    run(["qemu-img", "convert", "-U", "-O", "raw", os.path.join(str(d), chains["deep16"]), exp])
    run(["cmp", out, exp])
    os.unlink(out)
    os.unlink(exp)


def test_getattr_size_and_blocks(all_chains):
    m, d, chains, _ = all_chains
    for name in ("v3", "zero", "deep16", "single"):
        st = os.stat(m.path(name))
        assert st.st_size == SIZE
        info = chain_info(m.path(name))
        assert info["name"] == name
        assert info["layers"][0]["file"] == chains[name]
        allocated = sum(layer["allocated"] for layer in info["layers"])
        assert allocated > 0
        # st_blocks counts the chain's allocated bytes in 512-byte units.
        assert abs(st.st_blocks * 512 - allocated) <= 512 * len(info["layers"]), (
            st.st_blocks, allocated)
    # depth recorded in the chain attribute
    assert len(chain_info(m.path("deep16"))["layers"]) == 16
    assert len(chain_info(m.path("single"))["layers"]) == 1
    layers = chain_info(m.path("rawbase"))["layers"]
    assert [layer["format"] for layer in layers] == ["qcow2", "qcow2", "raw"]
    assert layers[-1]["backing"] is None
    assert layers[0]["backing"] == layers[1]["file"]


def test_reads_clamped_at_end(all_chains):
    m, d, chains, _ = all_chains
    fd = os.open(m.path("v3"), os.O_RDONLY)
    try:
        assert len(os.pread(fd, 65536, SIZE - 1000)) == 1000
        assert os.pread(fd, 4096, SIZE) == b""
        assert os.pread(fd, 4096, SIZE + 12345) == b""
    finally:
        os.close(fd)
