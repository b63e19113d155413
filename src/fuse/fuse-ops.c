/* fuse-ops.c: placeholder until its owner lands it. */
