"""Seeded random unaligned writes through src/chain against a raw model.

chain-tool randwrite applies the same seeded writes (data and zeroes) to
the chain's active layer and to MODEL.raw (made with qemu-img convert
before).  Afterwards: `qemu-img check` finds no error and no leak,
`qemu-img compare` agrees with the model, chain-tool reads the model back,
no lower layer changed, and internal snapshots still read as before.
Two rounds per image, so the second one writes through a reopened image.
"""
import os

import pytest

from helpers import qemu_img_check, qemu_img_compare, qemu_img_info
from test_chain_common import (HDR_AUTOCLEAR, KiB, MiB, assert_same_file, check_status,
                               create_qcow2, create_raw, dir_hashes, file_sha256, fill,
                               qcow2_field, qemu_img, to_raw, tool)

SIZE = 32 * MiB


def _base_with_data(d, name="base.qcow2", size=SIZE, compat="1.1", cluster_size=None,
                    extra_opts=None):
    create_qcow2(d / name, size, compat=compat, cluster_size=cluster_size,
                 extra_opts=extra_opts)
    cmds = ["write -P 0x11 0 %d" % (4 * MiB), "write -P 0x13 %d 1m" % (size - 1 * MiB)]
    if size >= 16 * MiB:
        cmds.append("write -P 0x12 %d %d" % (10 * MiB + 3000, 3 * MiB))
    fill(d / name, cmds)
    return name


def scen_v3_raw_base(d):
    create_raw(d / "base.img", SIZE)
    fill(d / "base.img", ["write -P 0x21 0 %d" % (6 * MiB)], fmt="raw")
    create_qcow2(d / "mid.qcow2", backing="base.img", backing_fmt="raw")
    fill(d / "mid.qcow2", ["write -P 0x22 %d 2m" % (5 * MiB)])
    create_qcow2(d / "top.qcow2", backing="mid.qcow2")
    return "top.qcow2", {"raw_base": True}


def scen_v2_chain(d):
    _base_with_data(d, compat="0.10")
    create_qcow2(d / "mid.qcow2", backing="base.qcow2", compat="0.10")
    fill(d / "mid.qcow2", ["write -P 0x31 %d 1m" % (2 * MiB)])
    create_qcow2(d / "top.qcow2", backing="mid.qcow2", compat="0.10")
    fill(d / "top.qcow2", ["write -P 0x32 %d 300k" % (3 * MiB)])
    return "top.qcow2", {}


def scen_mixed_versions(d):
    # A v2 top over a v3 layer over a v2 base.
    _base_with_data(d, compat="0.10")
    create_qcow2(d / "mid.qcow2", backing="base.qcow2", compat="1.1")
    fill(d / "mid.qcow2", ["write -P 0x35 %d 1m" % (2 * MiB), "write -z %d 1m" % (5 * MiB)])
    create_qcow2(d / "top.qcow2", backing="mid.qcow2", compat="0.10")
    return "top.qcow2", {}


def scen_v3_over_v2(d):
    _base_with_data(d, compat="0.10")
    create_qcow2(d / "top.qcow2", backing="base.qcow2", compat="1.1")
    return "top.qcow2", {"zero_pct": 30}


def scen_single_v3(d):
    create_qcow2(d / "top.qcow2", SIZE)
    return "top.qcow2", {}


def scen_single_v2(d):
    create_qcow2(d / "top.qcow2", SIZE, compat="0.10")
    return "top.qcow2", {}


def scen_compressed_top(d):
    # The top layer holds compressed clusters (and the base is a compressed
    # image): partial writes over them must decompress and copy.
    create_qcow2(d / "src.qcow2", SIZE)
    fill(d / "src.qcow2", ["write -P 0x41 0 %d" % (8 * MiB)])
    qemu_img("convert", "-c", "-O", "qcow2", d / "src.qcow2", d / "base.qcow2")
    os.unlink(d / "src.qcow2")
    create_qcow2(d / "top.qcow2", backing="base.qcow2")
    fill(d / "top.qcow2", ["write -c -P 0x42 %d 64k" % (k * 64 * KiB)
                           for k in range(0, 512, 3)])
    return "top.qcow2", {}


