"""Every refusal of src/chain: the message names the thing, nothing changes.

Each case makes an image directory with qemu-img (patching header bits
with struct where qemu-img cannot make the image), then asks chain-tool to
open the chain read-write (the strictest case: nothing may be written even
then) and read-only.  Both must fail with exit status 1, a message naming
the feature or reference and the file, and the errno the contract gives
(chain.h, image.h); every file in the directory keeps its sha256.
"""
import errno
import os
import struct

import pytest

from test_chain_common import (HDR_CLUSTER_BITS, HDR_CRYPT_METHOD, HDR_INCOMPAT,
                               HDR_MAGIC, HDR_VERSION, INCOMPAT_CORRUPT,
                               MiB, create_qcow2, create_raw, dir_hashes, file_sha256, fill, qcow2_field,
                               qcow2_patch, qemu_img, tool)

SIZE = 8 * MiB
UNSUPPORTED = {"EOPNOTSUPP", "ENOTSUP"}
BAD_HEADER = {"EINVAL", "EOPNOTSUPP", "ENOTSUP"}


def _plain(d, name="img.qcow2", **kw):
    create_qcow2(d / name, SIZE, **kw)
    fill(d / name, ["write -P 0x5a 0 64k"])
    return name


def _over_base(d, patch_base):
    """top.qcow2 over base.qcow2; patch_base(path) spoils the base."""
    _plain(d, "base.qcow2")
    create_qcow2(d / "top.qcow2", backing="base.qcow2")
    patch_base(str(d / "base.qcow2"))
    return "top.qcow2", "base.qcow2"


QCOW2_EXT_FDE = 0x0537BE77   # full disk encryption header pointer
HDR_HEADER_LENGTH = 100


def make_luks_qcow2(path):
    """A qcow2 image laid out as `qemu-img create -o encrypt.format=luks`
    lays it out: crypt_method 2, a full-disk-encryption header extension
    pointing at a LUKS1 header in a cluster of its own.  Built by hand, since
    qemu-img benchmarks PBKDF2 before it writes one, whatever iter-time
    says, and under load that benchmark fails ("Unable to get accurate CPU
    usage").  Its key slots are all disabled and hold no key material
    (qemu-img info still reads it as LUKS): chainfs must refuse the image
    on its qcow2 header alone."""
    create_qcow2(path, SIZE)
    fill(path, ["write -P 0x5a 0 64k"])
    cluster = 1 << qcow2_field(str(path), HDR_CLUSTER_BITS, "I")
    hdr_len = qcow2_field(str(path), HDR_HEADER_LENGTH, "I")
    luks_off = (os.path.getsize(path) + cluster - 1) // cluster * cluster
    # LUKS1 phdr: magic, version, cipher name and mode, hash, payload
    # offset (sectors), key bytes, digest, salt, iterations, uuid.
    phdr = (b"LUKS\xba\xbe" + struct.pack(">H", 1) +
            b"aes".ljust(32, b"\0") + b"xts-plain64".ljust(32, b"\0") +
            b"sha256".ljust(32, b"\0") + struct.pack(">II", 4096, 64) +
            bytes(20) + bytes(32) + struct.pack(">I", 1000) +
            b"00000000-0000-0000-0000-000000000000".ljust(40, b"\0"))
    # Eight disabled key slots (0xdead), each with room for 4000 stripes.
    for i in range(8):
        phdr += struct.pack(">II", 0x0000DEAD, 1000) + bytes(32) + \
            struct.pack(">II", 8 + i * 504, 4000)
    with open(path, "r+b") as f:
        f.seek(luks_off)
        f.write(phdr.ljust(cluster, b"\0"))
        # The extensions after the header: FDE, then the end marker (the
        # feature-name table qemu-img wrote there is optional).
        f.seek(hdr_len)
        f.write(struct.pack(">II", QCOW2_EXT_FDE, 16) +
                struct.pack(">QQ", luks_off, cluster) + struct.pack(">II", 0, 0))
    qcow2_patch(str(path), HDR_CRYPT_METHOD, "I", 2)


def case_luks(d):
    make_luks_qcow2(d / "enc.qcow2")
    return "enc.qcow2", "enc.qcow2", ["encrypt"], UNSUPPORTED


def case_aes_patched(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_CRYPT_METHOD, "I", 1)
    return name, name, ["encrypt"], UNSUPPORTED


def case_aes_in_backing(d):
    # An encrypted lower layer refuses the whole chain.
    top, base = _over_base(d, lambda p: qcow2_patch(p, HDR_CRYPT_METHOD, "I", 1))
    return top, base, ["encrypt"], UNSUPPORTED


