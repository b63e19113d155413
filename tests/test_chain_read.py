"""Reading chains through src/chain (chain-tool read) against qemu-img.

Every image variant below is made with the real qemu-img / qemu-io; the
flat disk chain-tool reads with chain_pread in seeded unaligned chunks
must equal `qemu-img convert -O raw` byte for byte, and opening the chain
read-only must leave every file unchanged.
"""
import os

import pytest

from helpers import make_chain, qemu_img_check
from test_chain_common import (KiB, MiB, assert_reads_like_qemu, check_status, create_qcow2,
                               create_raw, dir_hashes, fill, kind_at, qemu_img, tool)

SIZE = 32 * MiB


def pattern_writes(rng_seed, size, count, pattern, lengths=(512, 4096, 65536, 100000, 777)):
    import random
    rng = random.Random(rng_seed)
    cmds = []
    for _ in range(count):
        length = rng.choice(lengths)
        off = rng.randrange(0, size - length) & ~511
        cmds.append("write -P %d %d %d" % (pattern, off, length))
    return cmds


# ---------------------------------------------------------------- variants
# Each builder fills directory d and returns the file name of the top image.

def build_v2_chain(d):
    return make_chain(d, depth=3, size=SIZE, base_fmt="qcow2", compat="0.10", seed=2)[-1]


def build_v3_chain(d):
    return make_chain(d, depth=3, size=SIZE, base_fmt="qcow2", seed=3)[-1]


def build_raw_base(d):
    return make_chain(d, depth=3, size=SIZE, base_fmt="raw", seed=4)[-1]


def build_mixed_versions(d):
    create_qcow2(d / "base.qcow2", SIZE, compat="0.10")
    fill(d / "base.qcow2", pattern_writes(17, SIZE, 10, 0xe1))
    create_qcow2(d / "mid.qcow2", backing="base.qcow2", compat="1.1")
    fill(d / "mid.qcow2", pattern_writes(18, SIZE, 10, 0xe2) + ["write -z 0 1m"])
    create_qcow2(d / "top.qcow2", backing="mid.qcow2", compat="0.10")
    fill(d / "top.qcow2", pattern_writes(19, SIZE, 10, 0xe3))
    return "top.qcow2"


def build_single_v3(d):
    create_qcow2(d / "one.qcow2", SIZE)
    fill(d / "one.qcow2", pattern_writes(5, SIZE, 10, 0x5a))
    return "one.qcow2"


def build_compressed(d):
    # A compressed image (qemu-img convert -c) as the base, then a layer
    # with compressed clusters written by qemu-io, then a plain top.
    create_qcow2(d / "src.qcow2", SIZE)
    fill(d / "src.qcow2", pattern_writes(6, SIZE, 12, 0x21) +
         ["write -P 0x22 %d %d" % (3 * MiB, 2 * MiB)])
    qemu_img("convert", "-c", "-O", "qcow2", d / "src.qcow2", d / "base.qcow2")
    os.unlink(d / "src.qcow2")
    create_qcow2(d / "mid.qcow2", backing="base.qcow2")
    fill(d / "mid.qcow2", ["write -c -P 0x33 %d 64k" % (k * 64 * KiB) for k in (0, 5, 48, 49, 300)])
    create_qcow2(d / "top.qcow2", backing="mid.qcow2")
    fill(d / "top.qcow2", ["write -P 0x44 %d 3000" % (48 * 64 * KiB + 1000),
                           "write -c -P 0x45 %d 64k" % (200 * 64 * KiB)])
    return "top.qcow2"


def _zero_chain(d, compat):
    create_qcow2(d / "base.qcow2", SIZE, compat=compat)
    fill(d / "base.qcow2", ["write -P 0x61 0 %d" % (8 * MiB)])
    create_qcow2(d / "top.qcow2", backing="base.qcow2", compat=compat)
    fill(d / "top.qcow2", [
        "write -z 0 128k",                 # whole clusters: zero clusters in v3
        "write -z 200000 70000",           # unaligned: partial clusters
        "write -P 0x62 %d 64k" % (1 * MiB),
        "write -z %d 64k" % (1 * MiB),     # zero over data of this layer
        "write -z -u %d 256k" % (2 * MiB),  # may unmap
        "write -z %d 1m" % (20 * MiB),     # zeros where nothing was
    ])
    return "top.qcow2"


