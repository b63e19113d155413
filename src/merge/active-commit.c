/* active-commit.c: placeholder until its owner lands it. */
