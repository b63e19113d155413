/* chain-io.c: placeholder until its owner lands it. */