def build_zero_v3(d):
    return _zero_chain(d, "1.1")


def build_zero_v2(d):
    return _zero_chain(d, "0.10")


def _cluster_chain(d, cluster_size):
    return make_chain(d, depth=3, size=SIZE, base_fmt="qcow2", cluster_size=cluster_size,
                      seed=cluster_size & 0xffff)[-1]


def build_cluster_512(d):
    return _cluster_chain(d, 512)


def build_cluster_64k(d):
    return _cluster_chain(d, 64 * KiB)


def build_cluster_2m(d):
    return _cluster_chain(d, 2 * MiB)


def build_mixed_clusters(d):
    # Layers with different cluster sizes: lookups must split runs at the
    # finest granule.
    create_qcow2(d / "base.qcow2", SIZE, cluster_size=2 * MiB)
    fill(d / "base.qcow2", ["write -P 0x71 0 %d" % (6 * MiB)])
    create_qcow2(d / "mid.qcow2", backing="base.qcow2", cluster_size=512)
    fill(d / "mid.qcow2", pattern_writes(7, SIZE, 20, 0x72, lengths=(512, 1536, 7000)))
    create_qcow2(d / "top.qcow2", backing="mid.qcow2", cluster_size=64 * KiB)
    fill(d / "top.qcow2", pattern_writes(8, SIZE, 10, 0x73))
    return "top.qcow2"


def _snapshot_top(d, compat):
    create_qcow2(d / "base.qcow2", SIZE, compat=compat)
    fill(d / "base.qcow2", pattern_writes(9, SIZE, 8, 0x81))
    create_qcow2(d / "top.qcow2", backing="base.qcow2", compat=compat)
    fill(d / "top.qcow2", pattern_writes(10, SIZE, 8, 0x82))
    qemu_img("snapshot", "-c", "s1", d / "top.qcow2")
    fill(d / "top.qcow2", pattern_writes(11, SIZE, 8, 0x83))
    qemu_img("snapshot", "-c", "s2", d / "top.qcow2")
    fill(d / "top.qcow2", pattern_writes(12, SIZE, 8, 0x84) + ["write -z 0 64k"])
    return "top.qcow2"


def build_snapshots_v3(d):
    return _snapshot_top(d, "1.1")


def build_snapshots_v2(d):
    return _snapshot_top(d, "0.10")


def build_shorter_backing(d):
    # base 4 MiB (raw) < mid 12 MiB < top 32 MiB: past the end of a
    # shorter backing file the chain reads zeros.
    create_raw(d / "base.img", 4 * MiB)
    fill(d / "base.img", ["write -P 0x91 0 %d" % (4 * MiB)], fmt="raw")
    create_qcow2(d / "mid.qcow2", 12 * MiB, backing="base.img", backing_fmt="raw")
    fill(d / "mid.qcow2", ["write -P 0x92 %d 64k" % (12 * MiB - 64 * KiB),
                           "write -P 0x93 %d 8k" % (4 * MiB - 4 * KiB)])
    create_qcow2(d / "top.qcow2", SIZE, backing="mid.qcow2")
    fill(d / "top.qcow2", ["write -P 0x94 %d 4k" % (12 * MiB - 2 * KiB)])
    return "top.qcow2"


def build_refcount_1(d):
    create_qcow2(d / "base.qcow2", SIZE, extra_opts=["refcount_bits=1"])
    fill(d / "base.qcow2", pattern_writes(13, SIZE, 10, 0xa1))
    create_qcow2(d / "top.qcow2", backing="base.qcow2", extra_opts=["refcount_bits=1"])
    fill(d / "top.qcow2", pattern_writes(14, SIZE, 10, 0xa2))
    return "top.qcow2"


def build_refcount_64(d):
    create_qcow2(d / "base.qcow2", SIZE, extra_opts=["refcount_bits=64"])
    fill(d / "base.qcow2", pattern_writes(15, SIZE, 10, 0xa3))
    create_qcow2(d / "top.qcow2", backing="base.qcow2", extra_opts=["refcount_bits=64"])
    fill(d / "top.qcow2", pattern_writes(16, SIZE, 10, 0xa4))
    return "top.qcow2"


