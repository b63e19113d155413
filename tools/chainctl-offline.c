/* chainctl-offline.c: placeholder until its owner lands it. */