def case_data_file(d):
    # qemu-img creates a relative data file relative to its cwd: pass it
    # absolute so it lands in the image directory.
    create_qcow2(d / "ext.qcow2", SIZE, extra_opts=["data_file=%s" % (d / "ext-data.raw")])
    return "ext.qcow2", "ext.qcow2", ["data file", "data_file", "data-file"], UNSUPPORTED


def case_unknown_incompat(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_INCOMPAT, "Q", 1 << 9)
    return name, name, ["incompatible"], UNSUPPORTED


def case_unknown_incompat_high(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_INCOMPAT, "Q", 1 << 63)
    return name, name, ["incompatible"], UNSUPPORTED


def case_corrupt(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_INCOMPAT, "Q", INCOMPAT_CORRUPT)
    return name, name, ["corrupt"], {"EOPNOTSUPP", "ENOTSUP", "EIO", "EINVAL", "EROFS",
                                     "EUCLEAN"}


def case_extended_l2(d):
    create_qcow2(d / "l2.qcow2", SIZE, extra_opts=["extended_l2=on"])
    return "l2.qcow2", "l2.qcow2", ["extended"], UNSUPPORTED


def case_zstd(d):
    create_qcow2(d / "z.qcow2", SIZE, extra_opts=["compression_type=zstd"])
    return "z.qcow2", "z.qcow2", ["zstd", "compression"], UNSUPPORTED


def case_bad_magic_backing(d):
    top, base = _over_base(d, lambda p: qcow2_patch(p, HDR_MAGIC, "I", 0x51464900))
    return top, base, ["magic", "format", "qcow2"], {"EINVAL"}


def case_bad_version(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_VERSION, "I", 4)
    return name, name, ["version"], BAD_HEADER


def case_version_1(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_VERSION, "I", 1)
    return name, name, ["version"], BAD_HEADER


def case_cluster_bits_small(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_CLUSTER_BITS, "I", 8)
    return name, name, ["cluster"], BAD_HEADER


def case_cluster_bits_large(d):
    name = _plain(d)
    qcow2_patch(str(d / name), HDR_CLUSTER_BITS, "I", 22)
    return name, name, ["cluster"], BAD_HEADER


def case_backing_loop(d):
    create_qcow2(d / "a.qcow2", SIZE)
    create_qcow2(d / "b.qcow2", backing="a.qcow2")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", d / "a.qcow2")
    return "b.qcow2", ("a.qcow2", "b.qcow2"), ["loop"], {"ELOOP"}


def case_self_loop(d):
    create_qcow2(d / "a.qcow2", SIZE)
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", d / "a.qcow2")
    return "a.qcow2", "a.qcow2", ["loop"], {"ELOOP"}


def case_missing_backing(d):
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
             d / "top.qcow2", SIZE)
    return "top.qcow2", "gone.qcow2", [], {"ENOENT"}


def case_backing_outside(d):
    # The referenced file exists: the refusal is for leaving the directory.
    create_qcow2(d.parent / "outside.qcow2", SIZE)
    create_qcow2(d / "top.qcow2", backing="../outside.qcow2")
    return "top.qcow2", "../outside.qcow2", [], {"EACCES"}


def case_backing_outside_absolute(d):
    create_qcow2(d.parent / "outside2.qcow2", SIZE)
    create_qcow2(d / "top.qcow2", backing=str(d.parent / "outside2.qcow2"))
    return "top.qcow2", "outside2.qcow2", [], {"EACCES"}


def case_backing_symlink_outside(d):
    # A name inside the directory that resolves outside it.
    create_qcow2(d.parent / "outside3.qcow2", SIZE)
    os.symlink(str(d.parent / "outside3.qcow2"), str(d / "link.qcow2"))
    create_qcow2(d / "top.qcow2", backing="link.qcow2")
    return "top.qcow2", ("link.qcow2", "outside3.qcow2"), [], {"EACCES"}


def case_raw_declared_qcow2(d):
    create_raw(d / "base.img", SIZE)
    fill(d / "base.img", ["write -P 1 0 64k"], fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.img", "-F", "qcow2",
             d / "top.qcow2", SIZE)
    return "top.qcow2", "base.img", ["format"], {"EINVAL"}


# A qcow2 file recorded as raw is no refusal: the recorded format wins, as
# in QEMU (tests/test_chain_special.py).


def case_unknown_backing_format(d):
    _plain(d, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "vmdk",
             d / "top.qcow2", SIZE)
    return "top.qcow2", "vmdk", [], {"EINVAL", "EOPNOTSUPP", "ENOTSUP"}