def build_odd_size(d):
    # Virtual size not a multiple of the cluster size, data in the tail.
    size = 10 * MiB + 1536
    create_qcow2(d / "base.qcow2", size)
    fill(d / "base.qcow2", ["write -P 0xb1 %d 1536" % (10 * MiB)])
    create_qcow2(d / "top.qcow2", backing="base.qcow2")
    fill(d / "top.qcow2", ["write -P 0xb2 %d 1024" % (10 * MiB + 512)])
    return "top.qcow2"


def build_subdir_and_absolute_refs(d):
    # Backing references are relative to the image holding them:
    # sub/a.qcow2 names ../base.img (still inside the directory), mid names
    # sub/a.qcow2, and top uses an absolute path inside the directory.
    (d / "sub").mkdir()
    create_raw(d / "base.img", SIZE)
    fill(d / "base.img", ["write -P 0xc1 0 1m"], fmt="raw")
    create_qcow2(d / "sub" / "a.qcow2", backing="../base.img", backing_fmt="raw")
    fill(d / "sub" / "a.qcow2", ["write -P 0xc2 512k 1m"])
    create_qcow2(d / "mid.qcow2", backing="sub/a.qcow2")
    fill(d / "mid.qcow2", ["write -P 0xc3 1m 4k"])
    create_qcow2(d / "top.qcow2", backing=str(d / "mid.qcow2"))
    fill(d / "top.qcow2", ["write -P 0xc4 1200k 100"])
    return "top.qcow2"


def _deep_chain(d, depth):
    size = 16 * MiB
    create_qcow2(d / "l0.qcow2", size)
    fill(d / "l0.qcow2", ["write -P 1 0 %d" % size])
    for i in range(1, depth):
        # Each layer overwrites a slice of its own and part of the one below.
        # Written before it is linked (qemu-io on a chain i deep costs O(i)
        # opens, O(depth^2) in all); qemu-img convert of the final chain is
        # the oracle, so what copy-on-write put in partial clusters does
        # not matter.
        name = "l%d.qcow2" % i
        create_qcow2(d / name, size)
        off = (i * 96 * KiB) % (size - 200 * KiB)
        fill(d / name, ["write -P %d %d %d" % (i % 255 + 1, off, 100 * KiB + i)])
        qemu_img("rebase", "-u", "-b", "l%d.qcow2" % (i - 1), "-F", "qcow2", d / name)
    return "l%d.qcow2" % (depth - 1)


def build_larger_backing(d):
    create_qcow2(d / "base.qcow2", SIZE)
    fill(d / "base.qcow2", ["write -P 0xf1 0 %d" % SIZE])
    create_qcow2(d / "top.qcow2", 12 * MiB + 512, backing="base.qcow2")
    fill(d / "top.qcow2", ["write -P 0xf2 %d 1536" % (12 * MiB - 1024)])
    return "top.qcow2"


def build_prealloc_metadata(d):
    # (qemu-img allows preallocation with a backing file only with
    # extended L2 entries, which chainfs refuses.)
    create_qcow2(d / "top.qcow2", SIZE, extra_opts=["preallocation=metadata"])
    fill(d / "top.qcow2", ["write -P 0xf4 %d 100k" % (1 * MiB + 7)])
    return "top.qcow2"


def _compressed_cs(d, cluster_size):
    create_qcow2(d / "src.qcow2", SIZE, cluster_size=cluster_size)
    fill(d / "src.qcow2", pattern_writes(cluster_size, SIZE, 20, 0xf5) +
         ["write -P 0xf6 %d 3m" % (5 * MiB)])
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=%d" % cluster_size,
             d / "src.qcow2", d / "top.qcow2")
    os.unlink(d / "src.qcow2")
    return "top.qcow2"


def build_compressed_512(d):
    return _compressed_cs(d, 512)


def build_compressed_2m(d):
    return _compressed_cs(d, 2 * MiB)