def scen_snapshot_top(d, compat="1.1"):
    # Internal snapshots in the top: clusters shared with a snapshot have
    # refcount > 1 and must be copied, never written in place.
    _base_with_data(d, compat=compat)
    create_qcow2(d / "top.qcow2", backing="base.qcow2", compat=compat)
    fill(d / "top.qcow2", ["write -P 0x51 %d 6m" % (1 * MiB),
                           "write -c -P 0x52 %d 128k" % (12 * MiB)])
    qemu_img("snapshot", "-c", "s1", d / "top.qcow2")
    fill(d / "top.qcow2", ["write -P 0x53 %d 2m" % (2 * MiB)])
    qemu_img("snapshot", "-c", "s2", d / "top.qcow2")
    return "top.qcow2", {"snapshots": ["s1", "s2"]}


def scen_snapshot_top_v2(d):
    return scen_snapshot_top(d, compat="0.10")


def scen_cluster_512(d):
    _base_with_data(d, cluster_size=512)
    create_qcow2(d / "top.qcow2", backing="base.qcow2", cluster_size=512)
    return "top.qcow2", {}


def scen_cluster_2m(d):
    _base_with_data(d, cluster_size=2 * MiB)
    create_qcow2(d / "top.qcow2", backing="base.qcow2", cluster_size=2 * MiB)
    return "top.qcow2", {"max_len": 3 * MiB, "count": 120}


def scen_mixed_clusters(d):
    _base_with_data(d, cluster_size=512)
    create_qcow2(d / "top.qcow2", backing="base.qcow2", cluster_size=2 * MiB)
    return "top.qcow2", {}


def scen_zero_clusters_top(d):
    _base_with_data(d)
    create_qcow2(d / "top.qcow2", backing="base.qcow2")
    fill(d / "top.qcow2", ["write -z 0 1m", "write -P 0x61 %d 1m" % (3 * MiB),
                           "write -z %d 512k" % (3 * MiB)])
    return "top.qcow2", {"zero_pct": 30}


def scen_shorter_backing(d):
    # A top larger than its backing: copy-on-write past the backing's end
    # must fill with zeros.
    _base_with_data(d, size=5 * MiB + 3 * 512)
    create_qcow2(d / "top.qcow2", SIZE, backing="base.qcow2")
    return "top.qcow2", {}


def scen_odd_size(d):
    create_qcow2(d / "top.qcow2", 7 * MiB + 1536)
    return "top.qcow2", {"max_len": 200000}


def scen_refcount_1(d):
    _base_with_data(d, extra_opts=["refcount_bits=1"])
    create_qcow2(d / "top.qcow2", backing="base.qcow2", extra_opts=["refcount_bits=1"])
    return "top.qcow2", {}


def scen_refcount_64(d):
    _base_with_data(d, extra_opts=["refcount_bits=64"])
    create_qcow2(d / "top.qcow2", backing="base.qcow2", extra_opts=["refcount_bits=64"])
    return "top.qcow2", {}


def scen_threads(d):
    _base_with_data(d)
    create_qcow2(d / "top.qcow2", backing="base.qcow2")
    return "top.qcow2", {"threads": 2, "count": 400}


def scen_threads_striped(d):
    # 4 threads writing different 4 KiB stripes of the same 64 KiB clusters
    # at once, over a backing file: concurrent first writes to one cluster
    # (allocation, copy-on-write) must not lose each other's data.
    _base_with_data(d)
    create_qcow2(d / "top.qcow2", backing="base.qcow2")
    return "top.qcow2", {"threads": 4, "stripe": 4096, "count": 800, "zero_pct": 5}


def scen_threads_striped_2m(d):
    _base_with_data(d, cluster_size=2 * MiB)
    create_qcow2(d / "top.qcow2", backing="base.qcow2", cluster_size=2 * MiB)
    return "top.qcow2", {"threads": 3, "stripe": 64 * KiB, "count": 300}


def scen_threads_striped_512(d):
    # 512 B clusters: many L2 tables and refcount blocks allocated at once.
    create_qcow2(d / "top.qcow2", SIZE, cluster_size=512)
    return "top.qcow2", {"threads": 4, "stripe": 512, "count": 1500}


def scen_deep_chain(d):
    # Copy-on-write from a chain 40 layers deep (100 is read-tested).
    from test_chain_read import _deep_chain
    return _deep_chain(d, 40), {"count": 150}


