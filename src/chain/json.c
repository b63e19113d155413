/* json.c: see json.h. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

void json_append_string(GString *out, const char *s)
{
    if (!s) {
        g_string_append(out, "null");
        return;
    }
    g_string_append_c(out, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"':  g_string_append(out, "\\\""); break;
        case '\\': g_string_append(out, "\\\\"); break;
        case '\n': g_string_append(out, "\\n"); break;
        case '\r': g_string_append(out, "\\r"); break;
        case '\t': g_string_append(out, "\\t"); break;
        default:
            if (*p < 0x20) {
                g_string_append_printf(out, "\\u%04x", *p);
            } else {
                g_string_append_c(out, (char)*p);
            }
        }
    }
    g_string_append_c(out, '"');
}

void json_append_key(GString *out, const char *key)
{
    if (out->len > 0) {
        char last = out->str[out->len - 1];
        if (last != '{' && last != '[' && last != ':' && last != ',') {
            g_string_append_c(out, ',');
        }
    }
    json_append_string(out, key);
    g_string_append_c(out, ':');
}

void json_append_member_string(GString *out, const char *key, const char *s)
{
    json_append_key(out, key);
    json_append_string(out, s);
}

void json_append_member_uint(GString *out, const char *key, uint64_t v)
{
    json_append_key(out, key);
    g_string_append_printf(out, "%" PRIu64, v);
}

void json_append_member_bool(GString *out, const char *key, bool v)
{
    json_append_key(out, key);
    g_string_append(out, v ? "true" : "false");
}

/* ---- reading ------------------------------------------------------- */

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
        p++;
    }
    return p;
}

/* Parse a string literal at p (on '"'); append its unescaped text to out
 * when out is not NULL.  Returns the position after it, NULL if broken. */
static const char *scan_string(const char *p, GString *out)
{
    p++;
    while (*p && *p != '"') {
        if (*p == '\\') {
            p++;
            char c = *p;
            switch (c) {
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u': {
                char hex[5] = {0};
                for (int i = 0; i < 4; i++) {
                    if (!g_ascii_isxdigit(p[1 + i])) {
                        return NULL;
                    }
                    hex[i] = p[1 + i];
                }
                gunichar u = (gunichar)strtoul(hex, NULL, 16);
                if (out) {
                    g_string_append_unichar(out, u);
                }
                p += 5;
                continue;
            }
            case '\0':
                return NULL;
            default:
                break;
            }
            if (out) {
                g_string_append_c(out, c);
            }
            p++;
            continue;
        }
        if (out) {
            g_string_append_c(out, *p);
        }
        p++;
    }
    return *p == '"' ? p + 1 : NULL;
}

/* Skip any JSON value at p; returns the position after it or NULL. */
static const char *scan_value(const char *p)
{
    p = skip_ws(p);
    if (*p == '"') {
        return scan_string(p, NULL);
    }
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (*p) {
            if (*p == '"') {
                p = scan_string(p, NULL);
                if (!p) {
                    return NULL;
                }
                continue;
            }
            if (*p == '{' || *p == '[') {
                depth++;
            } else if (*p == '}' || *p == ']') {
                if (--depth == 0) {
                    return p + 1;
                }
            }
            p++;
        }
        return NULL;
    }
    const char *start = p;
    while (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ' &&
           *p != '\n' && *p != '\t' && *p != '\r') {
        p++;
    }
    return p == start ? NULL : p;
}

char *json_get_member(const char *json, const char *key)
{
    const char *p = skip_ws(json);
    if (*p != '{') {
        return NULL;
    }
    p = skip_ws(p + 1);
    while (*p == '"') {
        g_autoptr(GString) name = g_string_new(NULL);
        p = scan_string(p, name);
        if (!p) {
            return NULL;
        }
        p = skip_ws(p);
        if (*p != ':') {
            return NULL;
        }
        p = skip_ws(p + 1);
        const char *vstart = p;
        const char *vend = scan_value(p);
        if (!vend) {
            return NULL;
        }
        if (strcmp(name->str, key) == 0) {
            if (*vstart == '"') {
                GString *val = g_string_new(NULL);
                scan_string(vstart, val);
                return g_string_free(val, FALSE);
            }
            return g_strndup(vstart, (gsize)(vend - vstart));
        }
        p = skip_ws(vend);
        if (*p == ',') {
            p = skip_ws(p + 1);
        }
    }
    return NULL;
}

bool json_get_uint(const char *json, const char *key, uint64_t *out)
{
    g_autofree char *v = json_get_member(json, key);
    if (!v || !g_ascii_isdigit(v[0])) {
        return false;
    }
    *out = g_ascii_strtoull(v, NULL, 10);
    return true;
}
