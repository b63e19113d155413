/*
 * json.h: the little JSON chainfs needs: writing objects for the control
 * surface, and reading fields of flat objects (chainctl reads job status).
 */
#ifndef CHAINFS_JSON_H
#define CHAINFS_JSON_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

/* Append s as a JSON string literal (quoted, escaped); NULL gives null. */
void json_append_string(GString *out, const char *s);
/* Append "key": to out, with a comma first unless out ends in '{' or '['. */
void json_append_key(GString *out, const char *key);
void json_append_member_string(GString *out, const char *key, const char *s);
void json_append_member_uint(GString *out, const char *key, uint64_t v);
void json_append_member_bool(GString *out, const char *key, bool v);

/*
 * The value of key in the outermost object of json: a string member comes
 * back unescaped, any other value as its text ("42", "true", "null",
 * "{...}").  NULL when absent or json is malformed.  Newly allocated.
 */
char *json_get_member(const char *json, const char *key);
bool json_get_uint(const char *json, const char *key, uint64_t *out);

#endif