def scen_small_disk_growth(d):
    # A tiny disk written far more than its size: the refcount structures of
    # a fresh image must grow while writes go on.
    create_qcow2(d / "top.qcow2", 2 * MiB, cluster_size=512)
    return "top.qcow2", {"count": 600, "max_len": 9000}


def scen_larger_backing(d):
    # The top is smaller than its backing file: the disk ends at the top's size.
    _base_with_data(d)
    create_qcow2(d / "top.qcow2", 12 * MiB + 512, backing="base.qcow2")
    return "top.qcow2", {}


def scen_lazy_refcounts(d):
    _base_with_data(d)
    create_qcow2(d / "top.qcow2", backing="base.qcow2", extra_opts=["lazy_refcounts=on"])
    return "top.qcow2", {}


def scen_prealloc_metadata(d):
    # Every L2 entry exists (v3: allocated zero clusters): writes reuse them.
    create_qcow2(d / "top.qcow2", SIZE, extra_opts=["preallocation=metadata"])
    return "top.qcow2", {"zero_pct": 25}


def scen_prealloc_falloc(d):
    create_qcow2(d / "top.qcow2", SIZE, extra_opts=["preallocation=falloc"])
    return "top.qcow2", {}


def scen_resized_after_snapshot(d):
    # Snapshot taken at 16 MiB, image grown to 32 MiB afterwards: the
    # snapshot's L1 table is shorter than the active one.
    create_qcow2(d / "top.qcow2", 16 * MiB)
    fill(d / "top.qcow2", ["write -P 0x71 0 %d" % (16 * MiB)])
    qemu_img("snapshot", "-c", "s1", d / "top.qcow2")
    qemu_img("resize", "-q", d / "top.qcow2", SIZE)
    fill(d / "top.qcow2", ["write -P 0x72 %d 1m" % (30 * MiB)])
    return "top.qcow2", {"snapshots": ["s1"]}


def scen_bitmap(d):
    # A persistent dirty bitmap the library does not maintain: like any
    # writer lacking bitmap support it must clear the autoclear bit, which
    # makes qemu-img treat the bitmap as inconsistent (its clusters then
    # count as leaked).
    _base_with_data(d)
    create_qcow2(d / "top.qcow2", backing="base.qcow2")
    qemu_img("bitmap", "--add", d / "top.qcow2", "bm0")
    return "top.qcow2", {"leaks_ok": True, "autoclear_cleared": True}


SCENARIOS = {
    "v3-raw-base": scen_v3_raw_base,
    "v2-chain": scen_v2_chain,
    "mixed-versions": scen_mixed_versions,
    "v3-over-v2": scen_v3_over_v2,
    "single-v3": scen_single_v3,
    "single-v2": scen_single_v2,
    "compressed-top": scen_compressed_top,
    "snapshot-top": scen_snapshot_top,
    "snapshot-top-v2": scen_snapshot_top_v2,
    "cluster-512": scen_cluster_512,
    "cluster-2m": scen_cluster_2m,
    "mixed-clusters": scen_mixed_clusters,
    "zero-clusters-top": scen_zero_clusters_top,
    "shorter-backing": scen_shorter_backing,
    "odd-size": scen_odd_size,
    "refcount-1": scen_refcount_1,
    "refcount-64": scen_refcount_64,
    "threads": scen_threads,
    "threads-striped": scen_threads_striped,
    "threads-striped-2m": scen_threads_striped_2m,
    "threads-striped-512": scen_threads_striped_512,
    "larger-backing": scen_larger_backing,
    "lazy-refcounts": scen_lazy_refcounts,
    "prealloc-metadata": scen_prealloc_metadata,
    "prealloc-falloc": scen_prealloc_falloc,
    "resized-after-snapshot": scen_resized_after_snapshot,
    "bitmap": scen_bitmap,
    "small-disk": scen_small_disk_growth,
    "deep-chain": scen_deep_chain,
}


def _snapshot_raws(top, names, workdir, tag):
    out = {}
    for name in names:
        path = os.path.join(str(workdir), "%s-%s.raw" % (name, tag))
        qemu_img("convert", "-U", "-O", "raw", "-l", "snapshot.name=" + name, top, path)
        out[name] = path
    return out


