/* qcow2-cluster.c: placeholder until its owner lands it. */
