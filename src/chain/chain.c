/* chain.c: placeholder until its owner lands it. */