CASES = {
    "luks": case_luks,
    "aes-patched": case_aes_patched,
    "aes-in-backing": case_aes_in_backing,
    "data-file": case_data_file,
    "unknown-incompat": case_unknown_incompat,
    "unknown-incompat-bit63": case_unknown_incompat_high,
    "corrupt-bit": case_corrupt,
    "extended-l2": case_extended_l2,
    "zstd": case_zstd,
    "bad-magic-backing": case_bad_magic_backing,
    "bad-version-4": case_bad_version,
    "bad-version-1": case_version_1,
    "cluster-bits-8": case_cluster_bits_small,
    "cluster-bits-22": case_cluster_bits_large,
    "backing-loop": case_backing_loop,
    "self-loop": case_self_loop,
    "missing-backing": case_missing_backing,
    "backing-outside": case_backing_outside,
    "backing-outside-absolute": case_backing_outside_absolute,
    "backing-symlink-outside": case_backing_symlink_outside,
    "raw-declared-qcow2": case_raw_declared_qcow2,
    "unknown-backing-format": case_unknown_backing_format,
}

# Refused when opened read-write only: QEMU itself reads such images.
RW_ONLY = {"corrupt-bit"}  # a dirty one is repaired: test_dirty_repair.py


def _all_hashes(d):
    # The directory and its parent (outside files must not change either).
    out = dir_hashes(d)
    for f in os.listdir(str(d.parent)):
        p = d.parent / f
        if p.is_file() and not p.is_symlink():
            out["../" + f] = file_sha256(str(p))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal(case, image_dir):
    top, named, words, errnos = CASES[case](image_dir)
    before = _all_hashes(image_dir)
    modes = [["--rw"]] + ([] if case in RW_ONLY else [[]])
    for mode in modes:
        res = tool("open", image_dir / top, *mode, check=False)
        assert res.returncode == 1, "%s %s: expected a refusal, got rc %d\n%s%s" % (
            case, mode, res.returncode, res.stdout, res.stderr)
        msg = res.stderr.strip()
        assert msg.startswith("chain-tool: "), msg
        low = msg.lower()
        names = named if isinstance(named, tuple) else (named,)
        assert any(os.path.basename(n).lower() in low for n in names), \
            "message does not name %s: %s" % (named, msg)
        if words:
            assert any(w in low for w in words), "message does not name %s: %s" % (words, msg)
        tag = msg.rsplit("[", 1)[-1].rstrip("]") if msg.endswith("]") else None
        assert tag in errnos, "%s: errno %s, expected one of %s: %s" % (
            case, tag, sorted(errnos), msg)
        assert _all_hashes(image_dir) == before, "%s %s: a refused open changed a file" % (
            case, mode)


@pytest.mark.parametrize("case", sorted(RW_ONLY))
def test_refused_rw_image_still_reads(case, image_dir, tmp_path):
    # Like QEMU, an image refused for writing (dirty, corrupt) is still
    # read: opened read-only it reads as qemu-img reads it, and the file
    # stays as it was.
    from test_chain_common import assert_reads_like_qemu
    top, named, words, errnos = CASES[case](image_dir)
    before = _all_hashes(image_dir)
    res = tool("open", image_dir / top, check=False)
    assert res.returncode == 0, res.stderr
    work = tmp_path / "work"
    work.mkdir()
    assert_reads_like_qemu(str(image_dir / top), work)
    assert _all_hashes(image_dir) == before


def test_patch_helpers_roundtrip(image_dir):
    # The header offsets the cases rely on (so a refusal is for the bit we
    # meant, not for a header we broke some other way).
    name = _plain(image_dir)
    p = str(image_dir / name)
    assert qcow2_field(p, HDR_MAGIC, "I") == 0x514649FB
    assert qcow2_field(p, HDR_VERSION, "I") == 3
    assert qcow2_field(p, HDR_CLUSTER_BITS, "I") == 16
    assert qcow2_field(p, HDR_CRYPT_METHOD, "I") == 0
    assert qcow2_field(p, HDR_INCOMPAT, "Q") == 0
    qcow2_patch(p, HDR_INCOMPAT, "Q", 1 << 9)
    assert qcow2_field(p, HDR_INCOMPAT, "Q") == 1 << 9
    res = qemu_img("info", p, check=False)
    assert res.returncode != 0 and "feature" in res.stderr.lower(), res.stderr
    qcow2_patch(p, HDR_INCOMPAT, "Q", 0)
    qemu_img("check", p)


def test_other_chain_of_directory_still_opens(image_dir, tmp_path):
    # A refused chain does not stop another chain of the same directory.
    from test_chain_common import assert_reads_like_qemu
    case_missing_backing(image_dir)
    _plain(image_dir, "good.qcow2")
    assert tool("open", image_dir / "top.qcow2", check=False).returncode == 1
    assert_reads_like_qemu(str(image_dir / "good.qcow2"), tmp_path)
