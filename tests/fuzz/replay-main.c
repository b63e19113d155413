/*
 * replay-main: a main() for the fuzz targets in builds without libFuzzer
 * (gcc, the normal and the ASan+UBSan builds), so that the unit suite
 * replays every kept input: replay-TARGET FILE|DIR...  Each file is one
 * input, as libFuzzer runs it; a crash or sanitizer report fails the test.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-common.h"

static int replay_file(const char *path)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *data = NULL;
    gsize len;

    if (!g_file_get_contents(path, &data, &len, &error)) {
        fprintf(stderr, "replay: %s\n", error->message);
        return -1;
    }
    LLVMFuzzerTestOneInput((const uint8_t *)data, len);
    return 1;
}

static gint replay_cmp(gconstpointer a, gconstpointer b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int replay_path(const char *path)
{
    if (!g_file_test(path, G_FILE_TEST_IS_DIR)) {
        return replay_file(path);
    }

    g_autoptr(GError) error = NULL;
    g_autoptr(GDir) dir = g_dir_open(path, 0, &error);
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    const char *name;
    int count = 0;

    if (!dir) {
        fprintf(stderr, "replay: %s\n", error->message);
        return -1;
    }
    while ((name = g_dir_read_name(dir))) {
        g_ptr_array_add(names, g_build_filename(path, name, NULL));
    }
    /* In name order, so that a failure reproduces the same way. */
    g_ptr_array_sort(names, replay_cmp);
    for (guint i = 0; i < names->len; i++) {
        int n = replay_file(g_ptr_array_index(names, i));

        if (n < 0) {
            return -1;
        }
        count += n;
    }
    return count;
}

int main(int argc, char **argv)
{
    int total = 0;

    LLVMFuzzerInitialize(&argc, &argv);
    for (int i = 1; i < argc; i++) {
        int n = replay_path(argv[i]);

        if (n < 0) {
            return 1;
        }
        total += n;
    }
    if (total == 0) {
        fprintf(stderr, "replay: no input given\n");
        return 1;
    }
    printf("replayed %d inputs\n", total);
    return 0;
}
