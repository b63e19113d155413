/* qcow2-refcount.c: placeholder until its owner lands it. */
