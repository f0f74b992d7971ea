/* test_config.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_config(void)
{
    Suite *s = suite_create("config");
    return s;
}
