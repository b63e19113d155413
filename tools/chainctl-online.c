/* chainctl-online.c: placeholder until its owner lands it. */
