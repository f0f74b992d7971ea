/* test_api.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_api(void)
{
    Suite *s = suite_create("api");
    return s;
}
