/*
 * test-qcow2-overlap.c: the qcow2 driver's metadata map (qcow2-overlap.c):
 * ranges widened to clusters, merged by kind, clashes reported, found by
 * binary search, and cut out again.
 */
#include <glib.h>

#include "qcow2-int.h"

#define CS 4096u

static BDRVQcow2State *state_new(void)
{
    BDRVQcow2State *s = g_new0(BDRVQcow2State, 1);

    s->cluster_size = CS;
    s->cluster_bits = 12;
    qcow2_meta_init(s);
    return s;
}

static void state_free(BDRVQcow2State *s)
{
    qcow2_meta_free(s);
    g_free(s);
}

static void test_add_find(void)
{
    BDRVQcow2State *s = state_new();
    Qcow2MetaRange clash;
    const Qcow2MetaRange *r;

    g_assert_true(qcow2_meta_add(s, QCOW2_META_HEADER, 0, CS, NULL));
    /* 8 bytes of L1 still make the whole cluster metadata. */
    g_assert_true(qcow2_meta_add(s, QCOW2_META_L1, 3 * CS, 8, NULL));
    g_assert_true(qcow2_meta_add(s, QCOW2_META_L2, 10 * CS, CS, NULL));
    g_assert_true(qcow2_meta_add(s, QCOW2_META_L2, 11 * CS, CS, NULL));
    g_assert_true(qcow2_meta_add(s, QCOW2_META_L2, 9 * CS, CS, NULL));
    g_assert_cmpuint(s->meta->len, ==, 3); /* the L2 tables merged */

    g_assert_false(qcow2_meta_add(s, QCOW2_META_RB, 11 * CS + 512, 16,
                                  &clash));
    g_assert_cmpint(clash.kind, ==, QCOW2_META_L2);

    g_assert_null(qcow2_meta_find(s, CS, 2 * CS, QCOW2_META_DATA));
    r = qcow2_meta_find(s, 3 * CS + 4000, 200, QCOW2_META_DATA);
    g_assert_nonnull(r);
    g_assert_cmpint(r->kind, ==, QCOW2_META_L1);
    /* A write of a kind may land on its own kind only. */
    g_assert_null(qcow2_meta_find(s, 10 * CS + 8, 8, QCOW2_META_L2));
    r = qcow2_meta_find(s, 8 * CS, 2 * CS, QCOW2_META_L2);
    g_assert_null(r);
    r = qcow2_meta_find(s, 2 * CS, 8 * CS, QCOW2_META_L2);
    g_assert_nonnull(r);
    g_assert_cmpint(r->kind, ==, QCOW2_META_L1);
    g_assert_nonnull(qcow2_meta_find(s, 0, 1, QCOW2_META_DATA));
    g_assert_null(qcow2_meta_find(s, 12 * CS, UINT64_MAX - 12 * CS,
                                  QCOW2_META_L2));
    state_free(s);
}

static void test_remove(void)
{
    BDRVQcow2State *s = state_new();

    g_assert_true(qcow2_meta_add(s, QCOW2_META_L2, 10 * CS, 5 * CS, NULL));
    qcow2_meta_remove(s, QCOW2_META_RB, 10 * CS, 5 * CS); /* other kind */
    g_assert_cmpuint(s->meta->len, ==, 1);
    qcow2_meta_remove(s, QCOW2_META_L2, 12 * CS, CS);      /* the middle */
    g_assert_cmpuint(s->meta->len, ==, 2);
    g_assert_null(qcow2_meta_find(s, 12 * CS, CS, QCOW2_META_DATA));
    g_assert_nonnull(qcow2_meta_find(s, 11 * CS, CS, QCOW2_META_DATA));
    g_assert_nonnull(qcow2_meta_find(s, 13 * CS, CS, QCOW2_META_DATA));
    qcow2_meta_remove(s, QCOW2_META_L2, 9 * CS, 3 * CS);   /* a head */
    qcow2_meta_remove(s, QCOW2_META_L2, 14 * CS, 4 * CS);  /* a tail */
    g_assert_cmpuint(s->meta->len, ==, 1);
    g_assert_nonnull(qcow2_meta_find(s, 13 * CS, 1, QCOW2_META_DATA));
    g_assert_null(qcow2_meta_find(s, 14 * CS, CS, QCOW2_META_DATA));
    qcow2_meta_remove(s, QCOW2_META_L2, 13 * CS, CS);
    g_assert_cmpuint(s->meta->len, ==, 0);
    /* Freed clusters may become metadata again. */
    g_assert_true(qcow2_meta_add(s, QCOW2_META_RT, 10 * CS, 5 * CS, NULL));
    state_free(s);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/qcow2-overlap/add-find", test_add_find);
    g_test_add_func("/qcow2-overlap/remove", test_remove);
    return g_test_run();
}