def build_resized_after_snapshot(d):
    create_qcow2(d / "top.qcow2", 16 * MiB)
    fill(d / "top.qcow2", ["write -P 0xf7 0 %d" % (16 * MiB)])
    qemu_img("snapshot", "-c", "s1", d / "top.qcow2")
    qemu_img("resize", "-q", d / "top.qcow2", SIZE)
    fill(d / "top.qcow2", ["write -P 0xf8 %d 1m" % (30 * MiB), "write -z 0 1m"])
    return "top.qcow2"


def build_lazy_refcounts(d):
    create_qcow2(d / "top.qcow2", SIZE, extra_opts=["lazy_refcounts=on"])
    fill(d / "top.qcow2", pattern_writes(20, SIZE, 10, 0xf9))
    return "top.qcow2"


VARIANTS = {
    "larger-backing": build_larger_backing,
    "prealloc-metadata": build_prealloc_metadata,
    "compressed-512": build_compressed_512,
    "compressed-2m": build_compressed_2m,
    "resized-after-snapshot": build_resized_after_snapshot,
    "lazy-refcounts": build_lazy_refcounts,
    "v2-chain": build_v2_chain,
    "v3-chain": build_v3_chain,
    "raw-base": build_raw_base,
    "mixed-versions": build_mixed_versions,
    "single-v3": build_single_v3,
    "compressed": build_compressed,
    "zero-v3": build_zero_v3,
    "zero-v2": build_zero_v2,
    "cluster-512": build_cluster_512,
    "cluster-64k": build_cluster_64k,
    "cluster-2m": build_cluster_2m,
    "mixed-clusters": build_mixed_clusters,
    "snapshots-v3": build_snapshots_v3,
    "snapshots-v2": build_snapshots_v2,
    "shorter-backing": build_shorter_backing,
    "refcount-1": build_refcount_1,
    "refcount-64": build_refcount_64,
    "odd-size": build_odd_size,
    "subdir-refs": build_subdir_and_absolute_refs,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_read_matches_qemu(variant, image_dir, tmp_path):
    top = VARIANTS[variant](image_dir)
    qemu_img_check(image_dir / top)
    before = dir_hashes(image_dir)
    for seed in (1, 2):
        assert_reads_like_qemu(str(image_dir / top), tmp_path, seed=seed)
    assert dir_hashes(image_dir) == before, "a read-only open changed a file"


@pytest.mark.parametrize("depth", [1, 2, 8, 100])
def test_read_deep_chain(depth, image_dir, tmp_path):
    top = _deep_chain(image_dir, depth)
    before = dir_hashes(image_dir)
    out = tool("open", image_dir / top).stdout.splitlines()
    assert len(out) == depth, out
    assert out[0].split()[0] == top and out[-1].split()[0] == "l0.qcow2", out
    assert_reads_like_qemu(str(image_dir / top), tmp_path, seed=depth)
    assert dir_hashes(image_dir) == before


def test_open_lists_layers(image_dir):
    top = build_shorter_backing(image_dir)
    lines = [l.split() for l in tool("open", image_dir / top).stdout.splitlines()]
    assert [l[0] for l in lines] == ["top.qcow2", "mid.qcow2", "base.img"]
    assert [l[1] for l in lines] == ["qcow2", "qcow2", "raw"]
    assert [int(l[2]) for l in lines] == [SIZE, 12 * MiB, 4 * MiB]
    assert int(lines[0][3]) == 64 * KiB


def test_open_writable_leaves_lower_layers(image_dir):
    # Opening the top read-write and closing it without writes changes no
    # lower layer (they are opened read-only) and leaves a clean top.
    top = build_v3_chain(image_dir)
    before = dir_hashes(image_dir)
    tool("open", image_dir / top, "--rw")
    after = dir_hashes(image_dir)
    for name, h in before.items():
        if name != top:
            assert after[name] == h, name
    qemu_img_check(image_dir / top)


# ---------------------------------------------------------------- status

@pytest.mark.parametrize("variant", ["v3-chain", "zero-v3", "compressed", "mixed-clusters",
                                     "raw-base", "snapshots-v3"])
def test_status_runs(variant, image_dir, tmp_path):
    top = VARIANTS[variant](image_dir)
    exp = assert_reads_like_qemu(str(image_dir / top), tmp_path)
    # A raw base may report all of itself as data: compare with qemu-img
    # map only for qcow2-only chains.
    check_status(str(image_dir / top), exp, against_map=(variant != "raw-base"))


def test_status_zero_cluster_hides_backing(image_dir, tmp_path):
    top = build_zero_v3(image_dir)
    exp = assert_reads_like_qemu(str(image_dir / top), tmp_path)
    runs = check_status(str(image_dir / top), exp, against_map=True)
    # 0..128k is a zero cluster over data of the base: a hole.
    assert kind_at(runs, 0) == "hole"
    assert kind_at(runs, 128 * KiB - 1) == "hole"
    assert kind_at(runs, 128 * KiB) == "data"
    # Far past everything written: a hole.
    assert kind_at(runs, SIZE - 1) == "hole"


# ---------------------------------------------------------------- depth limit

def _clone_chain(d, depth):
    """l0000 <- l0001 <- ... (depth layers), made by copying one small
    overlay and patching its backing name (same length) in place: qemu-img
    create 1000 times, or qemu-io on a chain that deep, takes minutes.
    Returns the top's name and the disk the chain below the top shows."""
    import struct
    create_qcow2(d / "l0000.qcow2", 4 * MiB, cluster_size=512)
    fill(d / "l0000.qcow2", ["write -P 0xd0 0 1m"])
    create_qcow2(d / "l0001.qcow2", backing="l0000.qcow2", cluster_size=512)
    with open(d / "l0001.qcow2", "rb") as f:
        proto = f.read()
    off = struct.unpack_from(">Q", proto, 8)[0]
    n = struct.unpack_from(">I", proto, 16)[0]
    assert proto[off:off + n] == b"l0000.qcow2"
    expected = bytearray(4 * MiB)
    expected[0:1 * MiB] = b"\xd0" * MiB
    # A little data at a few depths, so the walk matters: written while the
    # layer still names l0000 as its backing (whole 512 B clusters, so no
    # copy-on-write reads that backing), then relinked.
    data_layers = set(range(1, depth - 1, max(1, depth // 7)))
    for i in range(1, depth):
        path = d / ("l%04d.qcow2" % i)
        if i > 1:
            with open(path, "wb") as f:
                f.write(proto)
        if i in data_layers:
            woff, length, pat = ((i * 4099) % (3 * MiB)) & ~511, 1024, i % 251 + 1
            fill(path, ["write -P %d %d %d" % (pat, woff, length)])
            expected[woff:woff + length] = bytes([pat]) * length
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(b"l%04d.qcow2" % (i - 1))
    return "l%04d.qcow2" % (depth - 1), bytes(expected)


def test_chain_max_depth(image_dir, tmp_path):
    # CHAIN_MAX_DEPTH (1024) layers resolve; one more is refused with ELOOP.
    top, expected = _clone_chain(image_dir, 1025)
    below = "l1023.qcow2"
    before = dir_hashes(image_dir)
    out = tool("open", image_dir / below).stdout.splitlines()
    assert len(out) == 1024 and out[-1].split()[0] == "l0000.qcow2", out[-3:]
    got = tmp_path / "got.raw"
    tool("read", image_dir / below, got)
    assert got.read_bytes() == expected
    res = tool("open", image_dir / top, check=False)
    assert res.returncode == 1 and res.stderr.rstrip().endswith("[ELOOP]"), res.stderr
    assert dir_hashes(image_dir) == before


def test_tool_usage_errors(image_dir):
    # Wrong usage exits 2 with a usage message; a missing image exits 1
    # with the library's message naming it.
    for args in ([], ["frobnicate"], ["read"], ["randwrite", "x", "--count"],
                 ["randwrite", "x", "--seed", "abc", "--count", "1"]):
        res = tool(*args, check=False)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert res.stderr, args
    res = tool("open", image_dir / "nothere.qcow2", check=False)
    assert res.returncode == 1 and "nothere.qcow2" in res.stderr, res.stderr
    assert res.stderr.rstrip().endswith("[ENOENT]"), res.stderr
