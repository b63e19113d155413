"""Export names stay stable: across live snapshot, restart, and a crash
that cut a live snapshot off between creating the overlay and recording
the new active layer in the state file."""
from helpers import *  # noqa: F401,F403


def test_name_follows_chain_after_interrupted_snapshot(image_dir, mountpoint, tmp_path):
    make_chain(image_dir, depth=2, size=16 * MiB, top_name="vm1.qcow2")
    with mounted(image_dir, mountpoint) as m:
        setxattr(m.path("vm1"), "user.chainfs.snapshot", "s1.qcow2")
        assert chain_info(m.path("vm1"))["layers"][0]["file"] == "s1.qcow2"
    # What a crash right after qcow2_create of the next snapshot leaves: an
    # overlay on the active layer, and a state file still naming s1.qcow2.
    create_qcow2(image_dir / "s2.qcow2", backing="s1.qcow2", backing_fmt="qcow2")
    qemu_io(image_dir / "s2.qcow2", "write -P 0x5a 1M 64k")
    expected = to_raw(image_dir / "s2.qcow2", tmp_path / "expected.raw")
    with mounted(image_dir, mountpoint) as m:
        assert sorted(os.listdir(m.mountpoint)) == [".control", ".events", "vm1"]
        info = chain_info(m.path("vm1"))
        assert [l["file"] for l in info["layers"]][:2] == ["s2.qcow2", "s1.qcow2"]
        assert file_sha256(m.path("vm1")) == file_sha256(expected)


def test_shared_layer_does_not_lend_its_name(image_dir, mountpoint):
    """Two overlays on a recorded active file: neither may take its name."""
    make_chain(image_dir, depth=2, size=16 * MiB, top_name="vm1.qcow2")
    with mounted(image_dir, mountpoint) as m:
        setxattr(m.path("vm1"), "user.chainfs.snapshot", "s1.qcow2")
    create_qcow2(image_dir / "a.qcow2", backing="s1.qcow2", backing_fmt="qcow2")
    create_qcow2(image_dir / "b.qcow2", backing="s1.qcow2", backing_fmt="qcow2")
    with mounted(image_dir, mountpoint) as m:
        assert sorted(os.listdir(m.mountpoint)) == [".control", ".events", "a", "b"]