def run_rounds(d, workdir, top, opts, seeds, count=None):
    top_path = str(d / top)
    model = os.path.join(str(workdir), "model.raw")
    to_raw(top_path, model)
    snaps = opts.get("snapshots", [])
    snaps_before = _snapshot_raws(top_path, snaps, workdir, "before")
    before = dir_hashes(d)
    info_before = qemu_img_info(top_path)
    for seed in seeds:
        model_before = file_sha256(model)
        args = ["randwrite", top_path, "--seed", seed,
                "--count", count or opts.get("count", 250),
                "--max-len", opts.get("max_len", 70000),
                "--zero-pct", opts.get("zero_pct", 10),
                "--threads", opts.get("threads", 1),
                "--stripe", opts.get("stripe", 0),
                "--model", model]
        tool(*args)
        assert file_sha256(model) != model_before, "the writes changed nothing"
        info = qemu_img_check(top_path)
        if not opts.get("leaks_ok"):
            assert info.get("leaks", 0) == 0, "leaked clusters after a clean run: %r" % info
        if opts.get("autoclear_cleared"):
            assert qcow2_field(top_path, HDR_AUTOCLEAR, "Q") & 1 == 0, "bitmaps bit kept"
        qemu_img_compare(top_path, model, fmt_b="raw")
        got = os.path.join(str(workdir), "got.raw")
        tool("read", top_path, got, "--seed", seed)
        assert_same_file(got, model, "chain-tool read after randwrite seed %d" % seed)
        check_status(top_path, model, against_map=not opts.get("raw_base"))
    after = dir_hashes(d)
    for name, h in before.items():
        if name != top:
            assert after.get(name) == h, "lower layer %s changed" % name
    info_after = qemu_img_info(top_path)
    assert info_after["virtual-size"] == info_before["virtual-size"]
    assert info_after.get("backing-filename") == info_before.get("backing-filename")
    assert ([s["name"] for s in info_after.get("snapshots", [])] ==
            [s["name"] for s in info_before.get("snapshots", [])])
    snaps_after = _snapshot_raws(top_path, snaps, workdir, "after")
    for name in snaps:
        assert_same_file(snaps_after[name], snaps_before[name],
                         "internal snapshot %s after writes" % name)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_randwrite_matches_model(scenario, image_dir, tmp_path):
    top, opts = SCENARIOS[scenario](image_dir)
    seed = sum(map(ord, scenario))
    run_rounds(image_dir, tmp_path, top, opts, seeds=[seed, seed + 1000])


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["v3-raw-base", "v2-chain", "compressed-top",
                                      "snapshot-top", "cluster-512", "cluster-2m",
                                      "threads", "threads-striped", "threads-striped-512"])
def test_randwrite_long(scenario, image_dir, tmp_path):
    top, opts = SCENARIOS[scenario](image_dir)
    seed = 7 * sum(map(ord, scenario))
    run_rounds(image_dir, tmp_path, top, opts, seeds=[seed, seed + 1, seed + 2],
               count=3000 if scenario != "cluster-2m" else 500)


def test_randwrite_model_is_deterministic(image_dir, tmp_path):
    # The model must be a pure function of the seed: two identical images
    # written with one seed end up identical, another seed differs.
    for name in ("a.qcow2", "b.qcow2", "c.qcow2"):
        create_qcow2(image_dir / name, 4 * MiB)
    tool("randwrite", image_dir / "a.qcow2", "--seed", 5, "--count", 50)
    tool("randwrite", image_dir / "b.qcow2", "--seed", 5, "--count", 50)
    tool("randwrite", image_dir / "c.qcow2", "--seed", 6, "--count", 50)
    qemu_img_compare(image_dir / "a.qcow2", image_dir / "b.qcow2")
    res = qemu_img("compare", image_dir / "a.qcow2", image_dir / "c.qcow2", check=False)
    assert res.returncode == 1, res.stdout + res.stderr


def test_flush_every_acks_all(image_dir):
    create_qcow2(image_dir / "top.qcow2", 4 * MiB)
    out = tool("randwrite", image_dir / "top.qcow2", "--seed", 3, "--count", 20,
               "--flush-every", 6).stdout.split("\n")
    acks = [int(l.split()[1]) for l in out if l.startswith("acked ")]
    assert acks == [6, 12, 18, 20], out
