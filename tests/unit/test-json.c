/* test-json.c: the JSON writer and the flat-object reader. */
#include <glib.h>

#include "json.h"

static void test_write_escapes(void)
{
    g_autoptr(GString) s = g_string_new("{");
    json_append_member_string(s, "a", "x\"y\\z\n");
    json_append_member_uint(s, "n", 42);
    json_append_member_bool(s, "b", true);
    json_append_member_string(s, "nul", NULL);
    g_string_append_c(s, '}');
    g_assert_cmpstr(s->str, ==,
                    "{\"a\":\"x\\\"y\\\\z\\n\",\"n\":42,\"b\":true,\"nul\":null}");
}

static void test_read_members(void)
{
    const char *j = "{ \"id\": \"job-1\", \"offset\": 1048576, "
                    "\"nested\": {\"state\": \"inner\"}, \"state\": \"ready\", "
                    "\"error\": null, \"msg\": \"a\\\"b\\u0041\" }";
    g_autofree char *id = json_get_member(j, "id");
    g_autofree char *state = json_get_member(j, "state");
    g_autofree char *nested = json_get_member(j, "nested");
    g_autofree char *err = json_get_member(j, "error");
    g_autofree char *msg = json_get_member(j, "msg");
    g_autofree char *missing = json_get_member(j, "nope");
    uint64_t off = 0;

    g_assert_cmpstr(id, ==, "job-1");
    g_assert_cmpstr(state, ==, "ready"); /* not the nested one */
    g_assert_cmpstr(nested, ==, "{\"state\": \"inner\"}");
    g_assert_cmpstr(err, ==, "null");
    g_assert_cmpstr(msg, ==, "a\"bA");
    g_assert_null(missing);
    g_assert_true(json_get_uint(j, "offset", &off));
    g_assert_cmpuint(off, ==, 1048576);
    g_assert_false(json_get_uint(j, "state", &off));
}

static void test_read_malformed(void)
{
    g_assert_null(json_get_member("[1,2]", "a"));
    g_assert_null(json_get_member("{\"a\" 1}", "a"));
    g_assert_null(json_get_member("{\"a\": \"unterminated}", "a"));
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/json/write-escapes", test_write_escapes);
    g_test_add_func("/json/read-members", test_read_members);
    g_test_add_func("/json/read-malformed", test_read_malformed);
    return g_test_run();
}
